"""``salm harness``: the ensemble and each member through lm-evaluation-harness (:mod:`salm.harness.command`).

lm-eval is imported in ``run`` only, so ``salm harness --help`` works without the ``harness`` extra.
"""

from __future__ import annotations

import argparse

from salm.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_weights_argument(
        parser, "--model_weights", help="trained heads (without: untrained heads, with a warning)"
    )
    parser.add_argument(
        "--tasks",
        default="gsm8k,medqa_4options,boolq",
        help="comma-separated lm-eval task names, or quickstart_arithmetic (default: %(default)s)",
    )
    parser.add_argument("--num_fewshot", type=int, default=None, help="shots per question (default: each task's)")
    parser.add_argument("--output_dir", default="harness_results")
    parser.add_argument("--routing", default="argmax", help="the ensemble's routing: argmax | mixture | threshold:<p>")
    parser.add_argument("--only_ensemble", action="store_true", help="skip the members' own runs")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_gen_toks", type=int, default=256, help="new tokens per generation (lm-eval's default)")
    parser.add_argument(
        "--limit", type=float, default=None,
        help="documents per task, or a fraction (0, 1) of each (lm-eval's --limit; testing only)",
    )  # fmt: skip
    parser.add_argument("--fewshot_seed", type=int, default=1234, help="lm-eval's fewshot_random_seed")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="folder of the local gsm8k/medqa/boolq copies, or a quickstart build for quickstart_arithmetic "
        "(default: $SALM_DATA_DIR, else ../shared/data)",
    )
    parser.add_argument(
        "--include_path", nargs="+", default=[], metavar="DIR",
        help="folders of your own lm-eval task YAML files (lm-eval's --include_path); their tasks join --tasks",
    )  # fmt: skip
    parser.add_argument("--hub", action="store_true", help="use lm-eval's own hub tasks even where a local copy exists")
    parser.add_argument("--no_plots", action="store_true")
    common.add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise common.UsageError("lm-eval is not installed; pip install 'salm[harness]'") from None
    from salm.ensemble import load_ensemble
    from salm.harness.adapter import process_state
    from salm.harness.command import (
        HarnessError,
        check_settings,
        load_task_manager,
        render_comparison,
        resolve_tasks,
        run_harness,
    )
    from salm.harness.tasks.salm_local import data_dir as resolve_data_dir

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    data_dir = resolve_data_dir({"data_dir": args.data_dir})
    try:  # everything known up front is checked before the members load
        if not names:
            raise HarnessError("--tasks is empty; e.g. --tasks gsm8k,medqa_4options,boolq")
        settings = check_settings({
            "routing": args.routing, "num_fewshot": args.num_fewshot, "fewshot_seed": args.fewshot_seed,
            "limit": args.limit, "batch_size": args.batch_size, "max_gen_toks": args.max_gen_toks,
            "weights": args.weights, "data_dir": str(data_dir), "include_path": [str(p) for p in args.include_path],
        })  # fmt: skip
        tasks = resolve_tasks(names, data_dir, args.hub)
        tm = load_task_manager(tasks, data_dir, args.include_path)
    except HarnessError as e:
        raise common.UsageError(str(e)) from None
    if not args.weights:
        common.warn_untrained_heads("salm harness")
    state = process_state(args.device)
    device = str(state.device) if state is not None else args.device
    ensemble = load_ensemble(
        args.models, args.weights, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    settings["dtype"] = str(ensemble.dtype).replace("torch.", "")  # in the resume key: another dtype reruns
    try:
        summary = run_harness(
            ensemble, tasks, args.output_dir, settings, data_dir, args.only_ensemble, not args.no_plots, args.weights,
            tm=tm,
        )  # fmt: skip
    except HarnessError as e:
        raise common.UsageError(str(e)) from None
    if summary is not None:
        print(render_comparison(summary["comparison"], list(summary["models"]), settings))
        print(f"results in {args.output_dir} (comparison.md, comparison.json, <model>/results.json)")
    return 0
