"""One task's two ways of answering, run for every model and scored: generation and option log-likelihood.

``choose_modes`` picks which apply (a task's options and ``choice_mode``); ``add_generative`` generates
(or resumes, :mod:`salm.evaluation.generations`) and scores each model's outputs; ``add_loglik`` picks
each model's most likely option; ``promote_headlines`` lifts each model's headline numbers to the top of
its entry. Both modes fill one :class:`TaskRuns`, which :func:`salm.evaluation.runner.evaluate_task` writes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salm.data import Example
from salm.display import nested_progress
from salm.evaluation import reports
from salm.evaluation.analysis import decision_patterns, kept_decisions, score_continuations
from salm.evaluation.generations import generate_or_reuse, generation_key
from salm.evaluation.settings import ENSEMBLE, EvalSettings
from salm.evaluation.stats import accuracy_summary, improvement_over_best
from salm.evaluation.tasks import Task

logger = logging.getLogger(__name__)

__all__ = ["TaskRuns", "add_generative", "add_loglik", "choose_modes", "promote_headlines"]


@dataclass
class TaskRuns:
    """What one task's runs collect: per-model results by mode, prediction rows, the ensemble's decision
    patterns and examples-page items, and the ensemble's improvement over the best member per mode."""

    names: list[str]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    patterns: dict[str, Any] = field(default_factory=dict)
    html: list[dict[str, Any]] = field(default_factory=list)
    improvement: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.models = {name: {} for name in self.names}


def choose_modes(task: Task, examples: Sequence[Example], settings: EvalSettings) -> tuple[bool, bool]:
    """(generate?, score options by log-likelihood?). Log-likelihood needs options (a formatted MedQA copy
    may have none): without them a task that asked for loglik only falls back to generation."""
    has_choices = any(build(ex) for build in task.loglik.values() for ex in examples)
    do_loglik = has_choices and settings.choice_mode != "generative"
    do_gen = task.generative and (settings.choice_mode != "loglik" or not do_loglik)
    return do_gen, do_loglik


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------


def add_generative(
    runs: TaskRuns,
    model: Any,
    task: Task,
    examples: list[Example],
    prompts: list[str],
    settings: EvalSettings,
    out_dir: Path,
) -> None:
    names = runs.names
    gen, rows, runs.patterns, runs.html = _run_generative(model, task, examples, prompts, names, settings, out_dir)
    runs.predictions += rows
    for name in names:
        runs.models[name]["generative"] = gen[name]
    if len(names) > 1:
        runs.improvement["generative"] = improvement_over_best(
            gen[ENSEMBLE]["accuracy"], {n: gen[n]["accuracy"] for n in names if n != ENSEMBLE}
        )


def _run_generative(
    model: Any,
    task: Task,
    examples: list[Example],
    prompts: list[str],
    names: list[str],
    settings: EvalSettings,
    out_dir: Path,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Generate with every model on the same prompts; (per-model summaries, prediction rows, decision
    patterns of the ensemble, HTML items). Each model's finished generations are stored, so a rerun of an
    interrupted evaluation resumes at the first model that had not finished."""
    summaries: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    ensemble_members: list[list[str]] = []
    html: list[dict[str, Any]] = []
    key = generation_key(model, task, prompts, settings)
    for name in names:
        outputs = generate_or_reuse(model, task, prompts, name, settings, out_dir, key)
        scores = []
        for i, (ex, out) in enumerate(zip(examples, outputs)):
            score = dict(task.scorer(out.text, ex))
            scores.append(score)
            kept = kept_decisions(out, model.tokenizer)
            per_member = {m: 0 for m in model.model_ids}
            for d in kept:
                per_member[d.member] = per_member.get(d.member, 0) + 1
            rows.append(
                {
                    "id": ex.id,
                    "model": name,
                    "mode": "generative",
                    "output": out.text,
                    **score,
                    "stop_reason": out.stop_reason,
                    "tokens": len(out.token_ids),
                    "tokens_per_member": per_member,
                }
            )
            if name == ENSEMBLE:
                ensemble_members.append([d.member for d in kept])
                if settings.save_examples and i < settings.num_examples:
                    html.append(reports.example_item(task.name, ex, score, kept))
        summaries[name] = _generative_summary(task, scores, outputs)
        logger.info("%s: %s accuracy %.3f", task.name, name, summaries[name]["accuracy"])
    patterns = decision_patterns(ensemble_members, model.model_ids) if ensemble_members else {}
    return summaries, rows, patterns, html


def _generative_summary(task: Task, scores: Sequence[Mapping[str, Any]], outputs: Sequence[Any]) -> dict[str, Any]:
    summary = accuracy_summary(s["correct"] for s in scores)
    n = len(scores)
    summary["detection_rate"] = sum(s.get("answer") is not None for s in scores) / n if n else 0.0
    summary["metrics"] = {
        name: accuracy_summary(bool(s.get(key)) for s in scores) for name, key in task.metrics.items()
    }
    summary["mean_generated_tokens"] = sum(len(o.token_ids) for o in outputs) / n if n else 0.0
    reasons: dict[str, int] = {}
    for o in outputs:
        reasons[o.stop_reason] = reasons.get(o.stop_reason, 0) + 1
    summary["stop_reasons"] = reasons
    return summary


# ----------------------------------------------------------------------------------------------------
# Log-likelihood multiple choice
# ----------------------------------------------------------------------------------------------------


def add_loglik(runs: TaskRuns, model: Any, task: Task, examples: list[Example], settings: EvalSettings) -> None:
    names = runs.names
    ll, rows = _run_loglik(model, task, examples, names, settings)
    runs.predictions += rows
    first = next(iter(task.loglik))
    for name in names:
        runs.models[name]["loglik"] = ll[name]
    if len(names) > 1 and ll[ENSEMBLE]:
        runs.improvement["loglik"] = improvement_over_best(
            ll[ENSEMBLE][first]["acc"]["accuracy"],
            {n: ll[n][first]["acc"]["accuracy"] for n in names if n != ENSEMBLE},
        )


def _run_loglik(
    model: Any, task: Task, examples: list[Example], names: list[str], settings: EvalSettings
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Pick the option whose continuation is most likely (lm-eval multiple choice), per variant.

    One teacher-forced pass over the ensemble gives every member's log-probs too; the ensemble's score is
    the router-weighted mixture's (``log sum_m pi_m p_m`` per token). ``acc_norm`` divides by the
    continuation's length in bytes, as lm-eval does.
    """
    results: dict[str, dict[str, Any]] = {name: {} for name in names}
    rows: list[dict[str, Any]] = []
    for variant, build in task.loglik.items():
        pairs: list[tuple[str, str]] = []
        owners: list[tuple[int, str, int]] = []
        for i, ex in enumerate(examples):
            for label, continuation in build(ex):
                pairs.append((task.prompt(ex), continuation))
                owners.append((i, label, max(len(continuation.encode("utf-8")), 1)))
        if not pairs:
            continue
        scores = score_continuations(
            model, pairs, settings.batch_size, nested_progress(settings.progress), f"{task.name} loglik/{variant}"
        )
        for name in names:
            ll = scores.mixture if name == ENSEMBLE else scores.member[:, model.model_ids.index(name)]
            per_example: dict[int, list[tuple[str, float, int]]] = {}
            for (i, label, nbytes), value in zip(owners, ll.tolist()):
                per_example.setdefault(i, []).append((label, value, nbytes))
            results[name][variant] = _pick_options(examples, per_example, name, variant, rows)
    return results, rows


def _pick_options(
    examples: list[Example],
    per_example: Mapping[int, list[tuple[str, float, int]]],
    name: str,
    variant: str,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """One model's picks for one variant from its (label, log-prob, bytes) per option; appends a prediction
    row per example to ``rows`` and returns the ``acc`` and ``acc_norm`` summaries."""
    correct, correct_norm = [], []
    for i, ex in enumerate(examples):
        options = per_example.get(i, [])
        gold = str(ex.label).strip().upper()
        # An example without options cannot be answered this way: it counts as wrong, never skipped.
        pick = max(options, key=lambda o: o[1])[0] if options else None
        pick_norm = max(options, key=lambda o: o[1] / o[2])[0] if options else None
        correct.append(pick == gold)
        correct_norm.append(pick_norm == gold)
        rows.append(
            {
                "id": ex.id,
                "model": name,
                "mode": "loglik",
                "variant": variant,
                "answer": pick,
                "answer_norm": pick_norm,
                "gold": gold,
                "correct": pick == gold,
                "correct_norm": pick_norm == gold,
                "logprobs": {label: value for label, value, _ in options},
            }
        )
    return {"acc": accuracy_summary(correct), "acc_norm": accuracy_summary(correct_norm)}


def promote_headlines(models: dict[str, dict[str, Any]]) -> None:
    """Each model's headline numbers (accuracy, interval, n, ...) at the top of its entry: the generative
    run's when there was one, else the first log-likelihood variant's ``acc``."""
    for entry in models.values():
        if "generative" in entry:
            head = entry["generative"]
            entry.update({k: head[k] for k in ("accuracy", "ci_low", "ci_high", "n", "correct", "detection_rate")})
            entry["primary"] = "generative"
        elif entry.get("loglik"):
            head = next(iter(entry["loglik"].values()))["acc"]
            entry.update({k: head[k] for k in ("accuracy", "ci_low", "ci_high", "n", "correct")})
            entry["detection_rate"] = 1.0  # a likelihood comparison always yields an answer
            entry["primary"] = f"loglik/{next(iter(entry['loglik']))}"
