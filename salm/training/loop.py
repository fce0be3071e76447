"""The optimisation: :func:`optimise` runs the epochs (AdamW, linear warm-up and decay, clipping at 1.0), a
validation (:func:`evaluate`) and a checkpoint after each, the best heads saved whenever validation NLL
improves. The per-epoch order comes from a generator seeded with ``seed + epoch``, so a resumed run
draws what an uninterrupted one would."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from salm import loss as objective
from salm.features import CachedFeatures, LiveFeatures, TokenizedSplit
from salm.loss import LossConfig, LossOutput
from salm.training.checkpoints import (
    checkpoint_state,
    cpu_state,
    diverged,
    resume_or_start,
    resume_view,
    save_torch,
)
from salm.training.config import BEST_DIR, BEST_HEADS, CHECKPOINT, METRICS, Schedule, TrainConfig, TrainingError
from salm.training.reporters import MetricsLog, Reporter
from salm.training.state import LoopState, Run, SplitFeatures

LOSS_TERMS = tuple(f.name for f in fields(LossOutput) if f.name != "n_tokens")  # loss, nll, entropy, ...
Emit = Callable[[dict[str, Any]], None]


class Stats:
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
    stats = Stats(m)
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


@dataclass
class Optimiser:
    """The heads as one module (DDP-wrapped with several processes), their parameters, AdamW and the
    warm-up/decay schedule."""

    router: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any

    @classmethod
    def build(cls, run: Run, model: Any, schedule: Schedule) -> Optimiser:
        from transformers import get_linear_schedule_with_warmup

        router: nn.Module = model.router_module  # the heads as one module (what DDP wraps); members stay outside
        if run.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            device = model.device
            router = DistributedDataParallel(router, device_ids=[device.index] if device.type == "cuda" else None)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=schedule.peak_lr, weight_decay=0.01)
        scheduler = get_linear_schedule_with_warmup(optimizer, schedule.warmup, schedule.total)
        return cls(router, params, optimizer, scheduler)


def optimise(
    run: Run,
    model: Any,
    feats: SplitFeatures,
    reporter: Reporter,
    checkpoint: dict[str, Any] | None,
    stop_after_epoch: int | None,
) -> LoopState:
    """Fresh heads, AdamW + warm-up schedule, resume from ``checkpoint`` if given, then the epochs: a
    validation and a checkpoint after each, the best heads saved whenever validation NLL improves."""
    cfg = run.cfg
    torch.manual_seed(cfg.optim.seed)
    reset_heads(model, cfg)
    loop = LoopState(schedule=cfg.optim.schedule(len(feats.train_tok), run.dist.world))
    opt = Optimiser.build(run, model, loop.schedule)
    view = resume_view(cfg, model, feats, run.dist)
    loop.log = MetricsLog(run.out / METRICS, enabled=run.main)
    resume_or_start(run, model, opt.optimizer, opt.scheduler, view, loop, checkpoint)
    reporter.start(run.out, cfg.settings())

    def emit(rec: dict[str, Any]) -> None:
        if run.main:
            loop.log.append(rec)
            reporter.log(rec, rec["step"])

    try:
        t = time.perf_counter()
        if not loop.resumed:
            emit({"step": 0, "epoch": 0, **evaluate(model, feats.val, feats.val_tok, cfg.loss, feats.eval_batch)[0]})
        for epoch in range(loop.epoch, cfg.optim.num_epochs):
            _train_epoch(run, model, feats, opt, loop, epoch, emit)
            _end_epoch(run, model, feats, opt, loop, epoch, view, emit)
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < cfg.optim.num_epochs:
                loop.stopped_early = True
                return loop
        run.timing["train_s"] = time.perf_counter() - t
    finally:
        reporter.close()
    return loop


def _train_epoch(
    run: Run, model: Any, feats: SplitFeatures, opt: Optimiser, loop: LoopState, epoch: int, emit: Emit
) -> None:
    """One pass over the training split in this epoch's seeded order; a record every ``log_every_n_steps``."""
    from tqdm.auto import tqdm

    cfg, dist, spe = run.cfg, run.dist, loop.schedule.steps_per_epoch
    ids, global_batch = list(model.model_ids), cfg.optim.batch_size * dist.world
    model.train()
    order = torch.randperm(len(feats.train_tok), generator=torch.Generator().manual_seed(cfg.optim.seed + epoch))
    order = order.tolist()
    window = Stats(len(ids))
    bar = tqdm(range(spe), desc=f"epoch {epoch + 1}/{cfg.optim.num_epochs}", disable=not (cfg.progress and run.main))
    for s in bar:
        idx = order[s * global_batch : (s + 1) * global_batch][dist.rank :: dist.world]
        hidden, gold, cstats = feats.train.batch(idx, model.device)
        router_logits = opt.router(hidden, cstats)
        lo = objective.training_loss(cfg.loss, router_logits, gold, cstats)
        opt.optimizer.zero_grad(set_to_none=True)
        lo.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(opt.params, 1.0)
        if not (torch.isfinite(lo.loss.detach()) and torch.isfinite(grad_norm)):
            what = f"loss {float(lo.loss.detach()):.4g}, gradient norm {float(grad_norm):.4g}"
            raise diverged(what, loop.step + 1, epoch + 1, run.out / CHECKPOINT, loop.last_good)
        opt.optimizer.step()
        opt.scheduler.step()
        loop.step += 1
        window.add(lo, router_logits)
        lr = opt.scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{float(lo.loss.detach()):.4f}", lr=f"{lr:.2e}", refresh=False)
        if loop.step % cfg.optim.log_every_n_steps == 0 or s == spe - 1:
            rec = {"step": loop.step, "epoch": round(epoch + (s + 1) / spe, 4)}
            rec.update(window.metrics("train", ids))
            rec["train/learning_rate"] = lr
            emit(rec)
            window = Stats(len(ids))
    bar.close()


def _end_epoch(
    run: Run,
    model: Any,
    feats: SplitFeatures,
    opt: Optimiser,
    loop: LoopState,
    epoch: int,
    view: dict[str, Any],
    emit: Emit,
) -> None:
    """Validate; save the best heads if validation NLL improved, then the checkpoint (rank 0 writes)."""
    cfg, out = run.cfg, run.out
    metrics, _ = evaluate(model, feats.val, feats.val_tok, cfg.loss, feats.eval_batch)
    if not math.isfinite(metrics["val/nll"]):
        raise diverged(f"validation NLL {metrics['val/nll']}", loop.step, epoch + 1, out / CHECKPOINT, loop.last_good)
    emit({"step": loop.step, "epoch": epoch + 1, **metrics})
    loop.epoch = epoch + 1
    if metrics["val/nll"] < loop.best_val:
        loop.best_val, loop.best_epoch = metrics["val/nll"], epoch + 1
        if run.main:
            save_torch(out / BEST_HEADS, cpu_state(model))
            model.save_pretrained(out / BEST_DIR)
    if run.main:
        save_torch(out / CHECKPOINT, checkpoint_state(model, opt.optimizer, opt.scheduler, loop, cfg, view))
    loop.last_good = (epoch + 1, loop.step)
    run.dist.barrier()


def reset_heads(model: Any, cfg: TrainConfig) -> None:
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
