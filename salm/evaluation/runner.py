"""``salm evaluate``: the ensemble against each of its members on the same prompts, with the same decoding.

Fairness is structural: every member is evaluated as the ensemble itself with ``routing="member:<id>"``,
so prompts, batching, stopping rules, seeds and answer extraction are shared code, not parallel copies.

An evaluation flows through one module per step: :mod:`~salm.evaluation.settings` (what decides the
numbers, checked up front) -> :mod:`~salm.evaluation.inputs` (which examples, loaded and sampled before
any member loads) -> :mod:`~salm.evaluation.modes` (generate, resuming from
:mod:`~salm.evaluation.generations`, and/or score options; headline numbers) -> teacher forcing
(:mod:`~salm.evaluation.analysis`) -> the files written here and by :mod:`~salm.evaluation.reports`.

Per dataset the runner writes ``results.json`` (accuracy with Wilson intervals per model, detection
rate, log-likelihood multiple choice, decision patterns, teacher-forced NLLs, settings) and
``predictions.jsonl``; for the whole run ``evaluation_summary.json``, ``report.md``, plots and (with
``save_examples``) ``examples.html``. ``salm evaluate`` (:mod:`salm.commands.evaluate`) is its command.
The names of every step's module are re-exported here, where callers have always imported them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from salm.cpu import compute_record
from salm.data import Example
from salm.display import nested_progress
from salm.evaluation import reports
from salm.evaluation.analysis import teacher_forced_metrics
from salm.evaluation.generations import GENERATIONS_DIR, count_cut_prompts, heads_fingerprint
from salm.evaluation.inputs import (
    TaskSpec,
    load_task_examples,
    prepare_tasks,
    sample_examples,
    unavailable_message,
)
from salm.evaluation.modes import TaskRuns, add_generative, add_loglik, choose_modes, promote_headlines
from salm.evaluation.settings import CHOICE_MODES, ENSEMBLE, EvalSettings, model_names
from salm.evaluation.tasks import DEFAULT_TASKS, Task
from salm.io import (
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    output_lock,
    report_stale_temporaries,
)

logger = logging.getLogger(__name__)

SUMMARY_NAME = "evaluation_summary.json"

__all__ = [
    "CHOICE_MODES",
    "ENSEMBLE",
    "GENERATIONS_DIR",
    "SUMMARY_NAME",
    "EvalSettings",
    "TaskSpec",
    "choose_modes",
    "count_cut_prompts",
    "evaluate",
    "evaluate_task",
    "heads_fingerprint",
    "load_task_examples",
    "prepare_tasks",
    "promote_headlines",
    "sample_examples",
    "unavailable_message",
]


# ----------------------------------------------------------------------------------------------------
# One task
# ----------------------------------------------------------------------------------------------------


def evaluate_task(
    model: Any, task: Task, examples: list[Example], settings: EvalSettings, out_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate one task; writes ``results.json`` and ``predictions.jsonl`` into ``out_dir``.

    choose modes -> generate and/or score options -> headline numbers -> teacher forcing -> write.
    Returns (the results dict, HTML items for the examples page).
    """
    t0 = time.perf_counter()
    names = model_names(model, settings)
    prompts = [task.prompt(ex) for ex in examples]
    n_cut = _warn_cut_prompts(model, task, prompts, settings)
    do_gen, do_loglik = choose_modes(task, examples, settings)
    runs = TaskRuns(names)
    if do_gen:
        add_generative(runs, model, task, examples, prompts, settings, out_dir)
    if do_loglik:
        add_loglik(runs, model, task, examples, settings)
    promote_headlines(runs.models)
    teacher = _teacher_forced(model, task, examples, settings) if settings.teacher_forced else None
    result = {
        "dataset": task.name,
        "task": task.describe(),
        "n": len(examples),
        "example_ids": [ex.id for ex in examples],
        "prompts_cut_to_context": n_cut,
        "random_baseline": task.random_baseline,
        "majority_baseline": _majority_baseline(examples),
        "models": runs.models,
        "improvement_over_best": runs.improvement,
        "decision_patterns": runs.patterns,
        "teacher_forced": teacher,
        "settings": {**settings.to_dict(), "members": list(model.model_ids)},
        "compute": compute_record(model),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out_dir / "results.json", result)
    atomic_write_jsonl(out_dir / "predictions.jsonl", runs.predictions)
    return result, runs.html


def _warn_cut_prompts(model: Any, task: Task, prompts: list[str], settings: EvalSettings) -> int:
    n_cut = count_cut_prompts(model.tokenizer, prompts, model.context_length, settings.decode.max_new_tokens)
    if n_cut:
        logger.warning(
            "%s: %d of %d prompts were cut from the left to fit the smallest member's context (%s tokens)",
            task.name,
            n_cut,
            len(prompts),
            model.context_length,
        )
    return n_cut


def _majority_baseline(examples: Sequence[Example]) -> float | None:
    labels = [str(ex.label).strip().lower() for ex in examples if ex.label is not None]
    if not labels:
        return None
    return max(labels.count(v) for v in set(labels)) / len(labels)


def _teacher_forced(model: Any, task: Task, examples: list[Example], settings: EvalSettings) -> dict[str, Any]:
    return teacher_forced_metrics(
        model,
        examples,
        settings.batch_size,
        prompt=task.prompt,
        target=task.target,
        progress=nested_progress(settings.progress),
        desc=f"{task.name} teacher forcing",
    )


# ----------------------------------------------------------------------------------------------------
# A whole run
# ----------------------------------------------------------------------------------------------------


def evaluate(
    model: Any,
    tasks: Sequence[TaskSpec] = DEFAULT_TASKS,
    output_dir: str | Path = "evaluation_results",
    settings: EvalSettings | None = None,
    data: Mapping[str, str] | None = None,
    skipped: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (and, unless ``settings.only_ensemble``, each member) on ``tasks``.

    ``tasks`` are registered names, :class:`Task` objects, or ``(task, examples)`` pairs for examples
    already in hand (sampled with ``settings.sample_size`` like loaded ones). ``data`` maps task names to
    local files. ``skipped`` adds datasets the caller already gave up on to the reports. Writes every
    output file under ``output_dir`` and returns the summary (also ``evaluation_summary.json``).
    Holds ``output_dir``'s lock (:func:`salm.io.output_lock`) throughout: two runs never mix their files.
    """
    with output_lock(output_dir, "salm evaluate"):
        report_stale_temporaries(output_dir, recursive=True, untagged=True, prog="salm evaluate")
        return _evaluate(model, tasks, output_dir, settings, data, skipped)


def _evaluate(
    model: Any,
    tasks: Sequence[TaskSpec],
    output_dir: str | Path,
    settings: EvalSettings | None,
    data: Mapping[str, str] | None,
    skipped: Mapping[str, str] | None,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    settings = settings or EvalSettings()
    settings.validate()
    out = Path(output_dir)
    runs, newly_skipped = prepare_tasks(tasks, settings, data)
    skipped = {**dict(skipped or {}), **newly_skipped}
    for message in newly_skipped.values():
        logger.warning("skipped %s", message)
    t0 = time.perf_counter()
    datasets: dict[str, Any] = {}
    html: list[dict[str, Any]] = []
    for task, examples in tqdm(runs, desc="datasets", unit="dataset", disable=not settings.progress):
        result, items = evaluate_task(model, task, examples, settings, out / task.name)
        datasets[task.name] = result
        html += items
    summary: dict[str, Any] = {
        "settings": {**settings.to_dict(), "members": list(model.model_ids)},
        "compute": compute_record(model),
        "models": model_names(model, settings),
        "datasets": datasets,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 2),
        "files": {
            name: {"results": f"{name}/results.json", "predictions": f"{name}/predictions.jsonl"} for name in datasets
        },
    }
    _write_run_files(model, summary, settings, html, out)
    return summary


def _write_run_files(
    model: Any, summary: dict[str, Any], settings: EvalSettings, html: list[dict[str, Any]], out: Path
) -> None:
    """The whole run's files (plots, examples page, summary, report); records their names in ``summary``."""
    if summary["datasets"] and settings.plots:
        summary["plots"] = reports.write_plots(summary, out)
    if settings.save_examples and html:
        reports.write_examples_html(html, list(model.model_ids), out / "examples.html")
        summary["examples_html"] = "examples.html"
    summary["report"] = "report.md"
    atomic_write_json(out / SUMMARY_NAME, summary)
    atomic_write_text(out / "report.md", reports.render_report(summary))
