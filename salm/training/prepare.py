"""The stages before optimisation: this process's place among several (:func:`distributed`), the examples
(:func:`load_data`), the ensemble (:func:`build_model`) and the members' features (:func:`build_features`)."""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import torch

from salm.features import Dist, LiveFeatures, TokenizedSplit, load_or_build, tokenize_examples
from salm.training.config import TrainConfig, TrainingError
from salm.training.state import Run, SplitFeatures

EVAL_BATCH_CACHED = 64  # examples per validation batch on the cache (no member runs, memory is small)


def distributed(device: str | None) -> tuple[Dist, torch.device | None]:
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


def load_data(cfg: TrainConfig, data: Any, main: bool) -> Any:
    """The train/validation examples (``data`` as given, else loaded from ``cfg.data.datasets``); what was
    skipped or dropped while loading is printed once."""
    if data is None:
        from salm.data import DataFormatError, load_training_sets

        d = cfg.data
        try:
            data = load_training_sets(
                d.datasets, d.val_fraction, cfg.optim.seed, d.max_examples, balance_mode=d.balance
            )
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


def warn_if_too_short(run: Run, n_train: int) -> None:
    """One line before the members load when the run's learning rates cannot move the heads far: a run of a
    few dozen steps at a small learning rate ends with heads near their random initialisation."""
    problem = run.cfg.optim.schedule(n_train, run.dist.world).too_short()
    if problem and run.main:
        print(f"warning: {problem}", file=sys.stderr)


def build_model(cfg: TrainConfig, model: Any, dist_device: torch.device | None) -> Any:
    """The ensemble whose heads are trained (``model`` as given, else the members with ``cfg.heads``)."""
    if model is None:
        from salm.ensemble import MultiModelWithScalarHeads

        model = MultiModelWithScalarHeads(
            cfg.models, head_config=cfg.heads, device=cfg.device or dist_device, dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
        )  # fmt: skip
    return model


def build_features(run: Run, model: Any, data: Any) -> SplitFeatures:
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
    return SplitFeatures(train_tok, val_tok, train_f, val_f, eval_batch, max_length)


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
