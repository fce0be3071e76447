"""The ensemble: heads, routing, save/load, member loading and compatibility."""

from __future__ import annotations

import json

import pytest
import torch

from salm.ensemble import WEIGHTS_NAME, MultiModelWithScalarHeads, WeightsError
from salm.heads import HeadConfig, HeadConfigError, ScalarProjectionHead
from salm.members import MemberError, ModelInfo, load_member_set, select_models, write_member_set
from tests.conftest import batch, fresh, seed_state


def test_routing_probs_sum_to_one(tiny_ensemble):
    ids, mask = batch(tiny_ensemble, ["Tom has 12 apples.", "def add(a, b):\n    return a + b"])
    out = tiny_ensemble(ids, mask)
    assert out.router_logits.shape == (2, ids.shape[1], 3)
    torch.testing.assert_close(out.routing_probs.sum(-1), torch.ones(2, ids.shape[1]))
    assert out.logprobs.shape == (2, ids.shape[1], 3, tiny_ensemble.vocab_size)


def test_only_heads_are_parameters_and_state(tiny_ensemble):
    ens = fresh(tiny_ensemble)
    names = [n for n, _ in ens.named_parameters()]
    assert names and all(n.startswith("projection_heads.") for n in names)
    assert all(k.startswith("projection_heads.") for k in ens.state_dict())
    assert all(not p.requires_grad for m in ens.members for p in m.parameters())
    ens.train()
    assert all(not m.training for m in ens.members)  # members never enter train mode (dropout off)
    head_sizes = {mid: h.non_linear_projection[0].in_features for mid, h in ens.projection_heads.items()}
    assert head_sizes == {"tiny-0": 32, "tiny-1": 48, "tiny-2": 32}


def test_gold_logprobs_match_member_logits(tiny_ensemble):
    ids, mask = batch(tiny_ensemble, ["The patient presented with fever"])
    labels = ids.clone()
    labels[:, :2] = -100
    out = tiny_ensemble(ids, mask, labels=labels)
    ref = torch.log_softmax(tiny_ensemble.members[1](input_ids=ids).logits[0, :-1].float(), -1)
    expected = ref.gather(-1, ids[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.gold_logprobs[0, 1:-1, 1], expected[1:], rtol=1e-4, atol=1e-4)
    assert out.loss_mask[0].tolist() == [False] + [True] * (ids.shape[1] - 2) + [False]


def test_head_is_batch_independent():
    head = ScalarProjectionHead(16).eval()
    x = torch.randn(3, 5, 16)
    one = head(x[:1])
    torch.testing.assert_close(head(x)[:1], one)  # LayerNorm: no batch statistics leak between rows
    assert head(x[0, 0]).shape == ()


def test_save_load_round_trip(tiny_ensemble, tmp_path):
    ens = fresh(tiny_ensemble, seed=3)
    ens.save_pretrained(tmp_path / "heads")
    cfg = json.loads((tmp_path / "heads" / "salm_config.json").read_text())
    assert [m["id"] for m in cfg["members"]] == ens.model_ids
    assert [m["hidden_size"] for m in cfg["members"]] == [32, 48, 32]
    assert (tmp_path / "heads" / WEIGHTS_NAME).stat().st_size < 2_000_000  # heads only, never members
    loaded = MultiModelWithScalarHeads.from_pretrained(weights_path=tmp_path / "heads", device="cpu")
    ids, mask = batch(ens, ["Sphinx of black quartz"])
    torch.testing.assert_close(loaded(ids, mask).router_logits, ens(ids, mask).router_logits)


def test_head_config_round_trip_and_errors():
    cfg = HeadConfig(hidden_dim=64, dropout=0.25, norm="batch", router="confidence")
    assert HeadConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert HeadConfig.from_dict({}) == HeadConfig()  # missing fields: the defaults
    with pytest.raises(HeadConfigError, match=r"unknown HeadConfig field\(s\) \['colour'\] \(known: hidden_dim, "):
        HeadConfig.from_dict({"hidden_dim": 8, "colour": "red"})
    for bad, message in [
        ({"hidden_dim": 1}, "HeadConfig.hidden_dim must be an integer >= 2, got 1"),
        ({"hidden_dim": True}, "HeadConfig.hidden_dim must be an integer >= 2, got True"),
        ({"dropout": 1.0}, r"HeadConfig.dropout must be a number in \[0, 1\), got 1.0"),
        ({"dropout": float("nan")}, r"HeadConfig.dropout must be a number in \[0, 1\), got nan"),
        ({"norm": "group"}, "HeadConfig.norm must be one of layer, batch; got 'group'"),
        ({"router": "moe"}, "HeadConfig.router must be one of seed, confidence, joint, aware, evidence; got 'moe'"),
        ({"router": "joint", "norm": "batch"}, "the joint router has LayerNorm only"),
        ({"router": "evidence", "norm": "batch"}, "the evidence router has LayerNorm only"),
    ]:
        with pytest.raises(HeadConfigError, match=message):
            HeadConfig.from_dict(bad)
    with pytest.raises(HeadConfigError, match="HeadConfig needs a JSON object of fields, got list"):
        HeadConfig.from_dict([8])


def test_head_config_builds_the_heads_and_is_saved(tiny_ensemble, tmp_path):
    """``head_config=`` and the seed's keywords build the same heads; the folder keeps the config."""
    cfg = HeadConfig(hidden_dim=16, dropout=0.3, router="confidence")
    ens = fresh(tiny_ensemble, seed=4, head_config=cfg)
    assert ens.head_config == cfg and ens.head_hidden_dim == 16 and ens.head_dropout == 0.3
    assert ens.projection_heads["tiny-0"].non_linear_projection[0].weight.shape == (16, 32)
    by_keywords = fresh(tiny_ensemble, seed=4, head_hidden_dim=16, head_dropout=0.3, router="confidence")
    assert by_keywords.head_config == cfg
    assert all(torch.equal(a, b) for a, b in zip(ens.state_dict().values(), by_keywords.state_dict().values()))
    # A keyword overrides one field of head_config; a bad one is named before any member loads.
    assert fresh(tiny_ensemble, head_config=cfg, head_dropout=0.0).head_config == HeadConfig(
        16, 0.0, "layer", "confidence"
    )
    with pytest.raises(HeadConfigError, match="HeadConfig.hidden_dim must be an integer >= 2, got 0"):
        MultiModelWithScalarHeads(["no-such-member"], head_hidden_dim=0)
    with pytest.raises(HeadConfigError, match="head_config must be a salm.heads.HeadConfig, got dict"):
        MultiModelWithScalarHeads(["no-such-member"], head_config={"hidden_dim": 16})
    ens.save_pretrained(tmp_path / "heads")
    saved = json.loads((tmp_path / "heads" / "salm_config.json").read_text())
    assert saved["heads"] == {"hidden_dim": 16, "dropout": 0.3, "norm": "layer", "router": "confidence"}
    loaded = MultiModelWithScalarHeads.from_pretrained(tmp_path / "heads", device="cpu")
    assert loaded.head_config == cfg
    saved["heads"]["width"] = 3
    (tmp_path / "heads" / "salm_config.json").write_text(json.dumps(saved))
    with pytest.raises(WeightsError, match=r"salm_config.json: unknown HeadConfig field\(s\) \['width'\]"):
        MultiModelWithScalarHeads.from_pretrained(tmp_path / "heads", device="cpu")


def test_folder_in_the_format_before_head_config_loads_identically(tiny_ensemble, tmp_path):
    """A folder as saLM wrote it before HeadConfig (flat ``head_*`` keys, written here by hand) loads the
    same heads with the same settings, and routes exactly as the model that saved it."""
    from safetensors.torch import save_file

    from salm import __version__

    ens = fresh(tiny_ensemble, seed=8, head_hidden_dim=24, head_dropout=0.2, router="confidence")
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in ens.state_dict().items()}, str(old / WEIGHTS_NAME))
    (old / "salm_config.json").write_text(
        json.dumps(
            {
                "salm_version": __version__,
                "members": [dict(m.to_dict(), hidden_size=h) for m, h in zip(ens.infos, ens.hidden_sizes)],
                "head_hidden_dim": 24,
                "head_dropout": 0.2,
                "head_norm": "layer",
                "router": "confidence",
            }
        )
    )
    loaded = MultiModelWithScalarHeads.from_pretrained(old, device="cpu")
    assert loaded.head_config == ens.head_config and loaded.model_ids == ens.model_ids
    assert all(torch.equal(v, ens.state_dict()[k]) for k, v in loaded.state_dict().items())
    ids, mask = batch(ens, ["Sphinx of black quartz", "Tom has"])
    torch.testing.assert_close(loaded(ids, mask).router_logits, ens(ids, mask).router_logits)
    # Saved again, it is in the new format and still the same heads.
    loaded.save_pretrained(tmp_path / "new")
    again = MultiModelWithScalarHeads.from_pretrained(tmp_path / "new", device="cpu")
    assert again.head_config == ens.head_config
    assert "head_hidden_dim" not in json.loads((tmp_path / "new" / "salm_config.json").read_text())


def test_seed_pt_layout_loads_with_alias(tiny_ensemble, tmp_path):
    infos = [ModelInfo(i.id, i.name, i.path, aliases=(f"old-{i.id}",)) for i in tiny_ensemble.infos]
    state = seed_state(tiny_ensemble, [f"old-{i.id}" for i in infos])
    torch.save(state, tmp_path / "best_model_heads.pt")
    ens = MultiModelWithScalarHeads.from_pretrained(
        base_models=infos, weights_path=tmp_path / "best_model_heads.pt", device="cpu"
    )
    assert ens.head_norm == "batch"
    h = torch.randn(4, 48)
    ref = ScalarProjectionHead(48, 256, norm="batch")
    ref.load_state_dict(
        {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith("projection_heads.old-tiny-1.")}
    )
    torch.testing.assert_close(ens.projection_heads["tiny-1"](h), ref.eval()(h))


def test_mismatched_weights_raise(tiny_ensemble, tmp_path):
    state = seed_state(tiny_ensemble, ["tiny-0", "tiny-1", "other"])
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"no heads for members \['tiny-2'\].*not in this ensemble \['other'\]"):
        MultiModelWithScalarHeads.from_pretrained(base_models=tiny_ensemble.infos, weights_path=tmp_path / "w.pt")
    state = seed_state(tiny_ensemble, ["tiny-0", "tiny-2", "tiny-1"])  # 48-wide head saved for a 32-wide member
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(
        WeightsError, match=r"projection_heads.tiny-1.non_linear_projection.0.weight: shape \(256, 32\)"
    ):
        MultiModelWithScalarHeads.from_pretrained(base_models=tiny_ensemble.infos, weights_path=tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="does not exist"):
        MultiModelWithScalarHeads.from_pretrained(base_models=tiny_ensemble.infos, weights_path=tmp_path / "nope.pt")


def test_tokenizer_mismatch_raises(tiny_infos, tmp_path):
    from salm.testing import build_member, build_tokenizer

    other_tok = build_tokenizer(vocab_size=280, corpus=["completely different text about cats and dogs"] * 30)
    odd = build_member(tmp_path / "odd", other_tok, seed=9)
    infos = [tiny_infos[0], ModelInfo("odd", "odd", str(odd))]
    with pytest.raises(MemberError, match=r"tokenizer mismatch between members 'tiny-0' and 'odd': token"):
        MultiModelWithScalarHeads(infos, device="cpu")


def test_member_errors(tiny_infos, tmp_path):
    with pytest.raises(MemberError, match="unknown member id 'nope'"):
        select_models(["nope"])
    assert [m.id for m in select_models(["quen-25-15b-med"])] == ["qwen-25-15b-med"]
    with pytest.raises(MemberError, match=r"member 'gone': local path .*missing is not a readable folder"):
        MultiModelWithScalarHeads([tiny_infos[0], ModelInfo("gone", "gone", str(tmp_path / "missing"))], device="cpu")
    with pytest.raises(MemberError, match="at least 2 members"):
        MultiModelWithScalarHeads([tiny_infos[0]], device="cpu")


def test_member_set_file_relative_paths(tiny_infos, tmp_path):
    import shutil

    for info in tiny_infos[:2]:
        shutil.copytree(info.path, tmp_path / info.id)
    (tmp_path / "members.yaml").write_text(
        "members:\n  - id: a\n    path: tiny-0\n    task: general\n  - id: b\n    path: ./tiny-1\n"
    )
    infos = load_member_set(tmp_path / "members.yaml")
    assert [m.path for m in infos] == [str((tmp_path / "tiny-0").resolve()), str((tmp_path / "tiny-1").resolve())]
    ens = MultiModelWithScalarHeads(tmp_path / "members.yaml", device="cpu")
    assert ens.model_ids == ["a", "b"]
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "a", "path": "x", "colour": "red"}]))
    with pytest.raises(MemberError, match=r"bad.json: member 'a' has unknown fields \['colour'\]"):
        load_member_set(tmp_path / "bad.json")


def test_members_given_as_the_files_entries(tiny_infos, tmp_path):
    """A list of member-set-file entries (dicts) is read as the file's entries are, with the same checks."""
    from salm.members import resolve_models

    entries = [{"id": m.id, "path": m.path, "task": "t"} for m in tiny_infos[:2]]
    (tmp_path / "members.json").write_text(json.dumps(entries))
    assert resolve_models(entries) == load_member_set(tmp_path / "members.json")
    assert MultiModelWithScalarHeads(entries, device="cpu").model_ids == ["tiny-0", "tiny-1"]
    with pytest.raises(MemberError, match=r"member list: member 'a' has unknown fields \['colour'\]"):
        resolve_models([{"id": "a", "path": "x", "colour": "red"}, entries[0]])
    with pytest.raises(MemberError, match="member list: member #2 needs at least 'id' and 'path'"):
        resolve_models([entries[0], {"id": "b"}])
    with pytest.raises(MemberError, match="member #1 is a str; expected a ModelInfo or a dict"):
        resolve_models(["tiny-0", entries[1]])


@pytest.mark.parametrize("name", ["members.yaml", "members.json"])
def test_member_set_written_reads_back_the_same_members(tiny_infos, tmp_path, name):
    """The one writer and the one reader agree, also on values YAML would retype or misparse by hand."""
    import shutil

    shutil.copytree(tiny_infos[1].path, tmp_path / "local")
    members = [
        ModelInfo("a", "Name: with a colon # and a hash", tiny_infos[0].path, "1", "general", revision="main"),
        ModelInfo("b", "b", "local", "1.5M", "yes", device="cpu"),  # relative: read back from the file's folder
        ModelInfo("c", "'quoted'", "org/hub-model", "0.5"),
    ]
    path = write_member_set(tmp_path / name, members, comment="a header\nof two lines")
    expected = [members[0], ModelInfo("b", "b", str((tmp_path / "local").resolve()), "1.5M", "yes", device="cpu"),
                members[2]]  # fmt: skip
    assert load_member_set(path) == expected
    if name.endswith(".yaml"):
        assert path.read_text().startswith("# a header\n# of two lines\nmembers:\n")
    with pytest.raises(MemberError, match=r"duplicate member ids \['a'\]"):
        write_member_set(tmp_path / "dup.yaml", [members[0], members[0]])
    assert not (tmp_path / "dup.yaml").exists()
