"""What ``salm train`` is asked to do: :class:`TrainConfig` and its parts, checked before any work, and the
names of what a run writes.

:class:`TrainConfig` is composed of parts: :class:`DataConfig` (what to train on), :class:`salm.loss.LossConfig`
(what to minimise), :class:`OptimConfig` (how) and :class:`salm.heads.HeadConfig` (which heads). The flags
are flat; :meth:`TrainConfig.from_flat` and :meth:`TrainConfig.settings` translate.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from salm.data.splits import BALANCE_MODES
from salm.generation import SEED_LIMIT
from salm.heads import HeadConfig, HeadConfigError
from salm.io import CACHE_ENV
from salm.loss import LossConfig
from salm.routers import router_names

DEFAULT_DATASETS = ["cola13/gsm8k_formatted", "cola13/medqa_formatted", "cola13/boolq_formatted"]
# What a run writes in its output folder.
CHECKPOINT = "checkpoint_last.pt"
METRICS = "metrics.jsonl"
REPORT = "train_report.json"
BEST_HEADS = "best_model_heads.pt"
BEST_DIR = "best_model"
FINAL_DIR = "final_model"
# The flat setting names of the head part (salm train's flags; earlier checkpoints' resume keys).
HEAD_FLAGS = {"head_hidden_dim": "hidden_dim", "head_dropout": "dropout", "router": "router"}


class TrainingError(ValueError):
    """A training setup the user must fix (bad settings, unusable data, incompatible checkpoint)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class DataConfig:
    """What the heads are trained on: which rows, how they are tokenized, where the loss applies."""

    datasets: list[str] = field(default_factory=lambda: list(DEFAULT_DATASETS))
    max_length: int = 256  # tokens per example (prompt + answer)
    val_fraction: float = 0.1  # held out when a dataset has no validation split
    max_examples: int | None = None  # first N rows per dataset (quick runs)
    loss_on: str = "answer"  # answer tokens only, or "all" of the text
    balance: str = "truncate"  # mix datasets equally (cut each to the smallest: the seed's rule) or keep "none" cut

    def problems(self) -> list[str]:
        if not _is_int(self.max_length):
            return [f"--max_length must be an integer, got {self.max_length!r}"]
        if not _is_finite(self.val_fraction):
            return [f"--val_fraction must be a finite number, got {self.val_fraction!r}"]
        checks = [
            (self.max_length >= 2, f"--max_length must be >= 2, got {self.max_length}"),
            (0.0 <= self.val_fraction < 1.0, f"--val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.max_examples is None or self.max_examples >= 1, "--max_examples must be >= 1"),
            (self.loss_on in ("answer", "all"), f"--loss_on must be answer or all, got {self.loss_on!r}"),
            (self.balance in BALANCE_MODES, f"--balance must be {' or '.join(BALANCE_MODES)}, got {self.balance!r}"),
            (bool(self.datasets), "--datasets needs at least one dataset"),
        ]
        return [msg for ok, msg in checks if not ok]


SEED_MAX = SEED_LIMIT  # salm.generation.SEED_LIMIT: one seed range everywhere


@dataclass
class OptimConfig:
    """How the heads are optimised: AdamW with linear warm-up and decay, one seed for every random draw.

    The warm-up is ``warmup_ratio`` of the run's optimizer steps (Hugging Face's convention) unless
    ``warmup_steps`` is given, which then means what the seed's flag meant: that many steps, whatever the
    run's length. A fixed 50 steps (the seed's default) was most of a small run: 54 training rows at batch 4
    for 5 epochs are 70 steps.
    """

    num_epochs: int = 5
    batch_size: int = 4  # examples per optimizer step (per process)
    learning_rate: float = 1e-3  # the seed's 1e-4 barely moves the heads in a small run (README "Training")
    warmup_steps: int | None = None  # None: warmup_ratio of the run
    warmup_ratio: float = 0.1  # share of the run's steps spent warming up when warmup_steps is None
    seed: int = 42  # head initialisation, per-epoch shuffling, dropout
    log_every_n_steps: int = 5

    def problems(self) -> list[str]:
        for name in ("num_epochs", "batch_size", "warmup_steps", "seed", "log_every_n_steps"):
            value = getattr(self, name)
            if not _is_int(value) and not (name == "warmup_steps" and value is None):
                return [f"--{name} must be an integer, got {value!r}"]
        for name in ("learning_rate", "warmup_ratio"):
            if not _is_finite(getattr(self, name)):
                return [f"--{name} must be a finite number, got {getattr(self, name)!r}"]
        w = self.warmup_steps
        checks = [
            (self.num_epochs >= 1, f"--num_epochs must be >= 1, got {self.num_epochs}"),
            (self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}"),
            (self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}"),
            (w is None or w >= 0, f"--warmup_steps must be >= 0, got {w}"),
            (0.0 <= self.warmup_ratio < 1.0, f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (0 <= self.seed < SEED_MAX, f"--seed must be in [0, 2**63), got {self.seed}"),
            (self.log_every_n_steps >= 1, f"--log_every_n_steps must be >= 1, got {self.log_every_n_steps}"),
        ]
        return [msg for ok, msg in checks if not ok]

    def schedule(self, n_train: int, world: int = 1) -> Schedule:
        """The optimizer steps of a run on ``n_train`` examples over ``world`` processes, and its warm-up."""
        per_epoch = math.ceil(n_train / (self.batch_size * world))
        total = per_epoch * self.num_epochs
        warmup = self.warmup_steps if self.warmup_steps is not None else math.ceil(total * self.warmup_ratio)
        return Schedule(per_epoch, total, warmup, self.learning_rate)


@dataclass(frozen=True)
class Schedule:
    """A run's optimizer steps and its linear warm-up/decay learning-rate schedule."""

    steps_per_epoch: int
    total: int
    warmup: int
    peak_lr: float

    def lr_sum(self) -> float:
        """The sum of the learning rate over the run's steps: with Adam each step moves a weight by about the
        step's learning rate, so this bounds how far any weight of the heads can move in the whole run."""
        return sum(self.peak_lr * _linear_warmup_decay(step, self.warmup, self.total) for step in range(self.total))

    def too_short(self) -> str | None:
        """One line naming the flags to raise when the run cannot move the heads far, else None."""
        budget = self.lr_sum()
        if budget >= MIN_LR_SUM:
            return None
        steps = f"{self.total} optimizer steps ({self.steps_per_epoch} per epoch, {self.warmup} of warm-up)"
        return (
            f"this run is likely too short to train the heads: {steps} at a peak learning rate of {self.peak_lr:g} "
            f"let a weight move at most {budget:.3g} in all (below {MIN_LR_SUM:g}); raise --learning_rate or "
            "--num_epochs (or lower --batch_size)"
        )


# Below this sum of learning rates a run is warned about. The seed's settings summed to 0.0035 on 54 real rows
# and 0.017 on the knowledge split's 270, and reached 78 % and 81 % of a longer run's validation gain (MedQA then
# routed to the other member; knowledge accuracy 0.954 against 0.982); today's defaults there sum to 0.035 and
# 0.17 and reach 93 % and 99 %; the quickstart's 720 rows train fully at 0.045
# (benchmarks/results/training_defaults.json, README "Training the heads").
MIN_LR_SUM = 0.02


def _linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """transformers' get_linear_schedule_with_warmup, as a multiplier of the peak learning rate at ``step``."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _training_heads() -> HeadConfig:
    # aware is the default router for new training: on the knowledge split it routes the decisive token to the
    # member that knows (0.97 of the oracle's accuracy, against 0.87 for confidence and 0.52 for seed heads),
    # and on the quickstart it is at or below seed heads' NLL in every domain
    # (benchmarks/results/self_aware_routing.json; README "Self-aware routing"). Every other head default is
    # HeadConfig's.
    return HeadConfig(router="aware")


def _head_flag_problem(values: dict[str, Any]) -> str | None:
    """The flag-named message for a head setting HeadConfig refuses (``salm train`` names flags, not fields)."""
    h, p, r = values.get("hidden_dim", 2), values.get("dropout", 0.0), values.get("router", "seed")
    if not _is_int(h):
        return f"--head_hidden_dim must be an integer, got {h!r}"
    if not _is_finite(p):
        return f"--head_dropout must be a finite number, got {p!r}"
    if not 0.0 <= p < 1.0:
        return f"--head_dropout must be in [0, 1), got {p}"
    if h < 2:  # the second layer has head_hidden_dim // 2 units: 0 cannot read the input
        return f"--head_hidden_dim must be >= 2, got {h}"
    if r not in router_names():
        return f"--router must be one of {', '.join(router_names())}, got {r!r}"
    return None


@dataclass
class TrainConfig:
    """Every ``salm train`` setting, as parts: what to train on (``data``), what to minimise (``loss``), how
    (``optim``), which heads (``heads``, a :class:`salm.heads.HeadConfig`), plus where the run reads and writes.

    The flags are flat (``--batch_size``, ``--entropy_weight``, ``--head_hidden_dim``): :meth:`from_flat`
    builds a config from flat names and :meth:`settings` gives them back (what reports, checkpoints'
    resume views and loggers record, unchanged by this split).
    """

    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    heads: HeadConfig = field(default_factory=_training_heads)
    output_dir: str = "./model_outputs"
    models: str | None = None
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    report_to: str = "none"
    resume: bool = False
    feature_cache: bool = True
    feature_cache_dir: str | None = None
    plots: bool = True
    progress: bool = True

    _PARTS = ("data", "loss", "optim")

    @classmethod
    def flat_names(cls) -> set[str]:
        """Every flat setting name (the flags' names)."""
        names = {f.name for f in fields(cls) if f.name not in (*cls._PARTS, "heads")}
        for part in (DataConfig, LossConfig, OptimConfig):
            names |= {f.name for f in fields(part)}
        return names | set(HEAD_FLAGS)

    @classmethod
    def from_flat(cls, **settings: Any) -> TrainConfig:
        """A config from flat settings (flag names), as ``salm train``, the quickstart and tests give them.

        An unknown name is a TypeError naming it; a head setting :class:`HeadConfig` refuses is a
        :class:`TrainingError` naming the flag.
        """
        unknown = sorted(set(settings) - cls.flat_names())
        if unknown:
            raise TypeError(f"TrainConfig.from_flat: unknown setting(s) {unknown}")
        parts: dict[str, Any] = {}
        for name, part in (("data", DataConfig), ("loss", LossConfig), ("optim", OptimConfig)):
            own = {f.name for f in fields(part)}
            parts[name] = part(**{k: v for k, v in settings.items() if k in own})
        head_values = {HEAD_FLAGS[k]: v for k, v in settings.items() if k in HEAD_FLAGS}
        try:
            parts["heads"] = dataclasses.replace(_training_heads(), **head_values)
        except HeadConfigError as e:
            raise TrainingError(_head_flag_problem(head_values) or str(e)) from None
        rest = {k: v for k, v in settings.items() if k in {f.name for f in fields(cls)}}
        return cls(**parts, **rest)

    def validate(self) -> None:
        """Every setting checked before any work: a NaN or infinite number would train heads into NaN."""
        problems = [*self.optim.problems(), *self.data.problems(), *self.loss.problems()]
        if self.report_to not in ("none", "wandb", "tensorboard"):
            problems.append(f"unknown --report_to {self.report_to!r}")
        if problems:
            raise TrainingError(problems[0])
        from salm.members import resolve_device

        resolve_device(self.device)  # a MemberError naming the devices this machine has

    def settings(self) -> dict[str, Any]:
        """The flat settings (flag names; ``progress`` left out): what reports and checkpoints record."""
        d = {**asdict(self.data), **asdict(self.optim), **asdict(self.loss)}
        d.update({flag: getattr(self.heads, name) for flag, name in HEAD_FLAGS.items()})
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in (*self._PARTS, "heads")})
        d.pop("progress")
        return d

    @staticmethod
    def resume_keys() -> tuple[str, ...]:
        """Settings a resumed run must share with its checkpoint: everything that changes the trajectory
        (``num_epochs`` may grow, the schedule then changes; logging does not count)."""
        optim = tuple(f.name for f in fields(OptimConfig) if f.name not in ("num_epochs", "log_every_n_steps"))
        return (*(f.name for f in fields(DataConfig)), *optim, *LossConfig.resume_keys(), *HEAD_FLAGS)

    def cache_dir(self) -> Path:
        if self.feature_cache_dir:
            return Path(self.feature_cache_dir).expanduser()
        if os.environ.get(CACHE_ENV):
            return Path(os.environ[CACHE_ENV]).expanduser() / "features"
        return Path(self.output_dir) / "feature_cache"


RESUME_KEYS = TrainConfig.resume_keys()
# What checkpoints written before a resume key existed were trained with: seed heads, and each loss term's
# default (its "off" value).
# default (its "off" value); warmup_ratio did not exist, the warm-up was always --warmup_steps (views record no
# ratio when --warmup_steps is given: it does not change the run then).
RESUME_DEFAULTS = {"router": "seed", "warmup_ratio": None, "balance": "truncate", **LossConfig.resume_defaults()}
