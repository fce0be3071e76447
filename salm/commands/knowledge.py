"""``salm knowledge``: the knowledge-split benchmark (:mod:`salm.quickstart.knowledge`) from the command line."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from salm.quickstart.knowledge import ROUTER_VARIANTS

    parser.add_argument("--output_dir", default="salm_knowledge")
    parser.add_argument("--size", choices=["default", "tiny"], default="default", help="tiny: seconds, for CI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--members_dir", default=None, help="build/reuse the members here (default: the cache)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(ROUTER_VARIANTS))
    parser.add_argument("--num_epochs", type=int, default=20)


def run(args: argparse.Namespace) -> int:
    import torch

    from salm.quickstart.knowledge import format_table, run_knowledge

    # Small members and heads on a shared CPU: one thread never stalls at OpenMP barriers (measured: heads
    # training 1.8 s/step with two threads on a busy 2-core machine, milliseconds with one).
    torch.set_num_threads(1)
    try:
        summary = run_knowledge(args.size, args.seed, args.output_dir, args.variants, args.members_dir,
                                args.num_epochs)  # fmt: skip
    except (FileExistsError, ValueError) as e:
        print(f"salm knowledge: error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    return 0
