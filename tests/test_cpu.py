"""The CPU's dtype choice (``dtype="auto"``) and the members' packed linear layers (:mod:`salm.cpu`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from salm import cpu
from salm.cli import build_parser
from salm.commands.common import ensemble_from_flags
from salm.ensemble import MultiModelWithScalarHeads
from salm.evaluation import runner
from salm.evaluation.runner import EvalSettings, evaluate
from salm.evaluation.tasks import Task, score_gsm8k_output
from salm.generation import DecodeConfig, generate
from salm.members import resolve_dtype
from salm.testing import write_member_set
from tests.conftest import PROMPTS, math_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def native(monkeypatch):
    """``native(True/False)``: what the detection reports, with ``SALM_CPU_DTYPE`` unset (as for a user)."""
    monkeypatch.delenv(cpu.DTYPE_ENV, raising=False)
    monkeypatch.setattr(cpu, "_announced", set())

    def set_native(value: bool) -> None:
        info = dataclasses.replace(cpu.cpu_info(), native_bf16=value)
        monkeypatch.setattr(cpu, "cpu_info", lambda: info)

    return set_native


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_picks_bf16_exactly_where_the_cpu_multiplies_it(native, has_bf16, capsys):
    native(has_bf16)
    want = torch.bfloat16 if has_bf16 else torch.float32
    assert resolve_dtype("auto", "cpu") == resolve_dtype(None, "cpu") == want
    assert resolve_dtype("float32", "cpu") == torch.float32  # an explicit dtype is never second-guessed
    assert resolve_dtype("auto", "cuda") == torch.bfloat16  # accelerators: unchanged
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1  # printed once per process, however often it is resolved
    assert err[0].startswith(f"salm: members run in {str(want).replace('torch.', '')}")


def test_native_means_the_instructions_not_onednn_emulation(monkeypatch):
    """oneDNN reports bf16 support on any AVX-512 CPU (it emulates it there: a decode step then grows with the
    batch), so the choice reads the CPU's own flags, and oneDNN's ISA cap."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    cpu.cpu_info.cache_clear()
    try:
        monkeypatch.setattr(cpu, "_flags", lambda: ("avx2", "avx512_f"))
        assert not cpu.cpu_info().native_bf16
        cpu.cpu_info.cache_clear()
        monkeypatch.setattr(cpu, "_flags", lambda: ("avx2", "avx512_f", "avx512_bf16"))
        assert cpu.cpu_info().native_bf16
        cpu.cpu_info.cache_clear()
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # what oneDNN may use, not what the CPU has
        assert not cpu.cpu_info().native_bf16
    finally:
        cpu.cpu_info.cache_clear()


def test_the_environment_overrides_auto_and_a_bad_value_is_named(native, monkeypatch):
    native(False)
    monkeypatch.setenv(cpu.DTYPE_ENV, "bfloat16")
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setenv(cpu.DTYPE_ENV, "float16")
    with pytest.raises(ValueError, match=r"^SALM_CPU_DTYPE='float16': use float32 or bfloat16$"):
        resolve_dtype("auto", "cpu")


@pytest.mark.parametrize(
    "flag, has_bf16, want",
    [(None, True, "bfloat16"), (None, False, "float32"), ("bfloat16", False, "bfloat16"), ("float32", True, "float32")],
)
def test_the_dtype_flag_reaches_the_members(native, tiny_infos, tmp_path, flag, has_bf16, want):
    native(has_bf16)
    members = write_member_set(tmp_path / "members.json", tiny_infos[:2])
    argv = ["generate", "--models", str(members), "--device", "cpu", "hello"]
    args = build_parser(argv).parse_args(argv + (["--dtype", flag] if flag else []))
    assert args.dtype == (flag or "auto")
    ens = ensemble_from_flags(args)
    assert ens.dtype == getattr(torch, want)
    assert {p.dtype for m in ens.members for p in m.parameters()} == {getattr(torch, want)}
    assert {b.dtype for m in ens.members for b in m.buffers() if b.is_mkldnn} == {getattr(torch, want)}


# ---------------------------------------------------------------------------------------------- packed linears
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_computes_the_linear(dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias).to(dtype).requires_grad_(False)
    packed = cpu.PackedLinear(lin)
    assert packed.weight.is_mkldnn and packed.weight.shape == lin.weight.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for shape in [(1, 48), (3, 48), (2, 5, 48), (64, 48)]:
        x = torch.randn(shape, dtype=dtype)
        torch.testing.assert_close(packed(x), F.linear(x, lin.weight, lin.bias), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_swaps_every_linear_and_keeps_a_tied_embedding(tiny_tokenizer, tmp_path, dtype):
    """Every linear layer is packed; a weight the input embedding shares is packed as a copy in float32 (the
    embedding still reads the dense rows) and left shared in bfloat16; the logits stay the unpacked model's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = Qwen2ForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    ids = torch.randint(0, len(tiny_tokenizer), (3, 7))
    want = model(ids).logits
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    tied_kept = dtype == torch.bfloat16
    assert cpu.pack_linear_weights(model) == n_linear - tied_kept
    left = [m for m in model.modules() if type(m) is nn.Linear]
    assert left == ([model.lm_head] if tied_kept else [])
    if tied_kept:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert isinstance(model.get_input_embeddings().weight, nn.Parameter)
    assert not model.get_input_embeddings().weight.is_mkldnn
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(model(ids).logits, want, **tol)


def test_which_members_are_packed(tiny_infos, monkeypatch):
    """By size when ``SALM_CPU_PACK`` is unset (tiny members stay on PyTorch's kernels); 0 never; 1 always, but
    only dtypes oneDNN packs (fp32, bf16)."""
    from salm.members import load_member_model

    def packed(dtype: torch.dtype = torch.float32) -> bool:
        model = load_member_model(tiny_infos[0], "cpu", dtype)
        tied = model.get_output_embeddings() if model.config.tie_word_embeddings else None
        plain = [m for m in model.modules() if type(m) is nn.Linear and not (m is tied and dtype == torch.bfloat16)]
        assert bool(plain) != any(isinstance(m, cpu.PackedLinear) for m in model.modules())
        return not plain

    monkeypatch.delenv(cpu.PACK_ENV)
    assert not packed()
    monkeypatch.setattr(cpu, "PACK_MIN_BYTES", 1)
    assert packed() and packed(torch.bfloat16)
    monkeypatch.setenv(cpu.PACK_ENV, "0")
    assert not packed()
    monkeypatch.setenv(cpu.PACK_ENV, "1")
    assert not packed(torch.float16)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_packed_members_decode_the_tokens_of_unpacked_ones(tiny_infos, monkeypatch, cache):
    """Greedy, a batch of three prompts (the small batches the packing is for): the same tokens as PyTorch's own
    kernels, for the ensemble (argmax routing) and for a member alone."""
    out = {}
    for pack in ("0", "1"):
        monkeypatch.setenv(cpu.PACK_ENV, pack)
        torch.manual_seed(0)
        ens = MultiModelWithScalarHeads(tiny_infos, device="cpu", dtype="float32").eval()
        assert any(isinstance(m, cpu.PackedLinear) for m in ens.members[0].modules()) == (pack == "1")
        kw = dict(max_new_tokens=8, temperature=0, cache_implementation=cache, return_outputs=True)
        routings = ("argmax", f"member:{ens.model_ids[1]}")
        out[pack] = [[o.token_ids for o in generate(ens, PROMPTS, routing=r, **kw)] for r in routings]
    assert out["1"] == out["0"]


def test_results_record_the_dtype_and_another_dtype_is_evaluated_again(tiny_infos, tmp_path, monkeypatch):
    """The results files say which dtype and CPU computed them, and an evaluation in another dtype never reuses
    the generations of the first (the resume key holds the dtype)."""
    arith = Task("arith", scorer=score_gsm8k_output)
    settings = EvalSettings(decode=DecodeConfig(max_new_tokens=4, temperature=0), batch_size=2,
                            teacher_forced=False, progress=False, plots=False)  # fmt: skip
    calls: list[str] = []
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(3)
        ens = MultiModelWithScalarHeads(tiny_infos[:2], device="cpu", dtype=dtype, router="seed").eval()
        real = ens.generate
        monkeypatch.setattr(
            ens, "generate", lambda *a, _g=real, **kw: calls.append(kw["config"].routing) or _g(*a, **kw)
        )
        calls.clear()
        summary = evaluate(ens, [(arith, math_examples(2))], tmp_path, settings)
        assert len(calls) == 3  # the ensemble and both members: nothing reused from the other dtype
        results = json.loads((tmp_path / "arith" / "results.json").read_text())
        for record in (
            summary["compute"],
            results["compute"],
            json.loads((tmp_path / runner.SUMMARY_NAME).read_text())["compute"],
        ):
            assert record["dtype"] == dtype and record["devices"] == ["cpu"]
            assert record["cpu"]["model"] == cpu.cpu_model() and record["cpu"]["packed_linears"] is True
            assert set(record["cpu"]["flags"]) <= set(cpu._FLAGS)
    assert len(list((tmp_path / "arith" / runner.GENERATIONS_DIR).iterdir())) == 6


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc/self/maps and madvise: Linux")
def test_packing_hands_back_the_checkpoint_files_pages_and_changes_no_logit(tiny_tokenizer, tmp_path):
    """A model loaded from safetensors is memory-mapped from the file; after packing, the file's pages are
    advised out (the bytes of exactly the mappings that hold its tensors), and the logits are unchanged."""
    from transformers import AutoModelForCausalLM

    from salm.testing import build_member

    folder = build_member(tmp_path / "m", tiny_tokenizer, seed=0, hidden_size=64)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval().requires_grad_(False)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9))
    want = model(ids).logits
    ptrs = {t.untyped_storage().data_ptr() for t in model.parameters()}
    mapped = 0
    for line in open("/proc/self/maps", encoding="utf-8"):
        parts = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if len(parts) == 6 and parts[5].strip().endswith(".safetensors") and any(start <= p < end for p in ptrs):
            mapped += end - start
    assert cpu.release_file_pages(model) in (0, mapped)  # 0: a kernel without MADV_PAGEOUT (older than 5.4)
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    cpu.pack_linear_weights(model)  # packs, then hands back the pages the packing read
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
