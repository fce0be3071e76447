"""Train the routing heads on frozen members: :func:`train` with a :class:`TrainConfig` (the library behind
``salm train`` and the seed's ``python src/train.py``, whose flags live in :mod:`salm.commands.train`).

:class:`TrainConfig` is composed of parts: :class:`DataConfig` (what to train on), :class:`salm.loss.LossConfig`
(what to minimise), :class:`OptimConfig` (how) and :class:`salm.heads.HeadConfig` (which heads). :func:`train`
reads as its stages: :func:`load_data` -> :func:`build_model` -> :func:`build_features` -> :func:`optimise` ->
:func:`save_and_report`.

The members never change, so by default their features at every loss position are extracted once into
an on-disk cache (:mod:`salm.features`) and every epoch trains the heads on it; ``--no_feature_cache``
runs the members every step, as the seed did, and gives the same losses up to summation order. Both
paths feed the heads the same positions in the same order, so dropout draws the same masks and the two
trajectories match.

Reproducibility: one seed fixes the head initialisation, the per-epoch shuffling (a generator seeded
with ``seed + epoch``) and dropout. A checkpoint after every epoch holds heads, optimizer, scheduler and
RNG state, so a run killed at any moment and resumed with ``--resume`` ends with the same heads as an
uninterrupted run (tested single-process, on CPU). The output folder is locked for the run
(:func:`salm.io.output_lock`), and a non-finite loss, gradient or validation NLL stops it before anything
diverged is applied or saved, naming the step and the last good checkpoint.

Several processes (``accelerate launch`` or ``torchrun``): when ``accelerate.PartialState().num_processes > 1``
each process extracts every ``world``-th example into the shared cache files, the heads are wrapped in
DistributedDataParallel, and each optimizer step takes ``batch_size`` examples per process (so an epoch
has ``ceil(N / (batch_size * world))`` steps). Every process validates on the whole validation split;
only rank 0 writes outputs. Tested: 2 CPU processes (gloo) under torchrun, whose cache is byte-identical
to a one-process cache. Not tested: GPUs/NCCL, several machines (the cache must be on a filesystem all
processes share), and exact resume with several processes (checkpoints hold rank 0's RNG state only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from salm import loss as objective
from salm.cpu import compute_record
from salm.features import (
    CachedFeatures,
    Dist,
    LiveFeatures,
    TokenizedSplit,
    load_or_build,
    tokenize_examples,
)
from salm.heads import ROUTERS, HeadConfig, HeadConfigError
from salm.io import (
    CACHE_ENV,
    atomic_write,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    output_lock,
    report_stale_temporaries,
)
from salm.loss import LossConfig, LossOutput
from salm.plotting import figure, save_png

DEFAULT_DATASETS = ["cola13/gsm8k_formatted", "cola13/medqa_formatted", "cola13/boolq_formatted"]
CHECKPOINT = "checkpoint_last.pt"
METRICS = "metrics.jsonl"
REPORT = "train_report.json"
BEST_HEADS = "best_model_heads.pt"
BEST_DIR = "best_model"
FINAL_DIR = "final_model"
CHECKPOINT_FORMAT = 1
EVAL_BATCH_CACHED = 64  # examples per validation batch on the cache (no member runs, memory is small)
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
            (bool(self.datasets), "--datasets needs at least one dataset"),
        ]
        return [msg for ok, msg in checks if not ok]


@dataclass
class OptimConfig:
    """How the heads are optimised: AdamW with linear warm-up and decay, one seed for every random draw."""

    num_epochs: int = 5
    batch_size: int = 4  # examples per optimizer step (per process)
    learning_rate: float = 1e-4
    warmup_steps: int = 50
    seed: int = 42  # head initialisation, per-epoch shuffling, dropout
    log_every_n_steps: int = 5

    def problems(self) -> list[str]:
        for name in ("num_epochs", "batch_size", "warmup_steps", "seed", "log_every_n_steps"):
            if not _is_int(getattr(self, name)):
                return [f"--{name} must be an integer, got {getattr(self, name)!r}"]
        if not _is_finite(self.learning_rate):
            return [f"--learning_rate must be a finite number, got {self.learning_rate!r}"]
        checks = [
            (self.num_epochs >= 1, f"--num_epochs must be >= 1, got {self.num_epochs}"),
            (self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}"),
            (self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}"),
            (self.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.log_every_n_steps >= 1, f"--log_every_n_steps must be >= 1, got {self.log_every_n_steps}"),
        ]
        return [msg for ok, msg in checks if not ok]


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
    if r not in ROUTERS:
        return f"--router must be one of {', '.join(ROUTERS)}, got {r!r}"
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
LOSS_TERMS = tuple(f.name for f in fields(LossOutput) if f.name != "n_tokens")  # loss, nll, entropy, ...
# What checkpoints written before a resume key existed were trained with: seed heads, and each loss term's
# default (its "off" value).
RESUME_DEFAULTS = {"router": "seed", **LossConfig.resume_defaults()}


@dataclass
class TrainResult:
    output_dir: Path
    epochs_completed: int
    global_step: int
    best_val_nll: float
    best_epoch: int | None
    initial_val_nll: float | None
    final_val: dict[str, Any] | None
    report: dict[str, Any] | None
    model: Any = field(repr=False, default=None)

    def best_model(self) -> Any:
        """The trained ensemble with the best-validation heads (``best_model/``) loaded, in eval mode: the
        last epoch's heads are not the ones to evaluate when validation NLL rose after its best."""
        from salm.ensemble import read_weights

        best = self.output_dir / BEST_DIR
        self.model.load_heads(read_weights(best)[0], source=str(best))
        return self.model.eval()


# ---------------------------------------------------------------------------------------------- pieces
class _Router(nn.Module):
    """The heads as one module (what DDP wraps); the members stay outside it, as in the ensemble."""

    def __init__(self, model: Any):
        super().__init__()
        self.projection_heads = model.projection_heads
        self.__dict__["ensemble"] = model

        if model.joint_router is not None:
            self.joint_router = model.joint_router

    def forward(self, hidden: list[torch.Tensor], stats: torch.Tensor) -> torch.Tensor:
        return self.ensemble.router_logits(hidden, stats)


def _distributed(device: str | None) -> tuple[Dist, torch.device | None]:
    """Rank and world under ``accelerate launch`` (or torchrun); accelerate is only imported when several run.

    ``--device cpu`` (or no GPU) asks accelerate for its CPU backend (gloo), so CPU processes work too.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), None
    try:
        from accelerate import PartialState
    except ImportError:
        raise TrainingError(
            f"training with several processes (WORLD_SIZE={world}, from torchrun or accelerate launch) needs the "
            "accelerate package: pip install 'salm[multigpu]'"
        ) from None

    state = PartialState(cpu=(device or "").startswith("cpu") or not torch.cuda.is_available())
    if state.num_processes != world:
        raise TrainingError(
            f"WORLD_SIZE={world} but accelerate sees {state.num_processes} process(es); every process would write "
            "the same outputs. Launch with accelerate launch (or torchrun) and a matching --device"
        )
    return Dist(state.process_index, state.num_processes, state.wait_for_everyone), state.device


def _reset_heads(model: Any, cfg: TrainConfig) -> None:
    """Fresh heads from the seeded RNG, so initialisation depends on the seed alone."""
    heads = cfg.heads
    if model.head_hidden_dim != heads.hidden_dim:
        raise TrainingError(
            f"the model's heads are {model.head_hidden_dim} wide, --head_hidden_dim is {heads.hidden_dim}"
        )
    model.head_dropout = heads.dropout
    if model.router != heads.router:
        model.build_router(heads.router)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = heads.dropout
        elif m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


class _Stats:
    """Position-weighted sums of the loss terms (every tensor field of :class:`salm.loss.LossOutput`, so a
    new term is logged as ``<prefix>/<field>`` without an edit here) and routing statistics over a window."""

    def __init__(self, n_members: int):
        self.n = 0
        self.sums: dict[str, float] = {name: 0.0 for name in LOSS_TERMS}
        self.top = torch.zeros(n_members, dtype=torch.float64)
        self.prob = torch.zeros(n_members, dtype=torch.float64)

    def add(self, lo: Any, router_logits: torch.Tensor) -> None:
        n = lo.n_tokens
        self.n += n
        for name in self.sums:
            self.sums[name] += float(getattr(lo, name).detach()) * n
        if n:
            probs = torch.softmax(router_logits.detach().float(), -1)
            self.top += torch.bincount(probs.argmax(-1), minlength=probs.shape[-1]).double().cpu()
            self.prob += probs.sum(0).double().cpu()

    def metrics(self, prefix: str, ids: list[str]) -> dict[str, float]:
        n = max(self.n, 1)
        out = {f"{prefix}/{name}": total / n for name, total in self.sums.items()}
        out[f"{prefix}/perplexity"] = math.exp(min(out[f"{prefix}/nll"], 700.0))
        out[f"{prefix}/n_tokens"] = self.n
        for i, mid in enumerate(ids):
            out[f"{prefix}/model_activation_percent/{mid}"] = 100.0 * float(self.top[i]) / n
            out[f"{prefix}/model_prob_mean/{mid}"] = float(self.prob[i]) / n
        return out


def evaluate(
    model: Any, feats: CachedFeatures | LiveFeatures, split: TokenizedSplit, loss: LossConfig, batch: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Validation metrics (``val/...``) and routing share per dataset per member (argmax of routing probs)."""
    ids = list(model.model_ids)
    m = len(ids)
    names = sorted(set(split.datasets))
    ds_index = torch.tensor([names.index(d) for d in split.datasets])
    counts = torch.tensor(split.n_positions)
    stats = _Stats(m)
    share = torch.zeros(len(names) * m, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for a in range(0, len(split), batch):
            idx = list(range(a, min(a + batch, len(split))))
            hidden, gold, cstats = feats.batch(idx, model.device)
            rl = model.router_logits(hidden, cstats)
            stats.add(objective.validation_loss(loss, rl, gold), rl)
            ds = torch.repeat_interleave(ds_index[idx], counts[idx])
            share += torch.bincount(ds * m + rl.argmax(-1).cpu(), minlength=len(names) * m).double()
    model.train(was_training)
    share = share.view(len(names), m)
    totals = share.sum(-1, keepdim=True).clamp(min=1)
    routing = {d: {mid: float(share[j, i] / totals[j, 0]) for i, mid in enumerate(ids)} for j, d in enumerate(names)}
    metrics = stats.metrics("val", ids)
    for d, row in routing.items():
        for mid, v in row.items():
            metrics[f"val/routing_share/{d}/{mid}"] = v
    return metrics, routing


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


class _Reporter:
    def start(self, out: Path, settings: dict[str, Any]) -> None:
        pass

    def log(self, rec: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class _WandbReporter(_Reporter):
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


class _TensorBoardReporter(_Reporter):
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


def make_reporter(report_to: str) -> _Reporter:
    """The logging backend; imported here (before any work) so a missing package fails at once."""
    return {"none": _Reporter, "wandb": _WandbReporter, "tensorboard": _TensorBoardReporter}[report_to]()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def _cpu_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


_CHECKPOINT_KEYS = ("heads", "optimizer", "scheduler", "rng", "epoch", "global_step", "num_epochs", "best_val_nll",
                    "best_epoch", "resume_view")  # fmt: skip


def _load_checkpoint(path: Path) -> dict[str, Any]:
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


def _diverged(what: str, step: int, epoch: int, ckpt: Path, last_good: tuple[int, int] | None) -> str:
    where = (
        f"the last good checkpoint is {ckpt} (epoch {last_good[0]}, step {last_good[1]})"
        if last_good
        else "no checkpoint was written before it"
    )
    return (
        f"training diverged at step {step} (epoch {epoch}): {what} is not finite; this epoch's heads were not "
        "saved. Lower --learning_rate (in a new --output_dir: --resume refuses changed settings) or check the "
        f"data; {where}"
    )


def _check_resume(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    saved = {**RESUME_DEFAULTS, **saved}
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in now if saved.get(k) != now[k]]
    if diffs:
        raise TrainingError(
            f"cannot resume from {path}: settings differ ({'; '.join(diffs)}); use another --output_dir"
        )


# ---------------------------------------------------------------------------------------------- training
def train(
    cfg: TrainConfig,
    model: Any = None,
    data: Any = None,
    *,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Train the heads as ``cfg`` says; ``model``/``data`` may be passed in (tests, benchmarks) to skip loading.

    ``stop_after_epoch`` ends the run right after that epoch's checkpoint, as a kill at that moment
    would (no final outputs), so a later ``resume=True`` run continues the same schedule.
    """
    t_start = time.perf_counter()
    cfg.validate()
    dist, dist_device = _distributed(cfg.device)
    main = dist.rank == 0
    out = Path(cfg.output_dir)
    # One run per output folder: a second one would interleave metrics.jsonl and overwrite the heads.
    with output_lock(out, "salm train") if main else contextlib.nullcontext():
        if main:
            report_stale_temporaries(out, recursive=True, untagged=True, prog="salm train")
            if cfg.feature_cache:
                report_stale_temporaries(cfg.cache_dir(), prog="salm train")
        return _train(cfg, model, data, dist, dist_device, stop_after_epoch, t_start)


def _train(
    cfg: TrainConfig,
    model: Any,
    data: Any,
    dist: Dist,
    dist_device: torch.device | None,
    stop_after_epoch: int | None,
    t_start: float,
) -> TrainResult:
    """load data -> build the model -> build or load features -> optimise -> save and report."""
    run = _Run(cfg, dist, Path(cfg.output_dir))
    run.out.mkdir(parents=True, exist_ok=True)
    reporter = make_reporter(cfg.report_to) if run.main else _Reporter()
    data = run.timed("data_s", load_data, cfg, data, run.main)
    model = run.timed("model_s", build_model, cfg, model, dist_device)
    feats = build_features(run, model, data)
    loop = optimise(run, model, feats, reporter, stop_after_epoch)
    if loop.stopped_early:
        return TrainResult(run.out, loop.epoch, loop.step, loop.best_val, loop.best_epoch, None, None, None, model)
    return save_and_report(run, model, data, feats, loop, t_start)


@dataclass
class _Run:
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
class _Features:
    """The tokenized splits and their member features (the on-disk cache, or live member runs)."""

    train_tok: TokenizedSplit
    val_tok: TokenizedSplit
    train: CachedFeatures | LiveFeatures
    val: CachedFeatures | LiveFeatures
    eval_batch: int
    max_length: int


@dataclass
class _Loop:
    """Where optimisation stands: restored from a checkpoint on resume, advanced by every step and epoch."""

    epoch: int = 0  # epochs completed
    step: int = 0
    best_val: float = math.inf
    best_epoch: int | None = None
    last_good: tuple[int, int] | None = None  # (epoch, step) of the checkpoint on disk from this run
    resumed: bool = False
    stopped_early: bool = False
    steps_per_epoch: int = 0
    log: MetricsLog | None = None


# ---- 1. data
def load_data(cfg: TrainConfig, data: Any, main: bool) -> Any:
    """The train/validation examples (``data`` as given, else loaded from ``cfg.data.datasets``); what was
    skipped or dropped while loading is printed once."""
    if data is None:
        from salm.data import DataFormatError, load_training_sets

        d = cfg.data
        try:
            data = load_training_sets(d.datasets, d.val_fraction, cfg.optim.seed, d.max_examples)
        except DataFormatError:
            raise
        except ValueError as e:  # duplicate names, no validation rows, ...: the user's to fix
            raise TrainingError(str(e)) from e
    if main:
        for name, d in getattr(data, "report", {}).get("datasets", {}).items():
            if d.get("empty_answers_skipped"):
                print(f"{name}: skipped {d['empty_answers_skipped']} row(s) with an empty answer", file=sys.stderr)
            if d.get("val_duplicates_dropped"):
                print(
                    f"{name}: dropped {d['val_duplicates_dropped']} validation row(s) that also occur in training",
                    file=sys.stderr,
                )
    return data


# ---- 2. model
def build_model(cfg: TrainConfig, model: Any, dist_device: torch.device | None) -> Any:
    """The ensemble whose heads are trained (``model`` as given, else the members with ``cfg.heads``)."""
    if model is None:
        from salm.ensemble import MultiModelWithScalarHeads

        model = MultiModelWithScalarHeads(
            cfg.models, head_config=cfg.heads, device=cfg.device or dist_device, dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
        )  # fmt: skip
    return model


# ---- 3. features
def build_features(run: _Run, model: Any, data: Any) -> _Features:
    """Tokenize both splits (reporting truncation), then load or build their member features."""
    cfg, main = run.cfg, run.main
    max_length = cfg.data.max_length
    if model.context_length and max_length > model.context_length:
        warnings.warn(
            f"--max_length {max_length} exceeds the members' context; using {model.context_length}", stacklevel=3
        )
        max_length = model.context_length
    t = time.perf_counter()
    train_tok = tokenize_examples(data.train, model.tokenizer, max_length, cfg.data.loss_on, "train")
    val_tok = tokenize_examples(data.val, model.tokenizer, max_length, cfg.data.loss_on, "val")
    run.timing["tokenize_s"] = time.perf_counter() - t
    if main:
        for s in (train_tok, val_tok):
            _report_truncation(s, max_length)
    t = time.perf_counter()
    if cfg.feature_cache:
        kw = dict(max_length=max_length, loss_on=cfg.data.loss_on, dist=run.dist, progress=cfg.progress and main)
        train_f = load_or_build(model, train_tok, cfg.cache_dir(), **kw)
        val_f = load_or_build(model, val_tok, cfg.cache_dir(), **kw)
        eval_batch = EVAL_BATCH_CACHED
    else:
        train_f, val_f = LiveFeatures(model, train_tok), LiveFeatures(model, val_tok)
        eval_batch = cfg.optim.batch_size
    run.timing["features_s"] = time.perf_counter() - t
    return _Features(train_tok, val_tok, train_f, val_f, eval_batch, max_length)


def _report_truncation(s: TokenizedSplit, max_length: int) -> None:
    if s.prompts_truncated:
        print(
            f"{s.name}: {sum(s.prompts_truncated.values())} of {len(s)} prompts lost their start to fit "
            f"max_length={max_length} (answers kept whole): {s.prompts_truncated}",
            file=sys.stderr,
        )
    if s.answers_truncated:
        print(
            f"{s.name}: {sum(s.answers_truncated.values())} of {len(s)} answers alone exceed max_length="
            f"{max_length} and lost their end: {s.answers_truncated}; raise --max_length",
            file=sys.stderr,
        )


# ---- 4. optimise
def optimise(run: _Run, model: Any, feats: _Features, reporter: _Reporter, stop_after_epoch: int | None) -> _Loop:
    """Fresh heads, AdamW + warm-up schedule, resume from the checkpoint if asked, then the epochs: a
    validation and a checkpoint after each, the best heads saved whenever validation NLL improves."""
    from transformers import get_linear_schedule_with_warmup

    cfg, dist, out = run.cfg, run.dist, run.out
    torch.manual_seed(cfg.optim.seed)
    _reset_heads(model, cfg)
    router: nn.Module = _Router(model)
    device = model.device
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        router = DistributedDataParallel(router, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.learning_rate, weight_decay=0.01)
    global_batch = cfg.optim.batch_size * dist.world
    loop = _Loop(steps_per_epoch=math.ceil(len(feats.train_tok) / global_batch))
    scheduler = get_linear_schedule_with_warmup(
        optimizer, cfg.optim.warmup_steps, loop.steps_per_epoch * cfg.optim.num_epochs
    )
    resume_view = _resume_view(cfg, model, feats, dist)
    ckpt_path = out / CHECKPOINT
    loop.log = MetricsLog(out / METRICS, enabled=run.main)
    _resume_or_start(run, model, optimizer, scheduler, resume_view, loop)
    reporter.start(out, cfg.settings())

    def emit(rec: dict[str, Any]) -> None:
        if run.main:
            loop.log.append(rec)
            reporter.log(rec, rec["step"])

    ids = list(model.model_ids)
    try:
        t = time.perf_counter()
        if not loop.resumed:
            metrics, _ = evaluate(model, feats.val, feats.val_tok, cfg.loss, feats.eval_batch)
            emit({"step": 0, "epoch": 0, **metrics})
        from tqdm.auto import tqdm

        n_train, spe = len(feats.train_tok), loop.steps_per_epoch
        for epoch in range(loop.epoch, cfg.optim.num_epochs):
            model.train()
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.optim.seed + epoch)).tolist()
            window = _Stats(len(ids))
            bar = tqdm(
                range(spe), desc=f"epoch {epoch + 1}/{cfg.optim.num_epochs}", disable=not (cfg.progress and run.main)
            )
            for s in bar:
                idx = order[s * global_batch : (s + 1) * global_batch][dist.rank :: dist.world]
                hidden, gold, cstats = feats.train.batch(idx, device)
                router_logits = router(hidden, cstats)
                lo = objective.training_loss(cfg.loss, router_logits, gold, cstats)
                optimizer.zero_grad(set_to_none=True)
                lo.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                if not (torch.isfinite(lo.loss.detach()) and torch.isfinite(grad_norm)):
                    raise TrainingError(
                        _diverged(f"loss {float(lo.loss.detach()):.4g}, gradient norm {float(grad_norm):.4g}",
                                  loop.step + 1, epoch + 1, ckpt_path, loop.last_good)
                    )  # fmt: skip
                optimizer.step()
                scheduler.step()
                loop.step += 1
                window.add(lo, router_logits)
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{float(lo.loss.detach()):.4f}", lr=f"{lr:.2e}", refresh=False)
                if loop.step % cfg.optim.log_every_n_steps == 0 or s == spe - 1:
                    rec = {"step": loop.step, "epoch": round(epoch + (s + 1) / spe, 4)}
                    rec.update(window.metrics("train", ids))
                    rec["train/learning_rate"] = lr
                    emit(rec)
                    window = _Stats(len(ids))
            bar.close()
            metrics, _ = evaluate(model, feats.val, feats.val_tok, cfg.loss, feats.eval_batch)
            if not math.isfinite(metrics["val/nll"]):
                raise TrainingError(
                    _diverged(f"validation NLL {metrics['val/nll']}", loop.step, epoch + 1, ckpt_path, loop.last_good)
                )
            emit({"step": loop.step, "epoch": epoch + 1, **metrics})
            loop.epoch = epoch + 1
            if metrics["val/nll"] < loop.best_val:
                loop.best_val, loop.best_epoch = metrics["val/nll"], epoch + 1
                if run.main:
                    _save_torch(out / BEST_HEADS, _cpu_state(model))
                    model.save_pretrained(out / BEST_DIR)
            if run.main:
                _save_torch(ckpt_path, _checkpoint(model, optimizer, scheduler, loop, cfg, resume_view))
            loop.last_good = (epoch + 1, loop.step)
            dist.barrier()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.optim.num_epochs:
                loop.stopped_early = True
                return loop
        run.timing["train_s"] = time.perf_counter() - t
    finally:
        reporter.close()
    return loop


def _resume_view(cfg: TrainConfig, model: Any, feats: _Features, dist: Dist) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it: the resume keys, members, data, processes."""
    settings = cfg.settings()
    view = {k: settings[k] for k in RESUME_KEYS}
    view.update(member_ids=list(model.model_ids), train_sha256=feats.train_tok.content_hash(), world=dist.world)
    return view


def _resume_or_start(run: _Run, model: Any, optimizer: Any, scheduler: Any, view: dict[str, Any], loop: _Loop) -> None:
    """With ``--resume`` and a checkpoint: heads, optimizer, schedule, RNG and counters from it (after checking
    it was written with the same settings). Otherwise a fresh run, discarding a previous run's checkpoint."""
    cfg, main, out = run.cfg, run.main, run.out
    ckpt_path = out / CHECKPOINT
    if cfg.resume and ckpt_path.is_file():
        ck = _load_checkpoint(ckpt_path)
        _check_resume(ck["resume_view"], view, ckpt_path)
        if ck["num_epochs"] != cfg.optim.num_epochs:
            warnings.warn(
                f"resuming a {ck['num_epochs']}-epoch run as a {cfg.optim.num_epochs}-epoch run: the learning-rate "
                "schedule changes from here on",
                stacklevel=4,
            )
        model.load_heads(ck["heads"], source=str(ckpt_path))
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
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


def _checkpoint(
    model: Any, optimizer: Any, scheduler: Any, loop: _Loop, cfg: TrainConfig, view: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "heads": _cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "epoch": loop.epoch,
        "global_step": loop.step,
        "num_epochs": cfg.optim.num_epochs,
        "best_val_nll": loop.best_val,
        "best_epoch": loop.best_epoch,
        "resume_view": view,
    }


# ---- 5. save and report
def save_and_report(run: _Run, model: Any, data: Any, feats: _Features, loop: _Loop, t_start: float) -> TrainResult:
    """The final heads, the plots and ``train_report.json`` (rank 0 only)."""
    cfg, out = run.cfg, run.out
    ids = list(model.model_ids)
    model.eval()
    records = loop.log.records
    vals = [r for r in records if "val/nll" in r]
    initial = next((r for r in vals if r["step"] == 0), None)
    best_rec = next((r for r in vals if r["epoch"] == loop.best_epoch), None)
    final_rec = vals[-1] if vals else None
    report = None
    if run.main:
        model.save_pretrained(out / FINAL_DIR)
        routing_best = _routing_from(best_rec, ids)
        if cfg.plots:
            plot_loss_curves(records, out / "loss_curves.png")
            plot_routing_share(routing_best, ids, out / "routing_share.png")
        run.timing["total_s"] = time.perf_counter() - t_start
        report = {
            "settings": cfg.settings(),
            "members": [info.to_dict() for info in model.infos],
            "compute": compute_record(model),
            "data": {
                **getattr(data, "report", {}),
                "tokenized": {s.name: _split_report(s) for s in (feats.train_tok, feats.val_tok)},
                "max_length_used": feats.max_length,
            },
            "metrics": {
                "initial_val": _scalars(initial),
                "best_val": _scalars(best_rec),
                "best_epoch": loop.best_epoch,
                "final_val": _scalars(final_rec),
                "final_train": _scalars(next((r for r in reversed(records) if "train/nll" in r), None)),
            },
            "routing_share_val": {"best": routing_best, "final": _routing_from(final_rec, ids)},
            "feature_cache": _cache_report(cfg, feats),
            "timing": {**{k: round(v, 3) for k, v in run.timing.items()}, "resumed": loop.resumed},
            "steps": {
                "per_epoch": loop.steps_per_epoch,
                "total": loop.step,
                "epochs": cfg.optim.num_epochs,
                "processes": run.dist.world,
            },  # fmt: skip
            "outputs": {  # only what exists: a report never points at a file that was not written
                k: v
                for k, v in (
                    ("best_heads", BEST_HEADS),
                    ("best_model", BEST_DIR),
                    ("final_model", FINAL_DIR),
                    ("checkpoint", CHECKPOINT),
                    ("metrics", METRICS),
                )
                if (out / v).exists()
            },  # fmt: skip
        }
        atomic_write_json(out / REPORT, report)
    run.dist.barrier()
    return TrainResult(
        out,
        cfg.optim.num_epochs,
        loop.step,
        loop.best_val,
        loop.best_epoch,
        initial["val/nll"] if initial else None,
        final_rec,
        report,
        model,
    )


def _cache_report(cfg: TrainConfig, feats: _Features) -> dict[str, Any]:
    if not cfg.feature_cache:
        return {"enabled": False, "dir": None}
    return {
        "enabled": True,
        "dir": str(cfg.cache_dir()),
        **{
            name: {"path": str(getattr(f, "path", "")), "reused": f.reused, "bytes": f.nbytes}
            for name, f in (("train", feats.train), ("val", feats.val))
        },
    }


def _split_report(s: TokenizedSplit) -> dict[str, Any]:
    return {
        "examples": len(s),
        "per_dataset": s.counts(),
        "prompts_truncated": dict(s.prompts_truncated),
        "answers_truncated": dict(s.answers_truncated),
        "loss_positions": sum(s.n_positions),
    }


def _scalars(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    return {k: v for k, v in rec.items() if "/routing_share/" not in k}


def _routing_from(rec: dict[str, Any] | None, ids: list[str]) -> dict[str, dict[str, float]]:
    """Routing share per dataset per member, read back from a validation record's flattened keys."""
    out: dict[str, dict[str, float]] = {}
    for k, v in (rec or {}).items():
        if k.startswith("val/routing_share/"):
            dataset, mid = k[len("val/routing_share/") :].rsplit("/", 1)
            out.setdefault(dataset, {})[mid] = v
    return out


# ---------------------------------------------------------------------------------------------- plots
def plot_loss_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Train and validation NLL (the mixture's, what the loss minimises besides entropy) per step."""
    fig = figure()
    ax = fig.add_subplot()
    tr = [(r["step"], r["train/nll"]) for r in records if "train/nll" in r]
    va = [(r["step"], r["val/nll"]) for r in records if "val/nll" in r]
    if tr:
        ax.plot(*zip(*tr), label="train NLL", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val NLL")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def plot_routing_share(routing: dict[str, dict[str, float]], ids: list[str], path: Path) -> None:
    """Share of validation positions routed (argmax) to each member, per dataset."""
    fig = figure()
    ax = fig.add_subplot()
    names = sorted(routing)
    width = 0.8 / max(len(ids), 1)
    x = np.arange(len(names))
    for i, mid in enumerate(ids):
        ax.bar(x + i * width - 0.4 + width / 2, [routing[d].get(mid, 0.0) for d in names], width, label=mid)
    ax.set_xticks(x, names)
    ax.set_ylabel("share of val positions (argmax)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
