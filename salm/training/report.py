"""The end of a run: the final heads, the plots and ``train_report.json`` (:func:`save_and_report`), and
what :func:`salm.training.train` returns (:class:`TrainResult`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salm.cpu import compute_record
from salm.features import TokenizedSplit
from salm.io import atomic_write_json
from salm.training.config import BEST_DIR, BEST_HEADS, CHECKPOINT, FINAL_DIR, METRICS, REPORT, TrainConfig
from salm.training.plots import plot_loss_curves, plot_routing_share
from salm.training.state import LoopState, Run, SplitFeatures


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


def stopped_result(run: Run, model: Any, loop: LoopState) -> TrainResult:
    """What a run stopped after an epoch (``stop_after_epoch``, as a kill would) returns: no final outputs."""
    return TrainResult(run.out, loop.epoch, loop.step, loop.best_val, loop.best_epoch, None, None, None, model)


def save_and_report(
    run: Run, model: Any, data: Any, feats: SplitFeatures, loop: LoopState, t_start: float
) -> TrainResult:
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
                "per_epoch": loop.schedule.steps_per_epoch,
                "total": loop.step,
                "epochs": cfg.optim.num_epochs,
                "processes": run.dist.world,
                "warmup": loop.schedule.warmup,
                "learning_rate_sum": round(loop.schedule.lr_sum(), 6),
            },  # fmt: skip
            "outputs": _outputs(out),
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


def _outputs(out: Path) -> dict[str, str]:
    """Only what exists: a report never points at a file that was not written."""
    names = (
        ("best_heads", BEST_HEADS),
        ("best_model", BEST_DIR),
        ("final_model", FINAL_DIR),
        ("checkpoint", CHECKPOINT),
        ("metrics", METRICS),
    )
    return {k: v for k, v in names if (out / v).exists()}


def _cache_report(cfg: TrainConfig, feats: SplitFeatures) -> dict[str, Any]:
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
