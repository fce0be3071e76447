"""Train the routing heads on frozen members: :func:`train` with a :class:`TrainConfig` (the library behind
``salm train`` and the seed's ``python src/train.py``, whose flags live in :mod:`salm.commands.train`).

One module per stage of a run (:func:`train`, in :mod:`~salm.training.run`, reads as them):

- :mod:`~salm.training.config`: :class:`TrainConfig` and its parts -- :class:`DataConfig` (what to train
  on), :class:`salm.loss.LossConfig` (what to minimise), :class:`OptimConfig` (how) and
  :class:`salm.heads.HeadConfig` (which heads) -- checked before any work;
- :mod:`~salm.training.prepare`: the processes, the examples, the ensemble, the members' features;
- :mod:`~salm.training.loop`: fresh heads, the epochs, validation, the best heads (the router itself is the
  trainable module: :attr:`~salm.ensemble.MultiModelWithScalarHeads.router_module`);
- :mod:`~salm.training.checkpoints`: ``checkpoint_last.pt``, ``--resume``, divergence;
- :mod:`~salm.training.reporters`: ``metrics.jsonl``, W&B, TensorBoard;
- :mod:`~salm.training.report` and :mod:`~salm.training.plots`: the final heads, ``train_report.json`` and
  the figures.

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

from salm.training.checkpoints import CHECKPOINT_FORMAT
from salm.training.config import (
    BEST_DIR,
    BEST_HEADS,
    CHECKPOINT,
    DEFAULT_DATASETS,
    FINAL_DIR,
    HEAD_FLAGS,
    METRICS,
    REPORT,
    RESUME_DEFAULTS,
    RESUME_KEYS,
    DataConfig,
    OptimConfig,
    TrainConfig,
    TrainingError,
)
from salm.training.loop import LOSS_TERMS, evaluate, optimise
from salm.training.plots import plot_loss_curves, plot_routing_share
from salm.training.prepare import EVAL_BATCH_CACHED, build_features, build_model, load_data
from salm.training.report import TrainResult, save_and_report
from salm.training.reporters import MetricsLog, make_reporter
from salm.training.run import train

__all__ = [
    "BEST_DIR",
    "BEST_HEADS",
    "CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "DEFAULT_DATASETS",
    "EVAL_BATCH_CACHED",
    "FINAL_DIR",
    "HEAD_FLAGS",
    "LOSS_TERMS",
    "METRICS",
    "REPORT",
    "RESUME_DEFAULTS",
    "RESUME_KEYS",
    "DataConfig",
    "MetricsLog",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "build_features",
    "build_model",
    "evaluate",
    "load_data",
    "make_reporter",
    "optimise",
    "plot_loss_curves",
    "plot_routing_share",
    "save_and_report",
    "train",
]
