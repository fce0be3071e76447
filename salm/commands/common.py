"""Flags and helpers several commands share: the member flags, loading the ensemble they describe, warm-ups."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every command that loads members shares."""
    g = parser.add_argument_group("members")
    g.add_argument("--models", default=None, help="member-set file (YAML/JSON); default: the Qwen2.5-1.5B trio")
    g.add_argument("--device", default=None, help="cuda, cpu or mps (default: best available)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="members' dtype; auto: bfloat16 on accelerators and on CPUs that multiply it natively "
        "(avx512_bf16, AMX), else float32",
    )
    g.add_argument("--trust_remote_code", action="store_true", help="allow members' custom code (off by default)")


def ensemble_from_flags(args: argparse.Namespace, weights: str | None = None, **kwargs: Any) -> Any:
    """The ensemble the member flags describe: fresh heads, or trained heads from ``weights``."""
    from salm.ensemble import load_ensemble

    return load_ensemble(
        args.models, weights, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code, **kwargs
    )


def print_warmups(model: Any) -> None:
    """What ``--compile`` cost up front: one line per compiled shape bucket."""
    from salm.fast_decode import warmup_report

    for w in warmup_report(model):
        print(
            f"compiled the decode step of {', '.join(w.members)} (batch {w.batch}, cache {w.cache_len}) "
            f"in {w.seconds:.1f}s",
            file=sys.stderr,
        )
