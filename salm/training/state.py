"""What the stages of a run share: the run itself (:class:`Run`), the features it trains on
(:class:`SplitFeatures`) and where optimisation stands (:class:`LoopState`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from salm.features import CachedFeatures, Dist, LiveFeatures, TokenizedSplit
from salm.training.config import Schedule, TrainConfig

if TYPE_CHECKING:
    from salm.training.reporters import MetricsLog


@dataclass
class Run:
    """What every stage shares: the settings, this process's place among the processes, the output folder,
    the stage timings."""

    cfg: TrainConfig
    dist: Dist
    out: Path
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.dist.rank == 0

    def timed(self, key: str, fn: Any, *args: Any) -> Any:
        t = time.perf_counter()
        result = fn(*args)
        self.timing[key] = time.perf_counter() - t
        return result


@dataclass
class SplitFeatures:
    """The tokenized splits and their member features (the on-disk cache, or live member runs)."""

    train_tok: TokenizedSplit
    val_tok: TokenizedSplit
    train: CachedFeatures | LiveFeatures
    val: CachedFeatures | LiveFeatures
    eval_batch: int
    max_length: int


@dataclass
class LoopState:
    """Where optimisation stands: restored from a checkpoint on resume, advanced by every step and epoch."""

    epoch: int = 0  # epochs completed
    step: int = 0
    best_val: float = math.inf
    best_epoch: int | None = None
    last_good: tuple[int, int] | None = None  # (epoch, step) of the checkpoint on disk from this run
    resumed: bool = False
    stopped_early: bool = False
    schedule: Schedule | None = None  # the run's steps and warm-up
    log: MetricsLog | None = None
