"""``finetune(cfg)``: validate -> tokenizer and data -> base + LoRA -> optimise (checkpoints) -> adapter and report.

Deterministic for a seed: the adapters' initialisation, each epoch's order (a generator seeded with
``seed + epoch``) and the dropout draws (the global RNG, saved in every checkpoint) fix the run, so a run
stopped at any moment and resumed with ``resume=True`` ends with the same adapter as an uninterrupted one.
The loss of a step is the mean over all its target tokens, whatever ``grad_accum`` splits it into.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salm.features import TokenizedSplit, collate
from salm.finetune import checkpoint
from salm.finetune.config import FinetuneConfig, FinetuneError
from salm.finetune.data import FinetuneData, load_split
from salm.finetune.model import load_lora_model, load_tokenizer, require_peft
from salm.finetune.outputs import ADAPTER_DIR, REPORT, member_entry, save_adapter, write_member_entry


@dataclass
class FinetuneResult:
    output_dir: Path
    steps: int  # optimizer steps done
    total_steps: int
    adapter_dir: Path | None  # None when stopped before the end (stop_after_step)
    member: dict[str, Any] | None  # the member-set entry of the adapter
    report: dict[str, Any] | None
    model: Any = field(repr=False, default=None)


@dataclass
class _Plan:
    """How the data become optimizer steps."""

    rows: int
    per_step: int  # rows per optimizer step: batch_size x grad_accum
    per_epoch: int  # steps per epoch
    total: int


def finetune(cfg: FinetuneConfig, *, stop_after_step: int | None = None) -> FinetuneResult:
    """Train a LoRA adapter of ``cfg.base`` on ``cfg.data``; write it, its report and its member entry.

    ``stop_after_step`` ends the run right after that optimizer step, as a kill at that moment would
    (only the checkpoints written so far remain), so a later ``resume=True`` run can be checked against
    an uninterrupted one.
    """
    t_start = time.perf_counter()
    cfg.validate()
    require_peft()
    from salm.io import output_lock, report_stale_temporaries

    with output_lock(cfg.out, "salm finetune"):
        report_stale_temporaries(cfg.out, prog="salm finetune")
        return _finetune(cfg, stop_after_step, t_start)


def _finetune(cfg: FinetuneConfig, stop_after_step: int | None, t_start: float) -> FinetuneResult:
    from salm.members import resolve_device

    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg)
    train = load_split(cfg.data, tokenizer, cfg, "train")
    evaluation = load_split(cfg.eval_data, tokenizer, cfg, "eval") if cfg.eval_data else None
    for d in (train, evaluation):
        _report_truncation(d, cfg.max_length)
    model = load_lora_model(cfg, device)
    load_s = time.perf_counter() - t_start
    per_step = cfg.batch_size * cfg.grad_accum
    per_epoch = math.ceil(len(train) / per_step)
    plan = _Plan(len(train), per_step, per_epoch, cfg.max_steps or cfg.num_epochs * per_epoch)

    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, plan.total)
    view = _resume_view(cfg, train, evaluation, plan)
    progress = _resume_or_start(cfg, model, optimizer, scheduler, view)
    pad_id = tokenizer.pad_token_id
    if evaluation is not None and progress.eval_before is None:
        progress.eval_before = eval_loss(model, evaluation.split, cfg.batch_size, pad_id)
    t_train = time.perf_counter()
    tokens_run = optimise(cfg, model, optimizer, scheduler, train.split, plan, progress, view, stop_after_step, pad_id)
    train_s = time.perf_counter() - t_train
    if progress.step < plan.total:  # stopped on request: as a kill would, write nothing more
        return FinetuneResult(cfg.out, progress.step, plan.total, None, None, None, model)
    eval_after = eval_loss(model, evaluation.split, cfg.batch_size, pad_id) if evaluation is not None else None
    adapter = save_adapter(model, cfg.out / ADAPTER_DIR)
    entry = member_entry(cfg.adapter_member_id(), cfg.base, adapter)
    if cfg.members_out:
        write_member_entry(cfg.members_out, entry, base_id=_base_id(cfg.base))
    timing = {"load_s": load_s, "train_s": train_s, "total_s": time.perf_counter() - t_start}
    report = _report(cfg, model, train, evaluation, plan, progress, eval_after, entry, timing, tokens_run)
    return FinetuneResult(cfg.out, progress.step, plan.total, adapter, entry, report, model)


def _report(
    cfg: FinetuneConfig, model: Any, train: FinetuneData, evaluation: FinetuneData | None, plan: _Plan,
    progress: checkpoint.Progress, eval_after: float | None, entry: dict[str, Any], timing: dict[str, float],
    tokens_run: int,
) -> dict[str, Any]:  # fmt: skip
    """``finetune_report.json``: the settings, the data, the loss curve, the held-out loss and the timing."""
    from salm.io import atomic_write_json

    train_s = timing["train_s"]
    report = {
        "settings": cfg.settings(),
        "adapter": entry["adapter"],
        "member": entry,
        "data": {"train": train.sources, "eval": evaluation.sources if evaluation else []},
        "steps": {
            "total": plan.total,
            "per_epoch": plan.per_epoch,
            "rows_per_step": plan.per_step,
            "resumed_from": progress.resumed_from,
        },  # fmt: skip
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokens_seen": sum(r["tokens"] for r in progress.curve),
        "loss_tokens_seen": sum(r["loss_tokens"] for r in progress.curve),
        "loss_curve": progress.curve,
        "eval_loss": {"before": progress.eval_before, "after": eval_after} if evaluation else None,
        "timing": {
            **{k: round(v, 3) for k, v in timing.items()},
            "tokens_per_s": round(tokens_run / train_s, 2) if train_s > 0 and tokens_run else None,
        },
        "versions": _versions(),
    }
    atomic_write_json(cfg.out / REPORT, report)
    return report


def step_rows(step: int, plan: _Plan, seed: int) -> list[int]:
    """The rows of optimizer step ``step`` (0-based): a function of the seed and the step alone."""
    epoch, position = divmod(step, plan.per_epoch)
    order = torch.randperm(plan.rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[position * plan.per_step : (position + 1) * plan.per_step]


def optimise(
    cfg: FinetuneConfig, model: Any, optimizer: Any, scheduler: Any, split: TokenizedSplit, plan: _Plan,
    progress: checkpoint.Progress, view: dict[str, Any], stop_after_step: int | None, pad_id: int,
) -> int:  # fmt: skip
    """Optimizer steps from ``progress.step`` to the end (or ``stop_after_step``), a checkpoint every
    ``save_every`` steps and at the end; returns the input tokens this call processed."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    device = next(p.device for p in params)
    model.train()
    bar = tqdm(total=plan.total, initial=progress.step, desc="finetune", unit="step", disable=not cfg.progress)
    t0, tokens = time.perf_counter(), 0
    try:
        for step in range(progress.step, plan.total):
            rows = step_rows(step, plan, cfg.seed)
            n_targets = sum(split.n_positions[i] for i in rows)
            optimizer.zero_grad(set_to_none=True)
            t_step, cpu_step, nll_sum, step_tokens = time.perf_counter(), time.process_time(), 0.0, 0
            for start in range(0, len(rows), cfg.batch_size):
                ids, mask, labels = collate(split, rows[start : start + cfg.batch_size], pad_id)
                nll = _nll_sum(model, ids.to(device), mask.to(device), labels.to(device))
                (nll / max(n_targets, 1)).backward()
                nll_sum += float(nll.detach())
                step_tokens += int(mask.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            loss = nll_sum / max(n_targets, 1)
            if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
                raise FinetuneError(
                    f"training diverged at step {step + 1}: loss {loss:.4g}, gradient norm {float(grad_norm):.4g}; "
                    "lower --learning_rate (in a new --output_dir: --resume refuses changed settings)"
                )
            optimizer.step()
            scheduler.step()
            progress.step = step + 1
            tokens += step_tokens
            progress.curve.append({"step": progress.step, "loss": round(loss, 6), "lr": scheduler.get_last_lr()[0],
                                   "tokens": step_tokens, "loss_tokens": n_targets,
                                   "seconds": round(time.perf_counter() - t_step, 3),
                                   "cpu_seconds": round(time.process_time() - cpu_step, 3)})  # fmt: skip
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.1f}", refresh=False)
            bar.update(1)
            if progress.step % cfg.save_every == 0 or progress.step == plan.total:
                checkpoint.save(cfg.out, model, optimizer, scheduler, progress, view)
            if stop_after_step is not None and progress.step >= stop_after_step:
                break
    finally:
        bar.close()
    model.eval()
    return tokens


def _nll_sum(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over the labelled positions, in fp32 whatever the model's dtype."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


@torch.no_grad()
def eval_loss(model: Any, split: TokenizedSplit, batch_size: int, pad_id: int) -> float:
    """Mean next-token NLL (nats per target token) over ``split``, dropout off."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for start in range(0, len(split), batch_size):
        rows = list(range(start, min(start + batch_size, len(split))))
        ids, mask, labels = collate(split, rows, pad_id)
        total += float(_nll_sum(model, ids.to(device), mask.to(device), labels.to(device)))
        n += sum(split.n_positions[i] for i in rows)
    model.train(was_training)
    return total / max(n, 1)


def _resume_view(
    cfg: FinetuneConfig, train: FinetuneData, evaluation: FinetuneData | None, plan: _Plan
) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: the settings, the data and the schedule."""
    settings = cfg.settings()
    view = {k: settings[k] for k in FinetuneConfig.resume_keys()}
    view.update(train_sha256=train.split.content_hash(), total_steps=plan.total,
                eval_sha256=evaluation.split.content_hash() if evaluation else None)  # fmt: skip
    return view


def _resume_or_start(
    cfg: FinetuneConfig, model: Any, optimizer: Any, scheduler: Any, view: dict[str, Any]
) -> checkpoint.Progress:
    """The checkpoint's state with ``resume`` (when there is one), else a fresh start that discards an old one."""
    out = cfg.out
    if cfg.resume and checkpoint.exists(out):
        progress = checkpoint.restore(out, model, optimizer, scheduler, view)
        print(f"resuming from {out / checkpoint.CHECKPOINT_DIR}: step {progress.step}", file=sys.stderr)
        return progress
    if cfg.resume:
        print(f"--resume: no checkpoint in {out} yet; starting a fresh run", file=sys.stderr)
    elif checkpoint.exists(out):  # a previous run's: never resume it by mistake after this run crashes
        import shutil

        print(f"starting a fresh run in {out}; the previous checkpoint is discarded", file=sys.stderr)
        shutil.rmtree(out / checkpoint.CHECKPOINT_DIR)
    return checkpoint.Progress()


def _report_truncation(data: FinetuneData | None, max_length: int) -> None:
    for s in data.sources if data is not None else ():
        if s["prompts_truncated"] or s["answers_truncated"]:
            print(
                f"{s['source']}: {s['prompts_truncated']} prompt(s) lost their start and {s['answers_truncated']} "
                f"answer(s) their end to fit --max_length {max_length}",
                file=sys.stderr,
            )


def _base_id(base: str) -> str:
    """A member id for the base in a new member-set file: its folder or hub name ('.' is not allowed)."""
    return base.rstrip("/").rsplit("/", 1)[-1].replace(".", "-") or "base"


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
