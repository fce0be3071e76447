"""The ensemble and every member through lm-evaluation-harness, on the same tasks, in one call: :func:`run_harness`
(``salm harness``; its flags live in :mod:`salm.commands.harness`).

The members are loaded once; each model is the ``salm`` lm-eval model on that ensemble with its own routing
(the ensemble's, then ``member:<id>`` per member), so all share tokenization, batching, stopping and few-shot
prompts (lm-eval's fewshot seed is fixed, so every model sees the same shots). Per model the output folder gets
lm-eval's own ``results.json`` and per-task ``samples_<task>.jsonl``; for the run ``comparison.md`` /
``comparison.json`` (accuracy ± stderr and the 95% Wilson interval per task, ensemble − best member) and
``comparison.png``. A model whose ``results.json`` was written with the same settings is not rerun.

Task names are lm-eval's. ``gsm8k``, ``medqa_4options`` and ``boolq`` run on the offline copies shipped in
:mod:`salm.harness` (``*_local``) when the data folder holds them, unless ``--hub`` asks for lm-eval's own hub
tasks; ``quickstart_arithmetic`` is the quickstart build's held-out arithmetic (the data folder: the build);
any other lm-eval task name is passed through unchanged. Every task is checked and built before the members
load (:func:`load_task_manager`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from salm.cpu import compute_record
from salm.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

logger = logging.getLogger(__name__)

ENSEMBLE = "ensemble"
# Headline metric per task (lm-eval's key "metric,filter"); other tasks use their first non-stderr metric.
PRIMARY_METRICS = {
    "gsm8k": "exact_match,strict-match",
    "gsm8k_local": "exact_match,strict-match",
    "medqa_4options": "acc,none",
    "medqa_4options_local": "acc,none",
    "boolq": "acc,none",
    "boolq_local": "acc,none",
    "quickstart_arithmetic": "exact_match,strict-match",
}
GSM8K_LIKE = ("gsm8k", "gsm8k_local", "quickstart_arithmetic")  # also reported: flexible-extract (last number)


class HarnessError(ValueError):
    """Bad ``salm harness`` input (the message names the flag)."""


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings checked, as they will run (recorded as such): raises :class:`HarnessError` naming
    the flag. ``limit`` is lm-eval's: a whole number of documents, or a fraction (0, 1) of each task."""
    import math

    from salm.generation import GenerationError, parse_routing

    out = dict(settings)
    routing = out["routing"]
    if routing.startswith("member:"):
        raise HarnessError("--routing is the ensemble's; members are evaluated anyway")
    try:
        parse_routing(routing, [])
    except GenerationError as e:
        raise HarnessError(f"--routing: {e}") from None
    for flag, low in (("num_fewshot", 0), ("batch_size", 1), ("max_gen_toks", 1)):
        value = out[flag]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise HarnessError(f"--{flag} must be an integer >= {low}, got {value!r}")
    limit = out["limit"]
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
            raise HarnessError(f"--limit must be a number of documents >= 1 or a fraction in (0, 1), got {limit!r}")
        if limit >= 1:
            if limit != int(limit):
                raise HarnessError(f"--limit {limit}: a number of documents must be whole (a fraction must be < 1)")
            limit = int(limit)
        out["limit"] = limit
    return out


def resolve_tasks(names: Sequence[str], data_dir: Path, hub: bool = False) -> dict[str, str]:
    """Requested name -> lm-eval task actually run (the offline copy where the data folder has it).

    An offline copy named directly (``gsm8k_local``, ``quickstart_arithmetic``) needs its files; an lm-eval name
    with an offline copy falls back to lm-eval's hub task only where the hub can be reached (one probe of at
    most a few seconds): offline, the error names the data folder and the files it should hold.
    """
    from salm.harness import LOCAL_TASKS
    from salm.harness.tasks.salm_local import DATA_DIR_ENV, FILES, missing_files
    from salm.members import prepare_hub

    out = {}
    for name in names:
        direct = name in FILES  # an offline copy named directly: --hub does not apply to it
        local = name if direct else (LOCAL_TASKS.get(name) if not hub else None)
        if local is None:
            out[name] = name
            continue
        missing = missing_files(local, data_dir)
        if not missing:
            out[name] = local
            continue
        if direct or prepare_hub():
            need = ", ".join(str(m.relative_to(data_dir)) for m in missing)
            hub_way = "" if direct else f", or run where the Hugging Face hub is reachable (lm-eval's {name})"
            raise HarnessError(
                f"--tasks {name}: no local copy in {data_dir} (it needs {need} there); pass --data_dir DIR "
                f"(or set {DATA_DIR_ENV}=DIR) holding them{hub_way}"
            )
        print(
            f"salm harness: no local copy of {name} in {data_dir} ({', '.join(map(str, missing))} missing): "
            f"using lm-eval's hub task {name!r} (pass --data_dir to use a local copy)",
            file=sys.stderr,
        )
        out[name] = name
    return out


def load_task_manager(tasks: Mapping[str, str], data_dir: Path, include_path: Sequence[str | Path] = ()) -> Any:
    """lm-eval's task manager for ``tasks``, with every task built once (its data loaded) before any member
    loads: an unknown name or data that cannot be loaded (offline, not cached) is a :class:`HarnessError` in
    seconds, not a traceback after the members. When every task is an offline copy or in ``include_path``,
    lm-eval's own task index (seconds to build) is left out."""
    import difflib

    from salm.harness import task_manager

    for folder in include_path:
        if not Path(folder).is_dir():
            raise HarnessError(f"--include_path {folder}: not a folder (of lm-eval task YAML files)")
    tm = task_manager(data_dir, include_defaults=False, include_path=include_path)
    if not all(t in tm.all_tasks for t in tasks.values()):
        tm = task_manager(data_dir, include_defaults=True, include_path=include_path)
    known = set(tm.all_tasks)
    for requested, task in tasks.items():
        if task not in known and not (task.endswith((".yaml", ".yml")) and Path(task).is_file()):
            close = difflib.get_close_matches(task, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HarnessError(
                f"--tasks {requested}: unknown lm-eval task{hint}; `python -m salm.harness ls tasks` lists them"
            )
    try:
        tm.load(list(tasks.values()))
    except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds; each means "cannot run it"
        from salm.members import hub_offline

        why = " ".join(f"{type(e).__name__}: {e}".split())
        offline = " (the Hugging Face hub is offline: only cached datasets load)" if hub_offline() else ""
        raise HarnessError(f"--tasks {', '.join(tasks)}: could not load the data{offline}: {why}") from None
    return tm


def primary_metric(task: str, results: Mapping[str, Any]) -> str | None:
    if task in PRIMARY_METRICS and PRIMARY_METRICS[task] in results:
        return PRIMARY_METRICS[task]
    return next(
        (k for k, v in results.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))), None
    )


def comparison(per_model: Mapping[str, Mapping[str, Any]], tasks: Mapping[str, str]) -> dict[str, Any]:
    """Per task: each model's primary metric with lm-eval's stderr, n and a 95% Wilson interval, and the
    ensemble's difference to the best member (from lm-eval's results dicts alone)."""
    from salm.evaluation.stats import improvement_over_best, wilson_interval

    rows = {}
    for requested, task in tasks.items():
        entry: dict[str, Any] = {"task": task, "models": {}}
        for name, res in per_model.items():
            r = res.get("results", {}).get(task)
            if r is None:
                continue
            metric = primary_metric(task, r)
            if metric is None:
                continue
            value = float(r[metric])
            stderr = r.get(metric.replace(",", "_stderr,", 1))
            n = int(res.get("n-samples", {}).get(task, {}).get("effective", 0))
            low, high = wilson_interval(round(value * n), n) if n and 0 <= value <= 1 else (None, None)
            entry["metric"] = metric
            entry["models"][name] = {
                "value": value,
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "n": n,
                "ci_low": low,
                "ci_high": high,
            }
            if task in GSM8K_LIKE:
                flex = r.get("exact_match,flexible-extract")
                entry["models"][name]["flexible"] = float(flex) if flex is not None else None
        members = {k: v["value"] for k, v in entry["models"].items() if k != ENSEMBLE}
        if ENSEMBLE in entry["models"] and members:
            entry["ensemble_minus_best"] = improvement_over_best(entry["models"][ENSEMBLE]["value"], members)
        rows[requested] = entry
    return rows


def render_comparison(rows: Mapping[str, Any], models: Sequence[str], settings: Mapping[str, Any]) -> str:
    lines = [
        "# saLM through lm-evaluation-harness",
        "",
        f"Routing of the ensemble: `{settings['routing']}`; members run as `member:<id>` through the same model "
        f"class. Few-shot: {settings['num_fewshot'] if settings['num_fewshot'] is not None else 'task default'} "
        f"(lm-eval fewshot seed {settings['fewshot_seed']}); limit: {settings['limit'] or 'none'}.",
        f"Heads: `{settings['weights']}`."
        if settings.get("weights")
        else "**Heads: UNTRAINED (random initialisation; no --weights): the ensemble's numbers say nothing about "
        "saLM.**",
        "Each cell: metric ± lm-eval's stderr [95% Wilson interval].",
        "",
        "| task (lm-eval task, metric) | n | " + " | ".join(models) + " | ensemble − best member |",
        "|" + "---|" * (len(models) + 3),
    ]
    for requested, e in rows.items():
        cells = []
        n = next((m["n"] for m in e["models"].values()), 0)
        for name in models:
            m = e["models"].get(name)
            if m is None:
                cells.append("—")
                continue
            s = f"{m['value']:.3f}"
            if m["stderr"] is not None:
                s += f" ± {m['stderr']:.3f}"
            if m["ci_low"] is not None:
                s += f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
            cells.append(s)
        d = e.get("ensemble_minus_best")
        delta = f"{d['delta']:+.3f} (best: {d['best_member']})" if d else "—"
        lines.append(
            f"| {requested} ({e['task']}, {e.get('metric', '?')}) | {n} | " + " | ".join(cells) + f" | {delta} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(rows: Mapping[str, Any], models: Sequence[str], members: Sequence[str], path: Path) -> None:
    from salm.display import member_colour
    from salm.evaluation.reports import ENSEMBLE_COLOUR
    from salm.plotting import figure, save_png

    tasks = [t for t, e in rows.items() if e["models"]]
    if not tasks:
        return
    fig = figure(max(5.0, 1.5 * len(tasks) * len(models) / 2), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for j, name in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for i, t in enumerate(tasks):
            m = rows[t]["models"].get(name)
            if m is None:
                continue
            xs.append(i + (j - (len(models) - 1) / 2) * width)
            ys.append(m["value"])
            lo.append(m["value"] - m["ci_low"] if m["ci_low"] is not None else 0.0)
            hi.append(m["ci_high"] - m["value"] if m["ci_high"] is not None else 0.0)
        colour = member_colour(members, name) if name in members else ENSEMBLE_COLOUR
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name, color=colour)
    ax.set_xticks(range(len(tasks)), [f"{t}\n{rows[t].get('metric', '')}" for t in tasks])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("lm-evaluation-harness: ensemble and members")
    save_png(fig, path, bbox_inches="tight")


def _settings_key(settings: Mapping[str, Any], name: str, routing: str, heads: str, members: list[str]) -> str:
    """What a model's results depend on; a member's do not depend on the heads or the ensemble's routing, so its
    results are reused by a later run in the same folder with other heads."""
    own = {k: v for k, v in settings.items() if name == ENSEMBLE or k not in ("weights", "routing")}
    blob = json.dumps({**own, "model": name, "routing": routing, "heads": heads, "members": members}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_model_results(out: Path, results: dict[str, Any], key: str) -> dict[str, Any]:
    """lm-eval's results JSON (its own serialisation) plus the samples per task, atomically."""
    from lm_eval.utils import handle_non_serializable

    samples = results.pop("samples", None) or {}
    results["salm_harness_key"] = key
    clean = json.loads(json.dumps(results, default=handle_non_serializable))
    for task, rows in samples.items():
        atomic_write_jsonl(
            out / f"samples_{task}.jsonl", (json.loads(json.dumps(r, default=handle_non_serializable)) for r in rows)
        )
    atomic_write_json(out / "results.json", clean)
    return clean


def run_harness(
    ensemble: Any,
    tasks: Mapping[str, str],
    output_dir: str | Path,
    settings: Mapping[str, Any],
    data_dir: Path,
    only_ensemble: bool = False,
    plots: bool = True,
    weights: str | None = None,
    tm: Any = None,
) -> dict[str, Any] | None:
    """Evaluate the ensemble (``settings["routing"]``) and each member (``member:<id>``) with lm-eval; rank 0
    writes the outputs and returns the comparison (other ranks return None). ``tm``: the task manager
    :func:`load_task_manager` built (and checked the tasks with) before the members loaded."""
    import lm_eval

    from salm.evaluation.generations import heads_fingerprint
    from salm.harness.adapter import SalmLM, process_state

    if ENSEMBLE in ensemble.model_ids:
        raise HarnessError(f"a member may not be called {ENSEMBLE!r}: that name is the ensemble's in the table")
    settings = check_settings(settings)
    out = Path(output_dir)
    models = {ENSEMBLE: settings["routing"]}
    if not only_ensemble:
        models.update({mid: f"member:{mid}" for mid in ensemble.model_ids})
    tm = tm if tm is not None else load_task_manager(tasks, data_dir)
    heads = heads_fingerprint(ensemble)
    per_model: dict[str, dict[str, Any]] = {}
    state = process_state()
    rank = state.process_index if state is not None else 0
    for name, routing in models.items():
        key = _settings_key(settings, name, routing, heads if name == ENSEMBLE else "", list(ensemble.model_ids))
        done = out / name / "results.json"
        if done.is_file():
            try:
                previous = json.loads(done.read_text())
            except ValueError:
                previous = {}
            if previous.get("salm_harness_key") == key:
                print(f"salm harness: {name}: reusing {done} (same settings)", file=sys.stderr)
                per_model[name] = previous
                continue
        lm = SalmLM(
            ensemble=ensemble,
            routing=routing,
            batch_size=settings["batch_size"],
            max_gen_toks=settings["max_gen_toks"],
            weights=weights,
        )
        print(f"salm harness: evaluating {name} (routing {routing}) on {', '.join(tasks.values())}", file=sys.stderr)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks.values()),
            num_fewshot=settings["num_fewshot"],
            limit=settings["limit"],
            task_manager=tm,
            log_samples=True,
            fewshot_random_seed=settings["fewshot_seed"],
        )
        if lm.rank == 0 and results is not None:
            per_model[name] = _write_model_results(out / name, results, key)
    if rank != 0:
        return None
    rows = comparison(per_model, tasks)
    names = list(models)
    summary = {"settings": dict(settings), "tasks": dict(tasks), "models": models, "comparison": rows}
    summary["compute"] = compute_record(ensemble)
    atomic_write_json(out / "comparison.json", summary)
    atomic_write_text(out / "comparison.md", render_comparison(rows, names, settings))
    if plots:
        plot_comparison(rows, names, list(ensemble.model_ids), out / "comparison.png")
    return summary
