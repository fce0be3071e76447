"""Where a run's metrics go: ``metrics.jsonl`` always (:class:`MetricsLog`), and W&B or TensorBoard when
``--report_to`` asks (:func:`make_reporter`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from salm.io import atomic_write_jsonl, atomic_write_text
from salm.training.config import TrainingError


class MetricsLog:
    """``metrics.jsonl``: one JSON object per log step and per validation, flushed as written.

    On resume, records past the checkpoint's step (logged by the interrupted epoch) are dropped before
    appending, so the file never holds a step twice.
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.records: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.records = []
        if self.enabled:
            atomic_write_text(self.path, "")

    def truncate(self, step: int) -> None:
        kept = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by the crash
                    continue
                if isinstance(rec, dict) and rec.get("step", math.inf) <= step:
                    kept.append(rec)
        self.records = kept
        if self.enabled:
            atomic_write_jsonl(self.path, kept, ensure_ascii=True)

    def append(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()


class Reporter:
    """No logging backend (``--report_to none``, and every process but rank 0)."""

    def start(self, out: Path, settings: dict[str, Any]) -> None:
        pass

    def log(self, rec: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class _WandbReporter(Reporter):
    """The seed's wandb metric names; works offline (``WANDB_MODE=offline``). Project: ``$WANDB_PROJECT`` or salm."""

    def __init__(self) -> None:
        try:
            import wandb
        except ImportError as e:
            raise TrainingError("--report_to wandb needs the wandb package: pip install wandb (or salm[wandb])") from e
        self.wandb = wandb
        self.run = None

    def start(self, out: Path, settings: dict[str, Any]) -> None:
        id_file = out / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if settings.get("resume") and id_file.is_file() else None
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "salm"),
            name=out.resolve().name,
            dir=str(out),
            config=settings,
            id=run_id,
            resume="allow" if run_id else None,
        )
        if getattr(self.run, "id", None):
            atomic_write_text(id_file, str(self.run.id))

    def log(self, rec: dict[str, Any], step: int) -> None:
        self.wandb.log({k: v for k, v in rec.items() if "/" in k}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.wandb.finish()


class _TensorBoardReporter(Reporter):
    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrainingError(
                "--report_to tensorboard needs the tensorboard package: pip install tensorboard (or salm[tensorboard])"
            ) from e
        self.cls = SummaryWriter
        self.writer = None

    def start(self, out: Path, settings: dict[str, Any]) -> None:
        self.writer = self.cls(log_dir=str(out / "runs"))
        self.writer.add_text("settings", json.dumps(settings, indent=2))

    def log(self, rec: dict[str, Any], step: int) -> None:
        for k, v in rec.items():
            if "/" in k and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def make_reporter(report_to: str) -> Reporter:
    """The logging backend; imported here (before any work) so a missing package fails at once."""
    return {"none": Reporter, "wandb": _WandbReporter, "tensorboard": _TensorBoardReporter}[report_to]()
