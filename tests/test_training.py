"""Training: tokenization, the feature cache, cache = no-cache, exact resume, the CLI, and that heads learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import salm.loss
from salm import features
from salm.data import DataFormatError, Example
from salm.ensemble import MultiModelWithScalarHeads
from salm.features import FeatureCacheError, TokenizationError, load_or_build, tokenize_examples
from salm.training import TrainConfig, TrainingError, train
from tests.conftest import fresh, write_jsonl

REPO = Path(__file__).resolve().parents[1]
HEAD_DIM = 32

MATH = [
    {
        "question": f"What is {a} plus {b}?",
        "answer": f"Reasoning: {a} + {b} = {a + b}.\nTherefore, the answer is: {a + b}",
    }
    for a in range(3, 7)
    for b in range(2, 5)
]  # 12 rows
YESNO = [
    {"question": f"Is {n} larger than {k}?", "answer": f"Therefore, the answer is: {'yes' if n > k else 'no'}"}
    for n, k in [(1, 2), (5, 3), (7, 7), (9, 4), (2, 8), (6, 1), (3, 3), (8, 2), (4, 9), (10, 5), (0, 1), (12, 6)]
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    """Two data files and three tiny members, of which ``tiny-0`` was briefly trained on the data (the best)."""
    from transformers import AutoModelForCausalLM

    from salm.testing import build_tiny_members

    root = tmp_path_factory.mktemp("train")
    files = []
    for name, rows in (("math", MATH), ("yesno", YESNO)):
        files.append(str(write_jsonl(root / f"{name}.jsonl", rows)))
    infos = build_tiny_members(root / "members", 3, tokenizer=tiny_tokenizer, hidden_sizes=[32, 32, 48])
    texts = [f"Question: {r['question']}\nAnswer:\n{r['answer']}<|endoftext|>" for r in MATH + YESNO]
    enc = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    lm = AutoModelForCausalLM.from_pretrained(infos[0].path)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):
        loss = lm(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.save_pretrained(infos[0].path)
    ens = MultiModelWithScalarHeads(infos, head_hidden_dim=HEAD_DIM, device="cpu")
    return types.SimpleNamespace(root=root, files=files, infos=infos, ens=ens, tok=tiny_tokenizer)


def config(setup, out: Path, **kw) -> TrainConfig:
    base = dict(
        datasets=setup.files, output_dir=str(out), num_epochs=2, batch_size=4, head_hidden_dim=HEAD_DIM,
        val_fraction=0.25, log_every_n_steps=2, warmup_steps=2, learning_rate=1e-3, plots=False, progress=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig.from_flat(**base)


def heads(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- tokenization
def test_answer_labels_are_exactly_answer_tokens_and_eos(tiny_tokenizer):
    ex = Example("d/0", "d", "What is 2 plus 3?", "Reasoning: 2 + 3 = 5.\nTherefore, the answer is: 5")
    p = tiny_tokenizer(ex.prompt)["input_ids"]
    a = tiny_tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    s = tokenize_examples([ex], tiny_tokenizer, 256, "answer", "train")
    assert s.input_ids[0] == p + a + [eos]
    assert s.labels[0] == [-100] * len(p) + a + [eos]
    assert s.n_positions == [len(a) + 1]
    s_all = tokenize_examples([ex], tiny_tokenizer, 256, "all", "train")
    assert s_all.labels[0] == p + a + [eos]
    # Too long: the prompt loses its start, the answer stays whole.
    cut = tokenize_examples([ex], tiny_tokenizer, len(a) + 3, "answer", "train")
    assert cut.input_ids[0] == p[-2:] + a + [eos] and cut.labels[0] == [-100] * 2 + a + [eos]
    assert cut.prompts_truncated == {"d": 1} and not cut.answers_truncated
    # An answer longer than max_length - 1 keeps its start after one prompt token.
    tiny = tokenize_examples([ex], tiny_tokenizer, 4, "answer", "train")
    assert tiny.input_ids[0] == p[-1:] + a[:3] and tiny.answers_truncated == {"d": 1}


def test_long_prompts_keep_bos_and_empty_is_an_error(tiny_tokenizer):
    class WithBos:
        """The tiny tokenizer, but adding a BOS to prompts as Llama's tokenizers do."""

        eos_token_id, bos_token_id = tiny_tokenizer.eos_token_id, 7

        def __call__(self, texts, add_special_tokens=True):
            ids = tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]
            return {"input_ids": [([7] if add_special_tokens else []) + x for x in ids]}

    long = Example("d/1", "long", "word " * 40, "no")
    s = tokenize_examples([long], WithBos(), 12, "answer", "train")
    assert s.input_ids[0][0] == 7 and len(s.input_ids[0]) == 12 and s.prompts_truncated == {"long": 1}
    full = WithBos()([long.prompt])["input_ids"][0]
    n_answer = len(tiny_tokenizer("no", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert s.input_ids[0][1:-n_answer] == full[-(12 - 1 - n_answer) :]  # BOS, the prompt's end, answer, EOS
    with pytest.raises(TokenizationError, match="empty"):
        tokenize_examples([], tiny_tokenizer, 64, "answer", "val")


def test_unusable_data_is_a_clear_error(setup, tmp_path, capsys):
    result = train(config(setup, tmp_path / "short", max_length=8), model=fresh(setup.ens))  # truncated, not dropped
    tokenized = result.report["data"]["tokenized"]["train"]
    assert tokenized["examples"] == 18 and sum(tokenized["prompts_truncated"].values()) == 18
    assert "prompts lost their start to fit max_length=8 (answers kept whole)" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataFormatError, match="no rows"):
        train(config(setup, tmp_path, datasets=[str(empty)]), model=fresh(setup.ens))


# ---------------------------------------------------------------------------------------------- the cache
def _split(setup, rows=MATH, max_length=64, name="train"):
    exs = [Example(f"m/{i}", "math", r["question"], r["answer"]) for i, r in enumerate(rows)]
    return tokenize_examples(exs, setup.tok, max_length, "answer", name)


def test_cache_reused_only_when_nothing_changes(setup, tmp_path, monkeypatch):
    kw = dict(max_length=64, loss_on="answer", progress=False)
    first = load_or_build(setup.ens, _split(setup), tmp_path, **kw)
    assert not first.reused
    calls = []
    real = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = load_or_build(setup.ens, _split(setup), tmp_path, **kw)
    assert again.reused and again.key == first.key and calls == []
    shorter = load_or_build(setup.ens, _split(setup, max_length=40), tmp_path, **{**kw, "max_length": 40})
    other_data = load_or_build(setup.ens, _split(setup, rows=MATH[:-1]), tmp_path, **kw)
    assert len(calls) == 2 and len({first.key, shorter.key, other_data.key}) == 3
    # A folder without its manifest (a crash before the end) is never trusted: rebuilt.
    (first.path / "manifest.json").unlink()
    rebuilt = load_or_build(setup.ens, _split(setup), tmp_path, **kw)
    assert not rebuilt.reused and len(calls) == 3 and (rebuilt.path / "manifest.json").is_file()
    # A truncated data file is caught by the size check.
    with (rebuilt.path / "gold.bin").open("r+b") as f:
        f.truncate(8)
    assert not load_or_build(setup.ens, _split(setup), tmp_path, **kw).reused


def test_cached_features_equal_member_features(setup, tmp_path):
    """The cache stores exactly what the members compute (fp32 here; bf16 bits for bf16 members)."""
    for dtype in (torch.float32, torch.bfloat16):
        ens = MultiModelWithScalarHeads(setup.infos, HEAD_DIM, device="cpu", dtype=dtype)
        split = _split(setup, rows=MATH[:5])
        cached = load_or_build(ens, split, tmp_path / str(dtype), max_length=64, loss_on="answer", progress=False)
        idx = [3, 0, 4]
        hid, gold, stats = cached.batch(idx)
        live = features.compute_features(ens, *features.collate(split, idx, setup.tok.pad_token_id))
        live_hid, live_gold, live_stats = live
        for h, lh in zip(hid, live_hid):
            assert h.dtype == dtype
            torch.testing.assert_close(h, lh, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.02)
        torch.testing.assert_close(gold, live_gold, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats, live_stats, rtol=1e-4, atol=1e-4)
        assert gold.shape == (sum(split.n_positions[i] for i in idx), 3)
        assert stats.shape == (gold.shape[0], 25)  # the history (2M), then the confidence statistics (M*M + 3M + 1)


def test_short_disk_fails_naming_folder_and_bytes(setup, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(features.shutil, "disk_usage", lambda p: usage(1000, 990, 10))
    with pytest.raises(FeatureCacheError) as e:
        load_or_build(setup.ens, _split(setup), tmp_path / "c", max_length=64, loss_on="answer", progress=False)
    msg = str(e.value)
    assert str(tmp_path / "c") in msg and "needs" in msg and "10 bytes" in msg and "free" in msg


# ---------------------------------------------------------------------------------------------- training
def test_cache_and_no_cache_give_the_same_losses(setup, tmp_path):
    a = train(config(setup, tmp_path / "cache"), model=fresh(setup.ens))
    b = train(config(setup, tmp_path / "live", feature_cache=False), model=fresh(setup.ens))
    ra, rb = records(tmp_path / "cache"), records(tmp_path / "live")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) > 4
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), k
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, b.model.state_dict()[k], rtol=1e-4, atol=1e-5)


def test_resume_ends_with_the_same_heads(setup, tmp_path, monkeypatch):
    full = train(config(setup, tmp_path / "full", num_epochs=3), model=fresh(setup.ens))
    want = heads(full.model)

    # Stopped after epoch 1 (as a kill would), then resumed to 3.
    out = tmp_path / "stopped"
    train(config(setup, out, num_epochs=3), model=fresh(setup.ens), stop_after_epoch=1)
    assert not (out / "final_model").exists()
    res = train(config(setup, out, num_epochs=3, resume=True), model=fresh(setup.ens))
    assert all(torch.equal(v, want[k]) for k, v in res.model.state_dict().items())
    assert records(out) == records(tmp_path / "full")

    # A crash in the middle of epoch 2, after a metrics line past the checkpoint was written.
    out = tmp_path / "crashed"
    real, n = salm.loss.perfect_alignment_loss, [0]

    def boom(*a, **k):
        n[0] += 1
        if n[0] == 10:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(salm.loss, "perfect_alignment_loss", boom)
    with pytest.raises(RuntimeError, match="killed"):
        train(config(setup, out, num_epochs=3), model=fresh(setup.ens))
    monkeypatch.setattr(salm.loss, "perfect_alignment_loss", real)
    ck = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ck["epoch"] == 1 and max(r["step"] for r in records(out)) > ck["global_step"]
    res = train(config(setup, out, num_epochs=3, resume=True), model=fresh(setup.ens))
    assert all(torch.equal(v, want[k]) for k, v in res.model.state_dict().items())
    steps = [(r["step"], "val/nll" in r) for r in records(out)]
    assert len(steps) == len(set(steps)) and records(out) == records(tmp_path / "full")


def test_resume_refuses_changed_settings(setup, tmp_path):
    train(config(setup, tmp_path, num_epochs=2), model=fresh(setup.ens), stop_after_epoch=1)
    with pytest.raises(TrainingError, match="learning_rate"):
        train(config(setup, tmp_path, num_epochs=2, learning_rate=5e-3, resume=True), model=fresh(setup.ens))


def test_warmup_is_a_share_of_the_run_unless_warmup_steps_is_given(setup, tmp_path):
    """Without --warmup_steps the warm-up is --warmup_ratio of the run's steps (HF's rule, rounded up); an
    explicit --warmup_steps, 0 included, is that many steps, as the seed's flag was. The run uses the schedule
    it reports, and the schedule's learning-rate sum is what the scheduler applies."""
    from transformers import get_linear_schedule_with_warmup

    from salm.training import OptimConfig

    # 18 training rows, batch 4: 5 steps per epoch, 15 in 3 epochs.
    for kw, warmup in (({}, 2), ({"warmup_ratio": 0.5}, 8), ({"warmup_steps": 0}, 0), ({"warmup_steps": 40}, 40)):
        s = OptimConfig(num_epochs=3, learning_rate=2e-3, **kw).schedule(18)
        assert (s.steps_per_epoch, s.total, s.warmup) == (5, 15, warmup), kw
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s.peak_lr)
        sched, applied = get_linear_schedule_with_warmup(opt, s.warmup, s.total), 0.0
        for _ in range(s.total):
            applied += opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
        assert s.lr_sum() == pytest.approx(applied, rel=1e-12), kw
    assert OptimConfig(num_epochs=2).schedule(18, world=2).total == 6  # ceil(18 / (4 * 2)) per epoch

    res = train(config(setup, tmp_path, num_epochs=3, warmup_steps=None, log_every_n_steps=1), model=fresh(setup.ens))
    assert res.report["steps"]["warmup"] == 2 and res.report["settings"]["warmup_ratio"] == 0.1
    logged = [r["train/learning_rate"] for r in records(tmp_path) if "train/learning_rate" in r]
    want = [1e-3 * (t / 2 if t < 2 else (15 - t) / 13) for t in range(1, 16)]  # after each step: step t's rate
    assert logged == pytest.approx(want, rel=1e-9)
    assert res.report["steps"]["learning_rate_sum"] == pytest.approx(sum(logged), rel=1e-5)  # step 0's rate is 0


def test_a_run_too_short_to_train_warns_before_the_members_load(setup, tmp_path, capsys):
    """One line naming the flags to raise, printed before the members load: here the members file is missing,
    so the run stops right after it."""
    from salm.members import MemberError
    from salm.training import OptimConfig

    short = config(setup, tmp_path, learning_rate=1e-4, warmup_steps=None, models=str(tmp_path / "none.yaml"))
    with pytest.raises(MemberError, match="does not exist"):
        train(short)
    lines = capsys.readouterr().err.splitlines()
    warned = [line for line in lines if line.startswith("warning: this run is likely too short to train the heads")]
    assert len(warned) == 1, lines
    assert "10 optimizer steps (5 per epoch, 1 of warm-up)" in warned[0]
    assert "raise --learning_rate or --num_epochs (or lower --batch_size)" in warned[0]
    assert OptimConfig(num_epochs=10, learning_rate=3e-3).schedule(18).too_short() is None  # 50 steps at 3e-3


def test_seed_out_of_range_is_one_line_naming_the_flag_before_members_load(setup, tmp_path, capsys):
    import argparse

    from salm.commands import train as train_command

    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    big = "99999999999999999999999"
    args = parser.parse_args(
        ["--datasets", *setup.files, "--models", str(tmp_path / "none.yaml"), "--output_dir", str(tmp_path / "o"),
         "--seed", big]
    )  # fmt: skip
    assert train_command.run(args) == 2
    assert capsys.readouterr().err == f"salm train: error: --seed must be in [0, 2**63), got {big}\n"
    for bad in (-1, 2**63):
        with pytest.raises(TrainingError, match=rf"^--seed must be in \[0, 2\*\*63\), got {bad}$"):
            config(setup, tmp_path, seed=bad).validate()
    config(setup, tmp_path, seed=2**63 - 1).validate()


def test_a_run_saved_before_warmup_ratio_resumes_as_it_was(setup, tmp_path, capsys):
    """A checkpoint written before --warmup_ratio existed (its view has no warmup_ratio) by a run with the
    seed's defaults (--learning_rate 1e-4 --warmup_steps 50) resumes under today's defaults with its own
    settings and ends with the heads of the uninterrupted run; one trained with other settings is refused."""
    from salm.training import OptimConfig

    seed_defaults = {"learning_rate": 1e-4, "warmup_steps": 50}
    today = {"learning_rate": OptimConfig().learning_rate, "warmup_steps": None}
    full = train(config(setup, tmp_path / "full", num_epochs=3, **seed_defaults), model=fresh(setup.ens))
    out = tmp_path / "old"
    train(config(setup, out, num_epochs=3, **seed_defaults), model=fresh(setup.ens), stop_after_epoch=1)
    ck = torch.load(out / "checkpoint_last.pt", weights_only=True)
    del ck["resume_view"]["warmup_ratio"]  # as saLM wrote it before the field existed
    torch.save(ck, out / "checkpoint_last.pt")
    capsys.readouterr()
    res = train(config(setup, out, num_epochs=3, resume=True, **today), model=fresh(setup.ens))
    assert "it continues with --learning_rate 0.0001 --warmup_steps 50" in capsys.readouterr().err
    assert all(torch.equal(v, full.model.state_dict()[k]) for k, v in res.model.state_dict().items())
    assert records(out) == records(tmp_path / "full")

    other = tmp_path / "other"
    train(config(setup, other, num_epochs=3, warmup_steps=3), model=fresh(setup.ens), stop_after_epoch=1)
    with pytest.raises(TrainingError, match="warmup_steps: 3 in the checkpoint, None now"):
        train(config(setup, other, num_epochs=3, resume=True, **today), model=fresh(setup.ens))


def test_heads_learn_to_route_to_the_better_member(setup, tmp_path):
    res = train(
        config(setup, tmp_path, num_epochs=4, learning_rate=3e-3, warmup_steps=0, plots=True), model=fresh(setup.ens)
    )
    assert res.best_val_nll < res.initial_val_nll - 0.3
    report = json.loads((tmp_path / "train_report.json").read_text())
    share = report["routing_share_val"]["best"]
    assert set(share) == {"math", "yesno"}
    assert all(max(row, key=row.get) == "tiny-0" for row in share.values())
    assert report["data"]["tokenized"]["train"]["per_dataset"] == {"math": 9, "yesno": 9}
    assert report["metrics"]["best_val"]["val/nll"] == pytest.approx(res.best_val_nll)
    assert report["compute"]["dtype"] == "float32" and report["compute"]["devices"] == ["cpu"]
    for f in ("loss_curves.png", "routing_share.png", "best_model_heads.pt", "final_model/heads.safetensors"):
        assert (tmp_path / f).is_file(), f
    loaded = MultiModelWithScalarHeads.from_pretrained(
        tmp_path / "best_model", base_models=setup.infos, device="cpu"
    ).state_dict()
    seed_file = torch.load(tmp_path / "best_model_heads.pt", weights_only=True)
    assert all(torch.equal(loaded[k], seed_file[k]) for k in loaded)
    best = res.best_model()  # the best-validation heads, ready to evaluate
    assert not best.training and all(torch.equal(best.state_dict()[k], loaded[k]) for k in loaded)


@pytest.mark.parametrize("router", ["confidence", "joint", "aware", "evidence"])
def test_router_variants_and_disagreement_weight_train(setup, tmp_path, router):
    """Each router variant learns with the disagreement-weighted loss; the saved folder says its variant
    and reloads to the same routing; a resume with another variant is refused."""
    res = train(
        config(
            setup, tmp_path, num_epochs=3, learning_rate=3e-3, warmup_steps=0, router=router, disagreement_weight=3.0
        ),
        model=fresh(setup.ens),
    )
    assert res.model.router == router and res.best_val_nll < res.initial_val_nll - 0.3
    loaded = MultiModelWithScalarHeads.from_pretrained(tmp_path / "best_model", base_models=setup.infos, device="cpu")
    assert loaded.router == router
    pt = torch.load(tmp_path / "best_model_heads.pt", weights_only=True)
    assert loaded.state_dict().keys() == pt.keys() and all(
        torch.equal(v, pt[k]) for k, v in loaded.state_dict().items()
    )
    with pytest.raises(TrainingError, match="router"):
        train(
            config(setup, tmp_path, num_epochs=3, resume=True, router="seed", disagreement_weight=3.0),
            model=fresh(setup.ens),
        )


def test_wandb_gets_the_seed_metric_names(setup, tmp_path, monkeypatch):
    logged = []
    fake = types.SimpleNamespace(
        init=lambda **k: types.SimpleNamespace(id="run1"),
        log=lambda d, step: logged.append((step, d)),
        finish=lambda: None,
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(config(setup, tmp_path, num_epochs=1, report_to="wandb"), model=fresh(setup.ens))
    keys = set().union(*(d for _, d in logged))
    for k in ("train/loss", "train/perplexity", "train/learning_rate", "train/nll", "train/entropy",
              "train/model_activation_percent/tiny-0", "train/model_prob_mean/tiny-2", "val/loss", "val/perplexity",
              "val/model_activation_percent/tiny-1"):  # fmt: skip
        assert k in keys, k
    train_rec = next(d for _, d in logged if "train/nll" in d)
    assert train_rec["train/perplexity"] == pytest.approx(torch.tensor(train_rec["train/nll"]).exp().item())

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(TrainingError, match="pip install wandb"):
        train(config(setup, tmp_path / "x", report_to="wandb"), model=fresh(setup.ens))
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(TrainingError, match="pip install tensorboard"):
        train(config(setup, tmp_path / "y", report_to="tensorboard"), model=fresh(setup.ens))


def test_tensorboard_gets_the_same_scalars(setup, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (pip install salm[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(config(setup, out, num_epochs=1, report_to="tensorboard"), model=fresh(setup.ens))
    events = [p for p in out.rglob("events.out.tfevents.*")]
    assert events, "no event file written"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for k in (
        "train/loss",
        "train/perplexity",
        "train/learning_rate",
        "val/loss",
        "val/model_activation_percent/tiny-1",
    ):
        assert k in tags, k
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in logged if "val/loss" in r][-1]
    assert acc.Scalars("val/loss")[-1].value == pytest.approx(last_val["val/loss"], rel=1e-6)


def test_cli_matches_the_seed_command(setup, tmp_path):
    members = tmp_path / "members.yaml"
    members.write_text("".join(f"- id: {m.id}\n  path: {m.path}\n" for m in setup.infos))
    out = tmp_path / "out"
    cmd = [sys.executable, "src/train.py", "--datasets", *setup.files, "--models", str(members),
           "--output_dir", str(out), "--num_epochs", "1", "--batch_size", "2", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "best_model_heads.pt", weights_only=True)
    assert {k.split(".")[1] for k in state} == {"tiny-0", "tiny-1", "tiny-2"}
    assert "projection_heads.tiny-0.non_linear_projection.0.weight" in state
    assert state["projection_heads.tiny-0.non_linear_projection.0.weight"].shape == (256, 32)
    assert any("val/nll" in r for r in records(out)) and any("train/loss" in r for r in records(out))
    assert (out / "best_model" / "heads.safetensors").is_file() and (out / "loss_curves.png").is_file()
    torch.load(out / "checkpoint_last.pt", weights_only=True)


def test_cli_errors_are_one_line_and_exit_2(setup, tmp_path, capsys):
    import argparse

    from salm.commands import train as train_command

    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    args = parser.parse_args(["--datasets", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path)])
    assert train_command.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("salm train: error:") and "missing.jsonl" in err


def test_two_processes_shard_extraction_and_train_with_ddp(setup, tmp_path):
    """``torchrun`` with 2 CPU processes (gloo): each extracts half the examples into the same cache files,
    which must equal a one-process extraction byte for byte; steps per epoch halve; rank 0 writes outputs."""
    members = tmp_path / "members.yaml"
    members.write_text("".join(f"- id: {m.id}\n  path: {m.path}\n" for m in setup.infos))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "src/train.py",
           "--datasets", *setup.files, "--models", str(members), "--output_dir", str(out), "--num_epochs", "1",
           "--batch_size", "2", "--val_fraction", "0.25", "--device", "cpu", "--no_plots",
           "--feature_cache_dir", str(tmp_path / "ddp_cache")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"]["processes"] == 2 and report["steps"]["per_epoch"] == 5  # ceil(18 / (2 * 2))
    one = config(setup, tmp_path / "one", num_epochs=1, batch_size=2, feature_cache_dir=str(tmp_path / "one_cache"))
    train(one, model=fresh(setup.ens))
    (ddp_cache,) = (tmp_path / "ddp_cache").glob("train-*")
    one_cache = tmp_path / "one_cache" / ddp_cache.name
    for f in ("gold.bin", "hidden_0.bin", "hidden_2.bin", "offsets.bin"):
        assert (ddp_cache / f).read_bytes() == (one_cache / f).read_bytes(), f


def test_wandb_offline_run_for_real(setup, tmp_path, monkeypatch):
    pytest.importorskip(
        "wandb", reason="wandb is an optional extra, installed by the dev extra (pip install -e '.[dev]')"
    )
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    train(config(setup, out, num_epochs=1, report_to="wandb"), model=fresh(setup.ens))
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_train_config_parts_round_trip_through_flat_settings():
    """The flat settings (flags, reports, resume views) and the parts are one config: from_flat(settings())
    rebuilds it exactly, each flag lands in its part, and the resume keys are those checkpoints have always had."""
    from salm.heads import HeadConfig
    from salm.training import RESUME_DEFAULTS, RESUME_KEYS

    cfg = TrainConfig.from_flat(
        datasets=["a.jsonl"], batch_size=3, entropy_weight=0.0, disagreement_weight=2.0, head_hidden_dim=16,
        router="joint", max_length=64, seed=7, output_dir="o", progress=True,
    )  # fmt: skip
    assert cfg.optim.batch_size == 3 and cfg.optim.seed == 7 and cfg.data.max_length == 64
    assert cfg.loss.entropy_weight == 0.0 and cfg.loss.disagreement_weight == 2.0
    assert cfg.heads == HeadConfig(hidden_dim=16, router="joint")
    assert TrainConfig.from_flat(**cfg.settings()) == cfg
    assert TrainConfig.from_flat() == TrainConfig() and TrainConfig().heads.router == "aware"
    seed_keys = {
        "datasets", "batch_size", "learning_rate", "warmup_steps", "entropy_weight", "head_hidden_dim",
        "head_dropout", "seed", "max_length", "val_fraction", "max_examples", "loss_on",
    }  # fmt: skip
    # A key added since has the value older checkpoints were trained with.
    assert set(RESUME_KEYS) == seed_keys | {"router", "disagreement_weight", "warmup_ratio", "balance"}
    assert set(RESUME_KEYS) - seed_keys <= set(RESUME_DEFAULTS)
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['head_width'\]"):
        TrainConfig.from_flat(head_width=8)
