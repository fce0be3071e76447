"""Checkpoints of a finetune: enough to continue it as if it had never stopped.

``<output_dir>/checkpoint/`` holds ``adapter.safetensors`` (the adapters' weights) and ``state.pt`` (optimizer,
schedule, RNG state, step, loss curve and the settings it was made with), replaced as one folder
(:func:`salm.io.atomic_dir`), so a kill at any moment leaves the previous complete checkpoint. The batches
of a step depend only on the seed and the step, so weights + optimizer + RNG at step k is the whole state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salm.finetune.config import FinetuneError
from salm.finetune.model import load_trainable_state, trainable_state
from salm.training.checkpoints import rng_state, set_rng_state

CHECKPOINT_DIR = "checkpoint"
WEIGHTS = "adapter.safetensors"
STATE = "state.pt"
FORMAT = 1
_KEYS = ("format", "optimizer", "scheduler", "rng", "step", "curve", "eval_before", "resume_view")


@dataclass
class Progress:
    """Where a finetune stands: restored from a checkpoint, advanced by every optimizer step."""

    step: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)  # one record per optimizer step
    eval_before: float | None = None
    resumed_from: int | None = None


def save(out: Path, model: Any, optimizer: Any, scheduler: Any, progress: Progress, view: dict[str, Any]) -> Path:
    """Write the checkpoint of ``progress.step`` atomically (the previous one stays until this one is whole)."""
    from safetensors.torch import save_file

    from salm.io import atomic_dir

    state = {
        "format": FORMAT, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rng_state(), "step": progress.step, "curve": progress.curve, "eval_before": progress.eval_before,
        "resume_view": view,
    }  # fmt: skip
    with atomic_dir(out / CHECKPOINT_DIR) as tmp:
        save_file(trainable_state(model), str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
    return out / CHECKPOINT_DIR


def restore(out: Path, model: Any, optimizer: Any, scheduler: Any, view: dict[str, Any]) -> Progress:
    """Load the checkpoint in ``out`` into the model, optimizer, schedule and RNG; refuse one made otherwise."""
    from safetensors.torch import load_file

    folder = out / CHECKPOINT_DIR
    try:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        weights = load_file(str(folder / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - unpickling, safetensors and OS errors all mean "unreadable"
        first = str(e).splitlines()[0] if str(e) else ""
        raise FinetuneError(
            f"--resume: cannot read the checkpoint in {folder} ({type(e).__name__}: {first}); delete it to start "
            "afresh, or use another --output_dir"
        ) from None
    missing = [k for k in _KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise FinetuneError(f"--resume: {folder / STATE} is not a salm finetune checkpoint (missing {missing})")
    diffs = [f"{k}: {state['resume_view'].get(k)!r} there, {v!r} now" for k, v in view.items()
             if state["resume_view"].get(k) != v]  # fmt: skip
    if diffs:
        raise FinetuneError(
            f"--resume: the checkpoint in {folder} was made with other settings ({'; '.join(diffs)}); use another "
            "--output_dir"
        )
    load_trainable_state(model, weights, str(folder / WEIGHTS))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Progress(state["step"], list(state["curve"]), state["eval_before"], resumed_from=state["step"])


def exists(out: Path) -> bool:
    return (out / CHECKPOINT_DIR / STATE).is_file()
