"""Faults: no silent wrong results, no lost runs, one clear line (exit 2) for every bad input.

Each test reproduces one failure found by using saLM as a careless user or an adversary would
(issue #10) and failed before its fix. Generation's and the data's own faults are in
``test_generation_faults.py`` and ``test_data_faults.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import salm.loss
from salm import io
from salm.cli import main as cli_main
from salm.ensemble import CONFIG_NAME, WEIGHTS_NAME, MultiModelWithScalarHeads, WeightsError, read_weights
from salm.io import OutputLockedError, output_lock, owner_tag
from salm.members import MemberError
from salm.testing import write_member_set
from salm.training import TrainConfig, TrainingError, train
from salm.training.prepare import distributed
from tests.conftest import fresh, write_jsonl

ROWS = [
    {"question": f"What is {a} plus {b}?", "answer": f"Therefore, the answer is: {a + b}"}
    for a in range(2, 6)
    for b in range(1, 4)
]  # 12 distinct rows


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path: Path, data: Path, **kw) -> TrainConfig:
    base = dict(
        datasets=[str(data)], output_dir=str(tmp_path / "out"), num_epochs=2, batch_size=4, head_hidden_dim=8,
        val_fraction=0.25, warmup_steps=0, learning_rate=1e-3, max_length=48, plots=False, progress=False,
        feature_cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig.from_flat(**base)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------- 1. non-finite training
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"learning_rate": math.inf}, "--learning_rate must be a finite number, got inf"),
        ({"learning_rate": math.nan}, "--learning_rate must be a finite number, got nan"),
        ({"entropy_weight": math.nan}, "--entropy_weight must be a finite number, got nan"),
        ({"entropy_weight": -0.1}, "--entropy_weight must be >= 0"),
        ({"head_dropout": math.nan}, "--head_dropout must be a finite number"),
        ({"val_fraction": math.inf}, "--val_fraction must be a finite number"),
        ({"balance": "upsample"}, "--balance must be truncate or none, got 'upsample'"),
        ({"head_hidden_dim": 0}, "--head_hidden_dim must be >= 2, got 0"),
        ({"head_hidden_dim": -5}, "--head_hidden_dim must be >= 2, got -5"),
        ({"batch_size": 2.5}, "--batch_size must be an integer, got 2.5"),
        ({"device": "gpu"}, "--device 'gpu' is not a device; devices on this machine: cpu"),
    ],
)
def test_every_numeric_flag_is_validated(tmp_path, kw, message):
    with pytest.raises((TrainingError, MemberError), match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(tmp_path, tmp_path / "x.jsonl", **kw).validate()


def test_negative_entropy_weight_needs_the_opt_in(tmp_path):
    _config(tmp_path, tmp_path / "x.jsonl", entropy_weight=-0.1, allow_negative_entropy_weight=True).validate()


def test_cli_refuses_infinite_learning_rate_in_one_line(tmp_path, capsys):
    rc = cli_main(["train", "--datasets", str(tmp_path / "x.jsonl"), "--output_dir", str(tmp_path / "o"),
                   "--learning_rate", "inf"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [
        "salm train: error: --learning_rate must be a finite number, got inf"
    ]
    assert not (tmp_path / "o" / "final_model").exists()


def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tiny_ensemble, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    real = salm.loss.perfect_alignment_loss
    train_calls = [0]
    nan_at = [5]  # 9 training rows, batch 4: 3 steps per epoch, so step 5 is in epoch 2

    def poisoned(*a, **k):
        lo = real(*a, **k)
        if torch.is_grad_enabled():  # a training step (validation runs under no_grad)
            train_calls[0] += 1
            if train_calls[0] == nan_at[0]:
                return dataclasses.replace(lo, loss=lo.loss * math.nan)
        return lo

    monkeypatch.setattr(salm.loss, "perfect_alignment_loss", poisoned)
    cfg = _config(tmp_path, data)
    with pytest.raises(TrainingError) as e:
        train(cfg, model=fresh(tiny_ensemble, head_hidden_dim=8))
    out = Path(cfg.output_dir)
    ckpt = out / "checkpoint_last.pt"
    msg = str(e.value)
    assert "diverged at step 5 (epoch 2)" in msg and f"last good checkpoint is {ckpt} (epoch 1, step 3" in msg
    assert not (out / "final_model").exists() and not (out / "train_report.json").exists()
    for path in (out / "best_model", ckpt):  # what was saved is finite and loads
        kw = dict(members=tiny_ensemble.members, tokenizer=tiny_ensemble.tokenizer, device="cpu")
        MultiModelWithScalarHeads.from_pretrained(path, base_models=tiny_ensemble.infos, **kw)

    # Diverging at the very first step: nothing was saved, and the message says so.
    train_calls[0], nan_at[0] = 0, 1
    with pytest.raises(TrainingError, match="diverged at step 1 .*no checkpoint was written before it"):
        train(_config(tmp_path / "first", data), model=fresh(tiny_ensemble, head_hidden_dim=8))
    assert not (tmp_path / "first" / "out" / "best_model").exists()


# ---------------------------------------------------------------------------------------------- 2. non-finite heads
def test_loading_non_finite_heads_is_refused(tiny_ensemble, tmp_path):
    model = fresh(tiny_ensemble, head_hidden_dim=256)
    model.save_pretrained(tmp_path / "ok")
    state = model.state_dict()
    state["projection_heads.tiny-1.non_linear_projection.0.weight"][0, 0] = math.nan
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ok" / WEIGHTS_NAME))
    with pytest.raises(WeightsError, match=r"NaN or infinite values in 1 tensor\(s\).*tiny-1"):
        kw = dict(members=tiny_ensemble.members, tokenizer=tiny_ensemble.tokenizer, device="cpu")
        MultiModelWithScalarHeads.from_pretrained(tmp_path / "ok", **kw)


# ---------------------------------------------------------------------------------------------- 3. one run per folder
def test_second_train_into_a_locked_folder_fails_at_once(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from salm.io import output_lock\n"
         f"with output_lock({str(out)!r}, 'salm train'):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = cli_main(["train", "--datasets", str(tmp_path / "missing.jsonl"), "--output_dir", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1
        assert f"salm train: error: {out} is in use by another run (PID {holder.pid}, host" in err
        with pytest.raises(OutputLockedError, match=f"PID {holder.pid}"):
            from salm.evaluation.runner import evaluate

            evaluate(None, [], out)
    finally:
        holder.communicate("", timeout=30)
    assert not (out / io.LOCK_NAME).exists()  # released on exit
    with output_lock(out):  # and free again
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    pid = _dead_pid()
    (tmp_path / io.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "h", "command": "salm train"}))
    with output_lock(tmp_path, "salm evaluate"):
        info = json.loads((tmp_path / io.LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["command"] == "salm evaluate"
    assert f"taking over the lock of {tmp_path} left by a process that is no longer running (PID {pid}" in (
        capsys.readouterr().err
    )


def test_another_thread_is_refused_like_another_process(tmp_path):
    errors = []
    with output_lock(tmp_path):
        th = threading.Thread(target=lambda: errors.append(_try_lock(tmp_path)))
        th.start()
        th.join()
    assert errors == [f"PID {os.getpid()}"]


def _try_lock(folder):
    try:
        with output_lock(folder):
            return "acquired"
    except OutputLockedError as e:
        return "PID " + str(e).split("PID ")[1].split(",")[0]


def test_evaluate_cli_fails_before_loading_members_when_locked(tiny_infos, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "qa.jsonl", ROWS[:2])
    members = write_member_set(tmp_path / "m.json", tiny_infos)
    out = tmp_path / "eval"
    argv = ["evaluate", "--models", str(members), "--data", f"qa={data}", "--datasets", "qa", "--output_dir", str(out),
            "--device", "cpu", "--max_new_tokens", "2", "--no_plots"]  # fmt: skip
    th_ready, th_release = threading.Event(), threading.Event()
    fail = lambda *a, **k: pytest.fail("members loaded despite the lock")  # noqa: E731
    monkeypatch.setattr("salm.commands.common.ensemble_from_flags", fail)

    def hold():
        with output_lock(out):
            th_ready.set()
            th_release.wait(30)

    th = threading.Thread(target=hold)
    th.start()
    th_ready.wait(30)
    try:
        assert cli_main(argv) == 2
    finally:
        th_release.set()
        th.join()
    assert f"{out} is in use by another run (PID {os.getpid()}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 4. atomic folders
def test_a_crash_while_saving_leaves_the_previous_folder_whole(tiny_ensemble, tmp_path, monkeypatch):
    import salm.ensemble as ens_mod

    first = fresh(tiny_ensemble, seed=1, head_hidden_dim=8)
    first.save_pretrained(tmp_path / "best_model")
    want = {k: v.clone() for k, v in first.state_dict().items()}
    second = fresh(tiny_ensemble, seed=2, head_hidden_dim=8)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed between the two files")

    monkeypatch.setattr(ens_mod, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path / "best_model")
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path / "new_model")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]  # no half folder, no debris
    state, config = read_weights(tmp_path / "best_model")
    assert config is not None and all(torch.equal(state[k], v) for k, v in want.items())


def test_weights_folder_without_its_config_is_an_error(tiny_ensemble, tmp_path):
    fresh(tiny_ensemble, head_hidden_dim=8).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / CONFIG_NAME).unlink()
    with pytest.raises(WeightsError, match=f"holds {WEIGHTS_NAME} but no {CONFIG_NAME}: an incomplete save"):
        MultiModelWithScalarHeads.from_pretrained(tmp_path / "m")
    with pytest.raises(WeightsError, match="has no salm_config.json beside it naming its members"):
        MultiModelWithScalarHeads.from_pretrained(tmp_path / "m" / WEIGHTS_NAME)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text[: len(text) // 2], r"salm_config.json is not valid JSON \(line \d+, column \d+"),
        (
            lambda text: text.replace('"id": "tiny-0"', '"id": "tiny-0", "colour": "red"'),
            r"member 'tiny-0' has unknown fields \['colour'\]",
        ),
        (lambda text: "[]", "is not a saLM config: it needs a non-empty 'members' list"),
    ],
)
def test_corrupt_config_is_one_clear_error(tiny_ensemble, tmp_path, edit, message):
    fresh(tiny_ensemble, head_hidden_dim=8).save_pretrained(tmp_path / "m")
    cfg = tmp_path / "m" / CONFIG_NAME
    cfg.write_text(edit(cfg.read_text()))
    with pytest.raises(WeightsError, match=message):
        MultiModelWithScalarHeads.from_pretrained(tmp_path / "m")


# ---------------------------------------------------------------------------------------------- 5. temp debris
def test_debris_of_dead_processes_is_removed_at_start_and_reported(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    dead, host = _dead_pid(), io.hostname()
    (out / f".checkpoint_last.pt.{owner_tag(dead)}abc.tmp").write_bytes(b"x" * 1000)
    (out / ".checkpoint_last.pt.k2j3.tmp").write_bytes(b"x" * 24)  # an older saLM's: no owner, folder is ours
    (out / "best_model").mkdir()
    (out / "best_model" / f".heads.safetensors.{owner_tag(dead)}q.tmp").write_bytes(b"x" * 100)
    for owner in (owner_tag(dead), owner_tag(), f"~{dead}@elsewhere~"):
        d = cache / f".train-0123456789abcdef.tmp-{owner}"
        d.mkdir(parents=True)
        (d / "hidden_0.bin").write_bytes(b"x" * 2048)
    legacy = cache / f".val-0123456789abcdef.tmp-{dead}"  # saLM before owner tags
    legacy.mkdir()
    (legacy / "gold.bin").write_bytes(b"x" * 4)
    (out / ".notes.tmp.keep").write_text("not ours")
    cfg = TrainConfig.from_flat(
        datasets=[str(tmp_path / "missing.jsonl")], output_dir=str(out), feature_cache_dir=str(cache)
    )
    with pytest.raises(FileNotFoundError):
        train(cfg)
    err = capsys.readouterr().err
    assert f"removed 3 temporary file(s)/folder(s) left by killed runs in {out} (1.1 KB freed)" in err
    assert f"removed 2 temporary file(s)/folder(s) left by killed runs in {cache} (2.0 KB freed)" in err
    assert sorted(p.name for p in out.iterdir()) == [".notes.tmp.keep", "best_model"]
    assert not list((out / "best_model").iterdir())
    left = sorted(p.name for p in cache.iterdir())
    assert left == sorted(
        [f".train-0123456789abcdef.tmp-{owner_tag()}", f".train-0123456789abcdef.tmp-~{dead}@elsewhere~"]
    )
    assert host in owner_tag()


def test_resume_from_an_unreadable_checkpoint_is_one_clear_error(tiny_ensemble, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = _config(tmp_path, data, num_epochs=1)
    Path(cfg.output_dir).mkdir(parents=True)
    ckpt = Path(cfg.output_dir) / "checkpoint_last.pt"
    for content in (b"", b"PK\x03\x04 truncated zip", b"\x80\x02}q\x00."):
        ckpt.write_bytes(content)
        with pytest.raises(TrainingError, match=f"--resume: cannot read {ckpt} .*Delete it to start afresh"):
            train(dataclasses.replace(cfg, resume=True), model=fresh(tiny_ensemble, head_hidden_dim=8))
    torch.save({"heads": {}}, ckpt)
    with pytest.raises(TrainingError, match="not a saLM training checkpoint"):
        train(dataclasses.replace(cfg, resume=True), model=fresh(tiny_ensemble, head_hidden_dim=8))


def test_several_processes_without_accelerate_name_the_extra(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(TrainingError, match=r"needs the accelerate package: pip install 'salm\[multigpu\]'"):
        distributed("cpu")
