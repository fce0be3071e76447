"""``train``: one run of head training, as its stages."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from salm.io import output_lock, report_stale_temporaries
from salm.training.checkpoints import read_for_resume
from salm.training.config import TrainConfig
from salm.training.loop import optimise
from salm.training.prepare import build_features, build_model, distributed, load_data, warn_if_too_short
from salm.training.report import TrainResult, save_and_report, stopped_result
from salm.training.reporters import Reporter, make_reporter
from salm.training.state import Run


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
    dist, dist_device = distributed(cfg.device)
    run = Run(cfg, dist, Path(cfg.output_dir))
    # One run per output folder: a second one would interleave metrics.jsonl and overwrite the heads.
    with output_lock(run.out, "salm train") if run.main else contextlib.nullcontext():
        if run.main:
            _report_stale_temporaries(cfg, run.out)
        run.out.mkdir(parents=True, exist_ok=True)
        reporter = make_reporter(cfg.report_to) if run.main else Reporter()
        data = run.timed("data_s", load_data, cfg, data, run.main)
        checkpoint = read_for_resume(run)  # may set run.cfg: a run saved with the seed's defaults keeps them
        warn_if_too_short(run, len(data.train))
        model = run.timed("model_s", build_model, run.cfg, model, dist_device)
        feats = build_features(run, model, data)
        loop = optimise(run, model, feats, reporter, checkpoint, stop_after_epoch)
        if loop.stopped_early:
            return stopped_result(run, model, loop)
        return save_and_report(run, model, data, feats, loop, t_start)


def _report_stale_temporaries(cfg: TrainConfig, out: Path) -> None:
    """Leftovers of a killed run's atomic writes, in the output folder and the feature cache."""
    report_stale_temporaries(out, recursive=True, untagged=True, prog="salm train")
    if cfg.feature_cache:
        report_stale_temporaries(cfg.cache_dir(), prog="salm train")
