"""``checkpoint_last.pt``: what it holds (heads, optimizer, scheduler, RNG state, counters and the settings
that shaped the trajectory), how ``--resume`` checks and restores it, and the message a diverged run stops
with, naming the last good checkpoint."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from salm.features import Dist
from salm.io import atomic_write
from salm.training.config import (
    CHECKPOINT,
    RESUME_DEFAULTS,
    RESUME_KEYS,
    OptimConfig,
    TrainConfig,
    TrainingError,
)
from salm.training.state import LoopState, Run, SplitFeatures

CHECKPOINT_FORMAT = 1
# salm train's defaults before the warm-up became a share of the run: a run resumed with today's defaults from a
# checkpoint trained with these continues with them, so a run saved before the change resumes as it was.
SEED_OPTIM_DEFAULTS = {"learning_rate": 1e-4, "warmup_steps": 50}
_CHECKPOINT_KEYS = ("heads", "optimizer", "scheduler", "rng", "epoch", "global_step", "num_epochs", "best_val_nll",
                    "best_epoch", "resume_view")  # fmt: skip


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def cpu_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def checkpoint_state(
    model: Any, optimizer: Any, scheduler: Any, loop: LoopState, cfg: TrainConfig, view: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "heads": cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "epoch": loop.epoch,
        "global_step": loop.step,
        "num_epochs": cfg.optim.num_epochs,
        "best_val_nll": loop.best_val,
        "best_epoch": loop.best_epoch,
        "resume_view": view,
    }


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``checkpoint_last.pt`` for ``--resume``; an unreadable, truncated or foreign file is a TrainingError."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, OSError, RuntimeError ... all mean the same here
        raise TrainingError(
            f"--resume: cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it is "
            "truncated or not a saLM checkpoint. Delete it to start afresh, or use another --output_dir"
        ) from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise TrainingError(f"--resume: {path} is not a saLM training checkpoint (missing {missing})")
    return ck


def resume_view(cfg: TrainConfig, model: Any, feats: SplitFeatures, dist: Dist) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it: the resume keys, members, data, processes."""
    settings = cfg.settings()
    view = {k: settings[k] for k in RESUME_KEYS}
    if view["warmup_steps"] is not None:  # the ratio is unused: runs differing only in it are the same run
        view["warmup_ratio"] = None
    view.update(member_ids=list(model.model_ids), train_sha256=feats.train_tok.content_hash(), world=dist.world)
    return view


def check_resume(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    saved = {**RESUME_DEFAULTS, **saved}
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in now if saved.get(k) != now[k]]
    if diffs:
        raise TrainingError(
            f"cannot resume from {path}: settings differ ({'; '.join(diffs)}); use another --output_dir"
        )


def read_for_resume(run: Run) -> dict[str, Any] | None:
    """With ``--resume`` and a checkpoint: the checkpoint, read before the members load (a bad file fails at
    once). A run trained with the seed's optimisation defaults and resumed with today's continues with its own
    (``run.cfg`` changes); every other setting is checked once the members and data are known."""
    path = run.out / CHECKPOINT
    if not (run.cfg.resume and path.is_file()):
        return None
    ck = load_checkpoint(path)
    saved, optim, today = {**RESUME_DEFAULTS, **ck["resume_view"]}, run.cfg.optim, OptimConfig()
    at_defaults = all(getattr(optim, k) == getattr(today, k) for k in (*SEED_OPTIM_DEFAULTS, "warmup_ratio"))
    if at_defaults and saved["warmup_ratio"] is None and all(saved[k] == v for k, v in SEED_OPTIM_DEFAULTS.items()):
        run.cfg = dataclasses.replace(run.cfg, optim=dataclasses.replace(optim, **SEED_OPTIM_DEFAULTS))
        if run.main:
            flags = " ".join(f"--{k} {v:g}" for k, v in SEED_OPTIM_DEFAULTS.items())
            print(f"resuming a run trained with the seed's defaults: it continues with {flags}", file=sys.stderr)
    return ck


def resume_or_start(
    run: Run, model: Any, optimizer: Any, scheduler: Any, view: dict[str, Any], loop: LoopState, ck: dict | None
) -> None:
    """With the checkpoint ``--resume`` read: heads, optimizer, schedule, RNG and counters from it (after
    checking it was written with the same settings). Otherwise a fresh run, discarding a previous run's
    checkpoint."""
    cfg, main, out = run.cfg, run.main, run.out
    ckpt_path = out / CHECKPOINT
    if ck is not None:
        check_resume(ck["resume_view"], view, ckpt_path)
        if ck["num_epochs"] != cfg.optim.num_epochs:
            warnings.warn(
                f"resuming a {ck['num_epochs']}-epoch run as a {cfg.optim.num_epochs}-epoch run: the learning-rate "
                "schedule changes from here on",
                stacklevel=4,
            )
        model.load_heads(ck["heads"], source=str(ckpt_path))
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        loop.epoch, loop.step, loop.best_val, loop.best_epoch = (
            ck["epoch"], ck["global_step"], ck["best_val_nll"], ck["best_epoch"]
        )  # fmt: skip
        loop.last_good = (loop.epoch, loop.step)
        loop.log.truncate(loop.step)
        loop.resumed = True
        if main:
            print(f"resuming from {ckpt_path}: epoch {loop.epoch}, step {loop.step}", file=sys.stderr)
        return
    if cfg.resume and main:
        print(f"--resume: no {ckpt_path} yet; starting a fresh run", file=sys.stderr)
    if main and ckpt_path.is_file():  # a previous run's: never resume it by mistake after this run crashes
        print(f"starting a fresh run in {out}; the previous checkpoint is discarded", file=sys.stderr)
        ckpt_path.unlink()
    loop.log.reset()


def diverged(what: str, step: int, epoch: int, ckpt: Path, last_good: tuple[int, int] | None) -> TrainingError:
    """The error a non-finite loss, gradient or validation NLL stops the run with, before anything is saved."""
    where = (
        f"the last good checkpoint is {ckpt} (epoch {last_good[0]}, step {last_good[1]})"
        if last_good
        else "no checkpoint was written before it"
    )
    return TrainingError(
        f"training diverged at step {step} (epoch {epoch}): {what} is not finite; this epoch's heads were not "
        "saved. Lower --learning_rate (in a new --output_dir: --resume refuses changed settings) or check the "
        f"data; {where}"
    )
