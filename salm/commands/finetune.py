"""``salm finetune``: flags -> :class:`salm.finetune.FinetuneConfig` -> a LoRA adapter and its member-set entry."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per FinetuneConfig field, with its default."""
    from salm.finetune.config import DTYPES, FinetuneConfig

    d = FinetuneConfig()
    parser.add_argument("--base", required=True, help="the model to specialise: a local folder or a hub id")
    parser.add_argument(
        "--data", nargs="+", required=True,
        help="plain-text .txt files (loss on every token) and/or question/answer data as salm train reads it "
        "(.jsonl/.json/.csv/.parquet, known names, hub ids; loss on the answer)",
    )  # fmt: skip
    parser.add_argument("--output_dir", default=d.output_dir, help="gets adapter/, finetune_report.json, checkpoint/")
    parser.add_argument("--eval_data", nargs="+", default=[], help="held-out data: its loss before and after")
    parser.add_argument("--lora_r", type=int, default=d.lora_r, help="LoRA rank")
    parser.add_argument("--lora_alpha", type=float, default=d.lora_alpha)
    parser.add_argument("--lora_dropout", type=float, default=d.lora_dropout)
    parser.add_argument(
        "--target_modules", nargs="+", default=d.target_modules,
        help="linear layers that get adapters (by name), or all-linear",
    )  # fmt: skip
    parser.add_argument("--learning_rate", type=float, default=d.learning_rate)
    parser.add_argument("--num_epochs", type=int, default=d.num_epochs)
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps (overrides --num_epochs)")
    parser.add_argument("--batch_size", type=int, default=d.batch_size, help="rows per forward")
    parser.add_argument("--grad_accum", type=int, default=d.grad_accum, help="forwards per optimizer step")
    parser.add_argument("--warmup_steps", type=int, default=d.warmup_steps)
    parser.add_argument("--max_length", type=int, default=d.max_length, help="tokens per row / text window")
    parser.add_argument("--max_examples", type=int, default=None, help="first N rows of each Q/A source")
    parser.add_argument(
        "--loss_on", choices=["answer", "all"], default=d.loss_on, help="Q/A data: answer tokens only, or all"
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--dtype", choices=list(DTYPES), default=d.dtype, help="the base's dtype (adapters: fp32)")
    parser.add_argument(
        "--gradient_checkpointing", action="store_true",
        help="recompute activations in the backward pass: much less memory, about a third slower",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="cuda, cpu or mps (default: best available)")
    parser.add_argument("--save_every", type=int, default=d.save_every, help="checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoint")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the base's custom code (off)")
    parser.add_argument("--revision", default=None, help="hub revision of the base")
    parser.add_argument("--member_id", default=None, help="the adapter member's id (default: the output folder's name)")
    parser.add_argument(
        "--members_out", default=None,
        help="add the adapter member to this member-set file (a new file also lists the base)",
    )  # fmt: skip
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    """The :class:`FinetuneConfig` the flags describe (flag names are its field names)."""
    from dataclasses import fields

    from salm.finetune.config import FinetuneConfig

    kw = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if hasattr(args, f.name)}
    return FinetuneConfig(**kw, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from salm.features import TokenizationError
    from salm.finetune import FinetuneError, finetune
    from salm.io import OutputLockedError

    cfg = config_from_args(args)
    try:
        result = finetune(cfg)
    except (FinetuneError, TokenizationError, OutputLockedError, FileNotFoundError, IsADirectoryError) as e:
        print(f"salm finetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from salm.finetune import checkpoint

        if checkpoint.exists(cfg.out):
            print(f"the same command with --resume continues from the checkpoint in {cfg.out}", file=sys.stderr)
        raise
    report = result.report or {}
    ev = report.get("eval_loss")
    summary = f"adapter in {result.adapter_dir} ({result.steps} steps, {report.get('tokens_seen')} tokens"
    if ev:
        summary += f"; held-out loss {ev['before']:.4f} -> {ev['after']:.4f}"
    print(summary + ")", file=sys.stderr)
    if args.members_out:
        print(f"added member {result.member['id']!r} to {args.members_out}", file=sys.stderr)
    print(json.dumps(result.member))  # the member-set entry, for a members file
    return 0
