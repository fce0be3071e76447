"""``salm evaluate`` (and the seed's ``python evaluate.py``): flags -> :class:`EvalSettings` -> evaluate.

Loads and samples the data before the members (an offline run learns what is missing in seconds) and takes
the output folder's lock before the members load (a second run on the same folder fails at once).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from salm.commands import common

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``salm evaluate`` / ``python evaluate.py``: the seed's flags plus offline data and decoding options."""
    from salm.evaluation.generations import GENERATIONS_DIR
    from salm.evaluation.settings import CHOICE_MODES, EvalSettings
    from salm.evaluation.tasks import DEFAULT_TASKS

    d = EvalSettings()  # the defaults live there
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help=f"tasks to run: {', '.join(DEFAULT_TASKS)}, all (these and every --data name), or a name given with "
        "--data (default: the --data names if any are given, else all)",
    )
    parser.add_argument("--sample_size", type=int, default=d.sample_size, help="examples per dataset (0 = all)")
    parser.add_argument(
        "--random_seed",
        "--seed",
        dest="random_seed",
        type=int,
        default=d.random_seed,
        help="seed for sampling examples and decoding, 0 <= seed < 2**63",
    )
    common.add_weights_argument(
        parser,
        "--model_weights",
        help="trained heads (saLM folder, .safetensors or the seed's .pt); without: untrained heads",
    )
    parser.add_argument("--only_ensemble", action="store_true", help="skip the members' own runs")
    parser.add_argument("--max_new_tokens", type=int, default=d.decode.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=d.decode.temperature, help="0 = greedy (for every model)")
    parser.add_argument("--top_p", type=float, default=d.decode.top_p)
    parser.add_argument("--top_k", type=int, default=d.decode.top_k)
    parser.add_argument("--output_dir", default="evaluation_results")
    parser.add_argument("--save_examples", action="store_true", help="write examples.html (tokens coloured by member)")
    parser.add_argument(
        "--num_examples", type=int, default=d.num_examples, help="ensemble outputs per dataset on that page"
    )
    parser.add_argument("--no_plots", action="store_true")
    parser.add_argument("--debug", action="store_true", help="2 examples per dataset, verbose logging")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="local data file for a dataset (repeatable); a new NAME adds a generic task",
    )
    parser.add_argument("--batch_size", type=int, default=d.batch_size)
    parser.add_argument(
        "--num_fewshot",
        type=int,
        default=d.num_fewshot,
        help="worked examples before each question: from the train split, else from rows not evaluated "
        "(seeded by --random_seed; the same for every model)",
    )
    parser.add_argument(
        "--routing", default=d.decode.routing, help="ensemble routing: argmax | mixture | threshold:<p>"
    )
    parser.add_argument(
        "--compile", action="store_true", help="static caches + torch.compile'd decode step (a warm-up per batch shape)"
    )
    parser.add_argument(
        "--medqa_mode",
        choices=CHOICE_MODES,
        default=d.choice_mode,
        help="multiple choice by generation, by option log-likelihood, or both",
    )
    parser.add_argument("--split", default=None, help="dataset split (default: each task's evaluation split)")
    parser.add_argument("--no_teacher_forced", action="store_true", help="skip NLL/oracle metrics on gold answers")
    parser.add_argument(
        "--no_resume",
        action="store_true",
        help=f"regenerate everything (default: reuse each model's finished outputs in <dataset>/{GENERATIONS_DIR}/ "
        "when prompts, decoding settings, members and heads are unchanged)",
    )
    common.add_model_arguments(parser)


def _parse_data(values: Sequence[str]) -> dict[str, str]:
    from salm.evaluation.tasks import task_name_problem

    data = {}
    for v in values:
        name, sep, path = v.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--data expects NAME=PATH, got {v!r}")
        problem = task_name_problem(name)
        if problem:
            raise ValueError(f"--data {v}: NAME {problem} in --output_dir")
        data[name] = path
    return data


def _dataset_names(requested: Sequence[str] | None, data: Mapping[str, str]) -> list[str]:
    """The datasets to run: ``requested`` with ``all`` expanded (the default tasks and every --data name);
    without --datasets, the datasets given by --data, or ``all`` when there are none."""
    from salm.evaluation.tasks import DEFAULT_TASKS, TASKS

    if requested is None:
        requested = list(data) or ["all"]
    names: list[str] = []
    for name in requested:
        extra = list(DEFAULT_TASKS) + [n for n in data if n not in DEFAULT_TASKS] if name == "all" else [name]
        names += [n for n in extra if n not in names]
    for n in names:
        if n not in TASKS and n not in data:
            raise ValueError(
                f"unknown dataset {n!r}: choose from {', '.join(TASKS.names())} or all, "
                f"or pass --data {n}=/path/to/file.jsonl"
            )
    return names


def _print_summary(summary: Mapping[str, Any], out_dir: Path) -> None:
    from salm.evaluation.runner import SUMMARY_NAME

    for name, res in summary["datasets"].items():
        print(f"{name} (n={res['n']}):")
        for model_name, entry in res["models"].items():
            if "accuracy" in entry:
                print(
                    f"  {model_name:<24} {entry['accuracy']:.3f}  [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"
                    f"  ({entry.get('primary')})"
                )
        tf = res.get("teacher_forced")
        if tf and tf.get("tokens"):
            share = tf["captured_share"]
            const = tf.get("constant_mixture") or {}
            const_share = const.get("captured_share")
            print(
                f"  NLL/token: ensemble {tf['ensemble_nll']:.3f}, best member {tf['best_member_nll']:.3f}, "
                f"best constant mixture {const.get('nll', float('nan')):.3f}, oracle {tf['oracle_nll']:.3f}; "
                f"captured share {'n/a' if share is None else f'{share:.2f}'} "
                f"(constant mixture {'n/a' if const_share is None else f'{const_share:.2f}'})"
            )
    for message in summary["skipped"].values():
        print(f"skipped {message}")
    print(f"results in {out_dir} (report.md, {SUMMARY_NAME})")


def run(args: argparse.Namespace) -> int:
    from salm.evaluation.runner import EvalSettings, evaluate, prepare_tasks
    from salm.generation import DecodeConfig
    from salm.io import OutputLockedError, output_lock

    if args.debug:
        logging.getLogger().setLevel(logging.DEBUG)
        logging.getLogger("salm").setLevel(logging.DEBUG)
        args.sample_size = 2
    try:
        data = _parse_data(args.data)
        names = _dataset_names(args.datasets, data)
        settings = EvalSettings(
            sample_size=args.sample_size or None,
            random_seed=args.random_seed,
            decode=DecodeConfig(
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                routing=args.routing,
                compile=args.compile,
            ),
            batch_size=args.batch_size,
            only_ensemble=args.only_ensemble,
            choice_mode=args.medqa_mode,
            teacher_forced=not args.no_teacher_forced,
            resume=not args.no_resume,
            save_examples=args.save_examples,
            num_examples=args.num_examples,
            plots=not args.no_plots,
            split=args.split,
            weights=args.weights,
            num_fewshot=args.num_fewshot,
        )
        settings.validate()
    except ValueError as e:
        print(f"salm evaluate: error: {e}", file=sys.stderr)
        return 2
    common.check_routing_members(settings.decode.routing, args.models, args.weights)
    # Load (and sample) the data before the members: an offline run learns what is missing in seconds.
    runs, skipped = prepare_tasks(names, settings, data)
    for message in skipped.values():
        print(f"salm evaluate: skipping {message}", file=sys.stderr)
    if not runs:
        print("salm evaluate: error: no dataset could be loaded; nothing was evaluated", file=sys.stderr)
        return 2  # bad input, like every other command's (see salm.cli's exit codes)
    if not args.weights:
        common.warn_untrained_heads("salm evaluate")
        logger.warning("evaluating with untrained routing heads")
    out_dir = Path(args.output_dir)
    try:
        with output_lock(out_dir, "salm evaluate"):  # before the members load: a second run fails at once
            model = common.ensemble_from_flags(args, args.weights)
            summary = evaluate(model, runs, out_dir, settings, skipped=skipped)
    except OutputLockedError as e:
        print(f"salm evaluate: error: {e}", file=sys.stderr)
        return 2
    _print_summary(summary, out_dir)
    if settings.decode.compile:
        common.print_warmups(model)
    return 0
