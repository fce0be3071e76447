"""Adapter members: PEFT LoRA finetunes of one base share its weights, run together in one forward, and behave
exactly as PEFT's own model of each adapter does; bad adapters are one-line errors naming the member."""

from __future__ import annotations

import json
import types

import pytest
import torch

from salm.ensemble import MultiModelWithScalarHeads
from salm.features import member_fingerprint
from salm.members import MemberError, ModelInfo, load_member_set, write_member_set
from salm.testing import build_lora_adapter, build_member, build_tiny_members
from salm.training import TrainConfig, train
from tests.conftest import PROMPTS, FinishedTexts, batch, fresh, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_tokenizer):
    """A base (Qwen2), two LoRA adapters of it (different ranks and target layers) and another whole model."""
    root = tmp_path_factory.mktemp("adapters")
    base = build_member(root / "base", tiny_tokenizer, seed=11)
    other = build_tiny_members(root / "others", 1, tokenizer=tiny_tokenizer, hidden_sizes=[48], archs=["llama"])[0]
    math = build_lora_adapter(base, root / "lora-math", seed=1, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    code = build_lora_adapter(base, root / "lora-code", seed=2, r=8, target_modules=["k_proj", "o_proj", "up_proj"])
    infos = [
        ModelInfo("general", "the base", str(base)),
        ModelInfo("math", "math LoRA", str(base), adapter=str(math)),
        ModelInfo("code", "code LoRA", str(base), adapter=str(code)),
        ModelInfo("other", "another model", other.path),
    ]
    ens = MultiModelWithScalarHeads(infos, device="cpu", router="aware").eval()
    return types.SimpleNamespace(root=root, base=base, math=math, code=code, infos=infos, ens=ens)


def _peft_model(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()


def test_members_on_one_base_share_its_weights(adapters):
    ens = adapters.ens
    assert ens.members[0] is ens.members[1] is ens.members[2] and ens.members[3] is not ens.members[0]
    assert ens.run_groups(range(4)) == [(0, 1, 2), (3,)]
    assert ens.run_groups((2, 3, 0)) == [(2, 0), (3,)]
    base = sum(p.numel() for n, p in ens.members[0].named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in ens.members[0].named_parameters() if "lora_" in n)
    alone = sum(p.numel() for p in _peft_model(adapters.base, adapters.math).base_model.model.parameters())
    assert 0 < lora < base and base + lora < 2 * alone  # one base plus the adapters, not a base per member
    # The suite forces packing (conftest, SALM_CPU_PACK=1): the base's layers are packed under PEFT's wrappers,
    # the LoRA matrices stay plain (the grouped multiply stacks them); the equivalences below run on that.
    from salm.cpu import PackedLinear

    wrapped = [m for m in ens.members[0].modules() if hasattr(m, "lora_A")]
    assert wrapped and all(isinstance(m.base_layer, PackedLinear) for m in wrapped)
    assert all(type(a) is torch.nn.Linear for m in wrapped for a in (*m.lora_A.values(), *m.lora_B.values()))


@pytest.mark.parametrize("member, adapter", [("math", "math"), ("code", "code"), ("general", None)])
def test_forcing_an_adapter_member_equals_peft_generate(adapters, member, adapter):
    """``member:<id>`` of an adapter member emits exactly PEFT's own model's greedy tokens (the base: the base's)."""
    from transformers import AutoModelForCausalLM

    ens, n = adapters.ens, 10
    if adapter is None:
        ref_model = AutoModelForCausalLM.from_pretrained(str(adapters.base)).eval()
    else:
        ref_model = _peft_model(adapters.base, getattr(adapters, adapter))
    for prompt in PROMPTS:
        ids = ens.tokenizer(prompt, return_tensors="pt")["input_ids"]
        pad = ens.tokenizer.pad_token_id
        with torch.no_grad():
            out = ref_model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=pad)
        ref = out[0, ids.shape[1] :].tolist()
        if ens.tokenizer.eos_token_id in ref:
            ref = ref[: ref.index(ens.tokenizer.eos_token_id)]
        out = ens.generate(prompt, max_new_tokens=n, temperature=0, routing=f"member:{member}", return_outputs=True)
        assert out.token_ids == ref


def test_one_forward_for_all_adapters_equals_one_forward_each(adapters):
    """The grouped forward (rows in blocks, every adapter's LoRA product batched) = each member run alone."""
    ens = adapters.ens
    ids, mask = batch(ens, PROMPTS)  # left-padded, different lengths
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for group in [(0, 1, 2), (1, 2), (2, 0)]:
        hs, lgs, _ = ens.run_members(group, ids, mask, pos)
        for i, h, lg in zip(group, hs, lgs):
            h1, lg1, _ = ens.run_member(i, ids, mask, pos)
            real = mask.bool()
            torch.testing.assert_close(h[real], h1[real], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lg[real], lg1[real], rtol=1e-5, atol=1e-5)
    # The members really differ (the adapters do something) ...
    h0, h1 = ens.run_member(0, ids, mask, pos)[0], ens.run_member(1, ids, mask, pos)[0]
    assert (h0 - h1).abs().max() > 1e-2


def test_over_a_bf16_base_the_updates_are_peft_s_up_to_rounding(adapters):
    """Over a half-precision base each block's LoRA update is added inside one GEMM in the base's dtype (PEFT adds
    an fp32 update, then rounds: three passes over the output): the logits are PEFT's own bf16 model's up to bf16
    rounding, and each adapter's update is far larger than that difference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ens = MultiModelWithScalarHeads(adapters.infos[:3], device="cpu", dtype=torch.bfloat16).eval()
    ids, mask = batch(ens, PROMPTS)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    _, lgs, _ = ens.run_members((0, 1, 2), ids, mask, pos)
    for i, adapter in ((1, adapters.math), (2, adapters.code)):
        base = AutoModelForCausalLM.from_pretrained(str(adapters.base), dtype=torch.bfloat16)
        ref = PeftModel.from_pretrained(base, str(adapter)).eval()
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real].float()
        got, plain = lgs[i][real].float(), lgs[0][real].float()
        alone = ens.run_member(i, ids, mask, pos)[1][real].float()
        diff = (got - want).abs().max()
        assert diff < 0.1 * (plain - want).abs().max()
        torch.testing.assert_close(alone, got, rtol=0, atol=float(diff) + 0.05)


def _alone(ens):
    """The same ensemble, but every member runs its own forward (the reference for the grouped path)."""
    alone = fresh(ens, seed=0, router=ens.router)
    alone.load_state_dict(ens.state_dict())
    alone.run_groups = lambda run: [(i,) for i in run]
    return alone


@pytest.mark.parametrize("path", [{}, {"cache_implementation": "static"}, {"use_cache": False}])
def test_routed_generation_with_adapter_members_equals_running_them_apart(adapters, path):
    ens = fresh(adapters.ens, seed=5, router="aware")  # heads under which math, code and general all speak
    gen = dict(max_new_tokens=8, temperature=0, return_outputs=True, **path)
    grouped = ens.generate(PROMPTS, **gen)
    apart = _alone(ens).generate(PROMPTS, cache_implementation="dynamic", max_new_tokens=8, temperature=0,
                                 return_outputs=True)  # fmt: skip
    assert [o.token_ids for o in grouped] == [o.token_ids for o in apart]
    assert [[d.member for d in o.decisions] for o in grouped] == [[d.member for d in o.decisions] for o in apart]
    assert [ens.generate([p], **gen)[0].token_ids for p in PROMPTS] == [o.token_ids for o in grouped]
    assert len({d.member for o in grouped for d in o.decisions}) > 1  # several members spoke


def test_mixed_members_train_save_reload_and_route_identically(adapters, tmp_path):
    rows = [{"question": f"What is {a} times {b}?", "answer": f"{a * b}"} for a in range(2, 6) for b in range(2, 5)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    members_file = write_member_set(tmp_path / "members.yaml", adapters.infos)
    assert [m.adapter for m in load_member_set(members_file)] == [m.adapter for m in adapters.infos]
    cfg = TrainConfig.from_flat(
        datasets=[str(data)], output_dir=str(tmp_path / "run"), num_epochs=2, batch_size=4, head_hidden_dim=16,
        val_fraction=0.25, warmup_steps=0, learning_rate=3e-3, plots=False, progress=False,
    )  # fmt: skip
    res = train(cfg, model=fresh(adapters.ens, seed=1, head_hidden_dim=16))
    trained = res.best_model()
    saved = json.loads((tmp_path / "run" / "best_model" / "salm_config.json").read_text())
    assert [m.get("adapter") for m in saved["members"]] == [m.adapter for m in adapters.infos]
    loaded = MultiModelWithScalarHeads.from_pretrained(tmp_path / "run" / "best_model", device="cpu")
    assert loaded.members[0] is loaded.members[2]  # the reloaded set shares its base again
    ids, mask = batch(loaded, PROMPTS)
    torch.testing.assert_close(loaded(ids, mask).router_logits, trained(ids, mask).router_logits)
    gen = dict(max_new_tokens=6, temperature=0, return_decisions=True)
    assert loaded.generate(PROMPTS, **gen) == trained.generate(PROMPTS, **gen)


def test_the_server_engine_routes_adapter_members_as_generate_does(adapters):
    from salm.serve.engine import Engine, SamplingParams

    ens = fresh(adapters.ens, seed=5, router="aware")  # heads under which math, code and general all speak
    jobs = [(PROMPTS[i % 3], 3 + 2 * i) for i in range(5)]
    want = [ens.generate(p, max_new_tokens=n, temperature=0) for p, n in jobs]
    results = FinishedTexts(len(jobs))
    engine = Engine(ens, max_batch=3).start()  # requests join and leave a running batch
    try:
        for i, (p, n) in enumerate(jobs):
            params = SamplingParams(max_tokens=n, temperature=0.0)
            engine.submit(ens.tokenizer(p)["input_ids"], params, results.sink(i))
        assert results.wait(60)
    finally:
        engine.shutdown()
    assert results.texts() == want


def test_bad_adapters_are_one_line_errors_naming_the_member(adapters, tmp_path, tiny_tokenizer):
    base = str(adapters.base)

    def load(adapter):
        infos = [ModelInfo("general", "g", base), ModelInfo("spec", "s", base, adapter=str(adapter))]
        return MultiModelWithScalarHeads(infos, device="cpu")

    with pytest.raises(MemberError, match=f"member 'spec': adapter {tmp_path}/nowhere is not a readable folder"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemberError, match=f"member 'spec': cannot read the adapter {tmp_path}/empty: "):
        load(tmp_path / "empty")
    wider = build_member(tmp_path / "wider", tiny_tokenizer, seed=5, hidden_size=48)
    with pytest.raises(MemberError, match=f"member 'spec': adapter .*lora-wider does not fit its base {base}: "):
        load(build_lora_adapter(wider, tmp_path / "lora-wider", seed=1))
    dora = build_lora_adapter(adapters.base, tmp_path / "dora", seed=1, use_dora=True)
    with pytest.raises(MemberError, match=r"member 'spec': adapter .*dora uses DoRA \(use_dora\).*merge_and_unload"):
        load(dora)
    saved = build_lora_adapter(adapters.base, tmp_path / "saved", seed=1, modules_to_save=["lm_head"])
    with pytest.raises(MemberError, match=r"member 'spec': adapter .*saved uses modules_to_save \['lm_head'\]"):
        load(saved)
    head = build_lora_adapter(adapters.base, tmp_path / "head", seed=1, target_modules=["q_proj", "lm_head"])
    with pytest.raises(MemberError, match=r"member 'spec': adapter .*head uses LoRA on the LM head \(lm_head\)"):
        load(head)


def test_the_feature_cache_key_follows_the_adapters_weights(adapters, tmp_path):
    info = adapters.infos[1]
    before = member_fingerprint(info)
    copy = build_lora_adapter(adapters.base, tmp_path / "copy", seed=1, r=4)  # the same files as lora-math ...
    moved = ModelInfo(info.id, info.name, info.path, adapter=str(copy))
    assert member_fingerprint(moved)["adapter"]["files"] == before["adapter"]["files"]
    other = build_lora_adapter(adapters.base, tmp_path / "other", seed=9, r=4)  # ... other weights: another key
    assert (
        member_fingerprint(ModelInfo(info.id, info.name, info.path, adapter=str(other)))["adapter"] != before["adapter"]
    )
    plain = adapters.infos[0]
    assert "adapter" not in member_fingerprint(plain)
