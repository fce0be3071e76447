"""``salm train`` (and the seed's ``python src/train.py``): flags -> :class:`salm.training.TrainConfig` -> train."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from salm.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed's flags with its defaults, plus the data, cache and logging options; defaults are TrainConfig's."""
    from salm.data.splits import BALANCE_MODES
    from salm.io import CACHE_ENV
    from salm.routers import router_names
    from salm.training import CHECKPOINT, DEFAULT_DATASETS, TrainConfig

    d = TrainConfig()
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), help="hub ids or local files")
    parser.add_argument("--output_dir", default=d.output_dir)
    parser.add_argument("--num_epochs", type=int, default=d.optim.num_epochs)
    parser.add_argument("--batch_size", type=int, default=d.optim.batch_size, help="examples per optimizer step")
    parser.add_argument("--learning_rate", type=float, default=d.optim.learning_rate)
    parser.add_argument(
        "--warmup_steps", type=int, default=None, help="linear warm-up steps (default: --warmup_ratio of the run)"
    )
    parser.add_argument(
        "--warmup_ratio", type=float, default=d.optim.warmup_ratio,
        help="share of the run's optimizer steps spent warming up when --warmup_steps is not given",
    )  # fmt: skip
    add_loss_arguments(parser, d.loss)
    parser.add_argument("--head_hidden_dim", type=int, default=d.heads.hidden_dim)
    parser.add_argument("--head_dropout", type=float, default=d.heads.dropout)
    parser.add_argument(
        "--router", choices=list(router_names()), default=d.heads.router,
        help="seed: heads on each member's hidden state; confidence: + every member's next-token statistics; "
        "joint: one router over all members' hidden states and statistics; aware: confidence + each member's "
        "record on the text so far; evidence: the statistics and the record alone, blind to hidden states "
        "(carries over to subjects the heads never saw)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=d.optim.seed, help="0 <= seed < 2**63: head initialisation, shuffling, dropout"
    )
    parser.add_argument("--log_every_n_steps", type=int, default=d.optim.log_every_n_steps)
    common.add_model_arguments(parser)
    parser.add_argument("--max_length", type=int, default=d.data.max_length, help="tokens per example (prompt+answer)")
    parser.add_argument("--val_fraction", type=float, default=d.data.val_fraction, help="held out when no val split")
    parser.add_argument("--max_examples", type=int, default=None, help="first N rows per dataset (quick runs)")
    parser.add_argument(
        "--balance", choices=list(BALANCE_MODES), default=d.data.balance,
        help="truncate: every dataset cut to the smallest one's rows (equal weight); none: every row kept",
    )  # fmt: skip
    parser.add_argument(
        "--loss_on", choices=["answer", "all"], default=d.data.loss_on, help="answer tokens only, or the whole text"
    )
    parser.add_argument("--report_to", choices=["none", "wandb", "tensorboard"], default=d.report_to)
    parser.add_argument("--resume", action="store_true", help=f"continue from <output_dir>/{CHECKPOINT}")
    parser.add_argument("--no_feature_cache", action="store_true", help="run the members every step (slow)")
    parser.add_argument(
        "--feature_cache_dir", default=None, help=f"default: <output_dir>/feature_cache, or ${CACHE_ENV}/features"
    )
    parser.add_argument("--no_plots", action="store_true", help="skip loss_curves.png and routing_share.png")


def add_loss_arguments(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """One flag per :class:`salm.loss.LossConfig` field (its name, type, default and ``help`` metadata), so a
    new loss term needs no edit here."""
    from dataclasses import fields

    for f in fields(defaults):
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata.get("help"))
        else:
            parser.add_argument(f"--{f.name}", type=type(value), default=value, help=f.metadata.get("help"))


def config_from_args(args: argparse.Namespace):
    """The :class:`TrainConfig` the flags describe (flag names are its field names; ``--no_X`` negate ``X``)."""
    from salm.training import TrainConfig

    kw = {k: v for k, v in vars(args).items() if k in TrainConfig.flat_names()}
    kw["feature_cache"] = not args.no_feature_cache
    kw["plots"] = not args.no_plots
    if kw.get("models") is not None:
        kw["models"] = str(kw["models"])
    return TrainConfig.from_flat(**kw)


def run(args: argparse.Namespace) -> int:
    from salm.data import DataFormatError, DatasetUnavailableError
    from salm.features import FeatureCacheError, TokenizationError
    from salm.io import OutputLockedError
    from salm.training import BEST_DIR, BEST_HEADS, TrainingError, train

    try:
        result = train(config_from_args(args))
    except (
        TrainingError, TokenizationError, FeatureCacheError, DataFormatError, DatasetUnavailableError,
        FileNotFoundError, IsADirectoryError, OutputLockedError,
    ) as e:  # fmt: skip
        print(f"salm train: error: {e}", file=sys.stderr)
        return 2
    if result.report is not None:
        saved = [str(result.output_dir / f) for f in (BEST_DIR, BEST_HEADS) if (result.output_dir / f).exists()]
        print(
            f"best val NLL {result.best_val_nll:.4f} (epoch {result.best_epoch}); "
            + (f"heads in {' and '.join(saved)}" if saved else "no best heads were saved"),
            file=sys.stderr,
        )
    return 0
