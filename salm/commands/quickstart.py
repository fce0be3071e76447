"""``salm quickstart``: flags -> :class:`salm.quickstart.run.QuickstartSettings` -> the whole pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from salm.quickstart.run import QuickstartSettings

    d = QuickstartSettings()
    parser.add_argument("--output_dir", default=d.output_dir, help="where the report and every output go")
    parser.add_argument(
        "--size", choices=["default", "tiny"], default=d.size, help="tiny: the smoke run of CI and the tests"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the member build and head training")
    parser.add_argument(
        "--members_dir", default=None, help="build/reuse the members here instead of the cache ($SALM_CACHE)"
    )
    g = parser.add_argument_group("head training (salm train's flags)")
    g.add_argument("--num_epochs", type=int, default=d.num_epochs)
    g.add_argument("--batch_size", type=int, default=d.batch_size)
    g.add_argument("--learning_rate", type=float, default=d.learning_rate)
    g.add_argument("--warmup_steps", type=int, default=d.warmup_steps)
    g.add_argument("--entropy_weight", type=float, default=d.entropy_weight)
    g.add_argument("--loss_on", choices=["answer", "all"], default=d.loss_on)
    from salm.routers import router_names

    g.add_argument("--router", choices=list(router_names()), default=None, help="default: salm train's default router")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--routing", default=d.routing, help="argmax | mixture | threshold:<p>")
    g.add_argument("--arithmetic_problems", type=int, default=None, help="default: the whole math test split")
    g.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--num_examples", type=int, default=d.num_examples, help="coloured generations per domain")
    g.add_argument("--no_plots", action="store_true")


def run(args: argparse.Namespace) -> int:
    from salm.quickstart.run import CHECKS_FAILED, QuickstartSettings, format_table, run_quickstart

    names = QuickstartSettings.__dataclass_fields__
    kw = {k: v for k, v in vars(args).items() if k in names}
    settings = QuickstartSettings(**kw, plots=not args.no_plots)
    try:
        summary = run_quickstart(settings)
    except FileExistsError as e:  # --members_dir names a folder that is not ours: nothing was touched
        print(f"salm quickstart: error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    failed = [name for name, ok in summary["checks"].items() if not ok]
    out = Path(settings.output_dir)
    print(f"\nreport: {out / 'report.md'}   coloured tokens: {out / 'examples.html'}")
    print(f"members file: {summary['members']['members_file']}")
    print(f"try the ensemble:\n  {summary['try']['command']}")
    if failed:
        print(f"salm quickstart: checks not met: {', '.join(failed)}", file=sys.stderr)
        return CHECKS_FAILED
    return 0
