"""``salm train`` (and the seed's ``python src/train.py``): train the routing heads on frozen members.

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
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from salm.features import (
    CachedFeatures,
    Dist,
    LiveFeatures,
    TokenizedSplit,
    load_or_build,
    tokenize_examples,
)
from salm.heads import ROUTERS
from salm.io import (
    CACHE_ENV,
    atomic_write,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    output_lock,
    report_stale_temporaries,
)
from salm.loss import disagreement_weights, perfect_alignment_loss
from salm.plotting import figure, save_png

DEFAULT_DATASETS = ["cola13/gsm8k_formatted", "cola13/medqa_formatted", "cola13/boolq_formatted"]
CHECKPOINT = "checkpoint_last.pt"
METRICS = "metrics.jsonl"
REPORT = "train_report.json"
BEST_HEADS = "best_model_heads.pt"
BEST_DIR = "best_model"
FINAL_DIR = "final_model"
CHECKPOINT_FORMAT = 1
# Settings a resumed run must share with the checkpoint (num_epochs may grow; the schedule then changes).
RESUME_KEYS = (
    "datasets", "batch_size", "learning_rate", "warmup_steps", "entropy_weight", "head_hidden_dim",
    "head_dropout", "seed", "max_length", "val_fraction", "max_examples", "loss_on", "router", "disagreement_weight",
)  # fmt: skip
# What checkpoints written before a resume key existed were trained with.
RESUME_DEFAULTS = {"router": "seed", "disagreement_weight": 1.0}
EVAL_BATCH_CACHED = 64  # examples per validation batch on the cache (no member runs, memory is small)


class TrainingError(ValueError):
    """A training setup the user must fix (bad settings, unusable data, incompatible checkpoint)."""


@dataclass
class TrainConfig:
    """Every ``salm train`` setting; field names are the flags' names."""

    datasets: list[str] = field(default_factory=lambda: list(DEFAULT_DATASETS))
    output_dir: str = "./model_outputs"
    num_epochs: int = 5
    batch_size: int = 4
    learning_rate: float = 1e-4
    warmup_steps: int = 50
    entropy_weight: float = 0.1
    head_hidden_dim: int = 256
    head_dropout: float = 0.1
    # seed | confidence | joint (salm.heads). confidence is the default for new training: on the knowledge
    # split it routes the decisive token to the member that knows far more often than seed heads
    # (benchmarks/results/self_aware_routing.json; README "Self-aware routing").
    router: str = "confidence"
    disagreement_weight: float = 1.0  # loss weight of positions where the members' argmax tokens differ
    seed: int = 42
    log_every_n_steps: int = 5
    models: str | None = None
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    max_length: int = 256
    val_fraction: float = 0.1
    max_examples: int | None = None
    loss_on: str = "answer"
    report_to: str = "none"
    resume: bool = False
    feature_cache: bool = True
    feature_cache_dir: str | None = None
    plots: bool = True
    progress: bool = True
    allow_negative_entropy_weight: bool = False

    @classmethod
    def flat_names(cls) -> set[str]:
        """Every setting's name (the flags' names)."""
        return set(cls.__dataclass_fields__)

    @classmethod
    def from_flat(cls, **settings: Any) -> TrainConfig:
        """A config from flat settings (flag names), as ``salm train`` and the quickstart give them."""
        return cls(**settings)

    def validate(self) -> None:
        """Every setting checked before any work: a NaN or infinite number would train heads into NaN."""
        ints = ("num_epochs", "batch_size", "warmup_steps", "head_hidden_dim", "seed", "log_every_n_steps")
        for name in (*ints, "max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TrainingError(f"--{name} must be an integer, got {v!r}")
        for name in ("learning_rate", "entropy_weight", "head_dropout", "val_fraction"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise TrainingError(f"--{name} must be a finite number, got {v!r}")
        checks = [
            (self.num_epochs >= 1, f"--num_epochs must be >= 1, got {self.num_epochs}"),
            (self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}"),
            (self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}"),
            (self.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.log_every_n_steps >= 1, f"--log_every_n_steps must be >= 1, got {self.log_every_n_steps}"),
            (self.max_length >= 2, f"--max_length must be >= 2, got {self.max_length}"),
            (0.0 <= self.val_fraction < 1.0, f"--val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.max_examples is None or self.max_examples >= 1, "--max_examples must be >= 1"),
            (self.loss_on in ("answer", "all"), f"--loss_on must be answer or all, got {self.loss_on!r}"),
            (self.report_to in ("none", "wandb", "tensorboard"), f"unknown --report_to {self.report_to!r}"),
            (0.0 <= self.head_dropout < 1.0, f"--head_dropout must be in [0, 1), got {self.head_dropout}"),
            (
                self.head_hidden_dim >= 2,  # the second layer has head_hidden_dim // 2 units: 0 cannot read the input
                f"--head_hidden_dim must be >= 2, got {self.head_hidden_dim}",
            ),
            (
                self.entropy_weight >= 0 or self.allow_negative_entropy_weight,
                f"--entropy_weight must be >= 0 (a negative weight rewards confident routing; pass "
                f"--allow_negative_entropy_weight if that is meant), got {self.entropy_weight}",
            ),
            (self.router in ROUTERS, f"--router must be one of {', '.join(ROUTERS)}, got {self.router!r}"),
            (self.disagreement_weight > 0, f"--disagreement_weight must be > 0, got {self.disagreement_weight}"),
            (bool(self.datasets), "--datasets needs at least one dataset"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainingError(msg)
        from salm.members import resolve_device

        resolve_device(self.device)  # a MemberError naming the devices this machine has

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("progress")
        return d

    def cache_dir(self) -> Path:
        if self.feature_cache_dir:
            return Path(self.feature_cache_dir).expanduser()
        if os.environ.get(CACHE_ENV):
            return Path(os.environ[CACHE_ENV]).expanduser() / "features"
        return Path(self.output_dir) / "feature_cache"


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
    if model.head_hidden_dim != cfg.head_hidden_dim:
        raise TrainingError(
            f"the model's heads are {model.head_hidden_dim} wide, --head_hidden_dim is {cfg.head_hidden_dim}"
        )
    model.head_dropout = cfg.head_dropout
    if model.router != cfg.router:
        model.build_router(cfg.router)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = cfg.head_dropout
        elif m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


class _Stats:
    """Position-weighted sums of the loss terms and routing statistics over a window of batches."""

    def __init__(self, n_members: int):
        self.n = 0
        self.loss = self.nll = self.entropy = 0.0
        self.top = torch.zeros(n_members, dtype=torch.float64)
        self.prob = torch.zeros(n_members, dtype=torch.float64)

    def add(self, lo: Any, router_logits: torch.Tensor) -> None:
        n = lo.n_tokens
        self.n += n
        self.loss += float(lo.loss.detach()) * n
        self.nll += float(lo.nll.detach()) * n
        self.entropy += float(lo.entropy.detach()) * n
        if n:
            probs = torch.softmax(router_logits.detach().float(), -1)
            self.top += torch.bincount(probs.argmax(-1), minlength=probs.shape[-1]).double().cpu()
            self.prob += probs.sum(0).double().cpu()

    def metrics(self, prefix: str, ids: list[str]) -> dict[str, float]:
        n = max(self.n, 1)
        nll = self.nll / n
        out = {
            f"{prefix}/loss": self.loss / n,
            f"{prefix}/nll": nll,
            f"{prefix}/entropy": self.entropy / n,
            f"{prefix}/perplexity": math.exp(min(nll, 700.0)),
            f"{prefix}/n_tokens": self.n,
        }
        for i, mid in enumerate(ids):
            out[f"{prefix}/model_activation_percent/{mid}"] = 100.0 * float(self.top[i]) / n
            out[f"{prefix}/model_prob_mean/{mid}"] = float(self.prob[i]) / n
        return out


def evaluate(
    model: Any, feats: CachedFeatures | LiveFeatures, split: TokenizedSplit, entropy_weight: float, batch: int
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
            stats.add(perfect_alignment_loss(rl, gold, None, entropy_weight), rl)
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
    timing: dict[str, float] = {}
    main = dist.rank == 0
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reporter = make_reporter(cfg.report_to) if main else _Reporter()

    t = time.perf_counter()
    if data is None:
        from salm.data import DataFormatError, load_training_sets

        try:
            data = load_training_sets(cfg.datasets, cfg.val_fraction, cfg.seed, cfg.max_examples)
        except DataFormatError:
            raise
        except ValueError as e:  # duplicate names, no validation rows, ...: the user's to fix
            raise TrainingError(str(e)) from e
    timing["data_s"] = time.perf_counter() - t
    if main:
        for name, d in getattr(data, "report", {}).get("datasets", {}).items():
            if d.get("empty_answers_skipped"):
                print(f"{name}: skipped {d['empty_answers_skipped']} row(s) with an empty answer", file=sys.stderr)
            if d.get("val_duplicates_dropped"):
                print(
                    f"{name}: dropped {d['val_duplicates_dropped']} validation row(s) that also occur in training",
                    file=sys.stderr,
                )

    t = time.perf_counter()
    if model is None:
        from salm.ensemble import MultiModelWithScalarHeads

        model = MultiModelWithScalarHeads(
            cfg.models, cfg.head_hidden_dim, cfg.head_dropout, device=cfg.device or dist_device, dtype=cfg.dtype,
            router=cfg.router, trust_remote_code=cfg.trust_remote_code,
        )  # fmt: skip
    timing["model_s"] = time.perf_counter() - t
    device = model.device
    ids = list(model.model_ids)

    max_length = cfg.max_length
    if model.context_length and max_length > model.context_length:
        warnings.warn(
            f"--max_length {max_length} exceeds the members' context; using {model.context_length}", stacklevel=2
        )
        max_length = model.context_length
    t = time.perf_counter()
    train_tok = tokenize_examples(data.train, model.tokenizer, max_length, cfg.loss_on, "train")
    val_tok = tokenize_examples(data.val, model.tokenizer, max_length, cfg.loss_on, "val")
    timing["tokenize_s"] = time.perf_counter() - t
    for s in (train_tok, val_tok):
        if s.prompts_truncated and main:
            print(
                f"{s.name}: {sum(s.prompts_truncated.values())} of {len(s)} prompts lost their start to fit "
                f"max_length={max_length} (answers kept whole): {s.prompts_truncated}",
                file=sys.stderr,
            )
        if s.answers_truncated and main:
            print(
                f"{s.name}: {sum(s.answers_truncated.values())} of {len(s)} answers alone exceed max_length="
                f"{max_length} and lost their end: {s.answers_truncated}; raise --max_length",
                file=sys.stderr,
            )

    t = time.perf_counter()
    if cfg.feature_cache:
        kw = dict(max_length=max_length, loss_on=cfg.loss_on, dist=dist, progress=cfg.progress and main)
        train_f = load_or_build(model, train_tok, cfg.cache_dir(), **kw)
        val_f = load_or_build(model, val_tok, cfg.cache_dir(), **kw)
        eval_batch = EVAL_BATCH_CACHED
    else:
        train_f, val_f = LiveFeatures(model, train_tok), LiveFeatures(model, val_tok)
        eval_batch = cfg.batch_size
    timing["features_s"] = time.perf_counter() - t

    # ---- heads, optimizer, schedule
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(cfg.seed)
    _reset_heads(model, cfg)
    router: nn.Module = _Router(model)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        router = DistributedDataParallel(router, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)
    n_train = len(train_tok)
    global_batch = cfg.batch_size * dist.world
    steps_per_epoch = math.ceil(n_train / global_batch)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, steps_per_epoch * cfg.num_epochs)

    settings = cfg.settings()
    resume_view = {k: settings[k] for k in RESUME_KEYS}
    resume_view.update(member_ids=ids, train_sha256=train_tok.content_hash(), world=dist.world)
    start_epoch, step, best_val, best_epoch = 0, 0, math.inf, None
    log = MetricsLog(out / METRICS, enabled=main)
    ckpt_path = out / CHECKPOINT
    resumed = False
    last_good: tuple[int, int] | None = None  # (epoch, step) of the checkpoint on disk from this run
    if cfg.resume and ckpt_path.is_file():
        ck = _load_checkpoint(ckpt_path)
        _check_resume(ck["resume_view"], resume_view, ckpt_path)
        if ck["num_epochs"] != cfg.num_epochs:
            warnings.warn(
                f"resuming a {ck['num_epochs']}-epoch run as a {cfg.num_epochs}-epoch run: the learning-rate "
                "schedule changes from here on",
                stacklevel=2,
            )
        model.load_heads(ck["heads"], source=str(ckpt_path))
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        start_epoch, step, best_val, best_epoch = ck["epoch"], ck["global_step"], ck["best_val_nll"], ck["best_epoch"]
        last_good = (start_epoch, step)
        log.truncate(step)
        resumed = True
        if main:
            print(f"resuming from {ckpt_path}: epoch {start_epoch}, step {step}", file=sys.stderr)
    else:
        if cfg.resume and main:
            print(f"--resume: no {ckpt_path} yet; starting a fresh run", file=sys.stderr)
        if main and ckpt_path.is_file():  # a previous run's: never resume it by mistake after this run crashes
            print(f"starting a fresh run in {out}; the previous checkpoint is discarded", file=sys.stderr)
            ckpt_path.unlink()
        log.reset()
    reporter.start(out, settings)

    def emit(rec: dict[str, Any]) -> None:
        if main:
            log.append(rec)
            reporter.log(rec, rec["step"])

    try:
        t = time.perf_counter()
        if not resumed:
            metrics, _ = evaluate(model, val_f, val_tok, cfg.entropy_weight, eval_batch)
            emit({"step": 0, "epoch": 0, **metrics})
        from tqdm.auto import tqdm

        for epoch in range(start_epoch, cfg.num_epochs):
            model.train()
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
            window = _Stats(len(ids))
            bar = tqdm(
                range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.num_epochs}", disable=not (cfg.progress and main)
            )
            for s in bar:
                idx = order[s * global_batch : (s + 1) * global_batch][dist.rank :: dist.world]
                hidden, gold, cstats = train_f.batch(idx, device)
                router_logits = router(hidden, cstats)
                weights = disagreement_weights(cstats, cfg.disagreement_weight)
                lo = perfect_alignment_loss(router_logits, gold, None, cfg.entropy_weight, weights)
                optimizer.zero_grad(set_to_none=True)
                lo.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                if not (torch.isfinite(lo.loss.detach()) and torch.isfinite(grad_norm)):
                    raise TrainingError(
                        _diverged(f"loss {float(lo.loss.detach()):.4g}, gradient norm {float(grad_norm):.4g}", step + 1,
                                  epoch + 1, ckpt_path, last_good)
                    )  # fmt: skip
                optimizer.step()
                scheduler.step()
                step += 1
                window.add(lo, router_logits)
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{float(lo.loss.detach()):.4f}", lr=f"{lr:.2e}", refresh=False)
                if step % cfg.log_every_n_steps == 0 or s == steps_per_epoch - 1:
                    rec = {"step": step, "epoch": round(epoch + (s + 1) / steps_per_epoch, 4)}
                    rec.update(window.metrics("train", ids))
                    rec["train/learning_rate"] = lr
                    emit(rec)
                    window = _Stats(len(ids))
            bar.close()
            metrics, _ = evaluate(model, val_f, val_tok, cfg.entropy_weight, eval_batch)
            if not math.isfinite(metrics["val/nll"]):
                raise TrainingError(
                    _diverged(f"validation NLL {metrics['val/nll']}", step, epoch + 1, ckpt_path, last_good)
                )
            emit({"step": step, "epoch": epoch + 1, **metrics})
            if metrics["val/nll"] < best_val:
                best_val, best_epoch = metrics["val/nll"], epoch + 1
                if main:
                    _save_torch(out / BEST_HEADS, _cpu_state(model))
                    model.save_pretrained(out / BEST_DIR)
            if main:
                _save_torch(
                    ckpt_path,
                    {
                        "format": CHECKPOINT_FORMAT,
                        "heads": _cpu_state(model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": _rng_state(),
                        "epoch": epoch + 1,
                        "global_step": step,
                        "num_epochs": cfg.num_epochs,
                        "best_val_nll": best_val,
                        "best_epoch": best_epoch,
                        "resume_view": resume_view,
                    },
                )
            last_good = (epoch + 1, step)
            dist.barrier()
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.num_epochs:
                return TrainResult(out, epoch + 1, step, best_val, best_epoch, None, None, None, model)
        timing["train_s"] = time.perf_counter() - t
    finally:
        reporter.close()

    # ---- final outputs
    model.eval()
    vals = [r for r in log.records if "val/nll" in r]
    initial = next((r for r in vals if r["step"] == 0), None)
    best_rec = next((r for r in vals if r["epoch"] == best_epoch), None)
    final_rec = vals[-1] if vals else None
    report = None
    if main:
        model.save_pretrained(out / FINAL_DIR)
        routing_best = _routing_from(best_rec, ids)
        if cfg.plots:
            plot_loss_curves(log.records, out / "loss_curves.png")
            plot_routing_share(routing_best, ids, out / "routing_share.png")
        timing["total_s"] = time.perf_counter() - t_start
        report = {
            "settings": settings,
            "members": [info.to_dict() for info in model.infos],
            "data": {
                **getattr(data, "report", {}),
                "tokenized": {s.name: _split_report(s) for s in (train_tok, val_tok)},
                "max_length_used": max_length,
            },
            "metrics": {
                "initial_val": _scalars(initial),
                "best_val": _scalars(best_rec),
                "best_epoch": best_epoch,
                "final_val": _scalars(final_rec),
                "final_train": _scalars(next((r for r in reversed(log.records) if "train/nll" in r), None)),
            },
            "routing_share_val": {"best": routing_best, "final": _routing_from(final_rec, ids)},
            "feature_cache": {
                "enabled": cfg.feature_cache,
                "dir": str(cfg.cache_dir()) if cfg.feature_cache else None,
                **{
                    name: {"path": str(getattr(f, "path", "")), "reused": f.reused, "bytes": f.nbytes}
                    for name, f in (("train", train_f), ("val", val_f))
                    if cfg.feature_cache
                },
            },
            "timing": {**{k: round(v, 3) for k, v in timing.items()}, "resumed": resumed},
            "steps": {"per_epoch": steps_per_epoch, "total": step, "epochs": cfg.num_epochs, "processes": dist.world},
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
    dist.barrier()
    return TrainResult(
        out,
        cfg.num_epochs,
        step,
        best_val,
        best_epoch,
        initial["val/nll"] if initial else None,
        final_rec,
        report,
        model,
    )


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
