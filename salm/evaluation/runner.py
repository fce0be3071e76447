"""``salm evaluate``: the ensemble against each of its members on the same prompts, with the same decoding.

Fairness is structural: every member is evaluated as the ensemble itself with ``routing="member:<id>"``,
so prompts, batching, stopping rules, seeds and answer extraction are shared code, not parallel copies.

Per dataset the runner writes ``results.json`` (accuracy with Wilson intervals per model, detection
rate, log-likelihood multiple choice, decision patterns, teacher-forced NLLs, settings) and
``predictions.jsonl``; for the whole run ``evaluation_summary.json``, ``report.md``, plots and (with
``save_examples``) ``examples.html``. ``salm evaluate`` (:mod:`salm.commands.evaluate`) is its command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from salm.cpu import compute_record
from salm.data import DATASETS, DataFormatError, DatasetUnavailableError, Example, load_examples
from salm.display import nested_progress, progress_message
from salm.evaluation import reports
from salm.evaluation.analysis import (
    decision_patterns,
    kept_decisions,
    score_continuations,
    teacher_forced_metrics,
)
from salm.evaluation.stats import accuracy_summary, improvement_over_best
from salm.evaluation.tasks import DEFAULT_TASKS, TASKS, Task, draw_shots, generic_task, with_fewshot
from salm.generation import DecodeConfig, GenerationError, check_batch_size, prompt_budget
from salm.io import (
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    output_lock,
    report_stale_temporaries,
)

logger = logging.getLogger(__name__)

ENSEMBLE = "ensemble"
CHOICE_MODES = ("generative", "loglik", "both")
SUMMARY_NAME = "evaluation_summary.json"
GENERATIONS_DIR = "generations"  # per task folder: each model's finished outputs, for resuming

__all__ = [
    "CHOICE_MODES",
    "ENSEMBLE",
    "EvalSettings",
    "evaluate",
    "evaluate_task",
    "count_cut_prompts",
    "load_task_examples",
    "prepare_tasks",
    "sample_examples",
    "unavailable_message",
]


def _default_decoding() -> DecodeConfig:
    return DecodeConfig(max_new_tokens=512, temperature=0.3)  # salm evaluate's defaults since the seed


@dataclass
class EvalSettings:
    """Everything that decides the numbers; written into every results file.

    ``decode`` is how every model decodes (its ``seed`` is ignored: ``random_seed`` seeds both the sample
    and decoding; its ``stop`` strings are added to each task's own; prompts are always cut from the left
    to fit). ``sample_size=None`` (or 0) evaluates every example. ``choice_mode`` applies to tasks with
    log-likelihood variants (MedQA). ``weights`` is only recorded (None = untrained heads).
    """

    sample_size: int | None = 50
    random_seed: int = 42
    decode: DecodeConfig = field(default_factory=_default_decoding)
    batch_size: int = 8
    only_ensemble: bool = False
    choice_mode: str = "both"
    teacher_forced: bool = True
    resume: bool = True
    save_examples: bool = False
    num_examples: int = 5
    plots: bool = True
    split: str | None = None
    weights: str | None = None
    progress: bool = True
    num_fewshot: int = 0

    def validate(self) -> None:
        problems = []
        d = self.decode
        if self.sample_size is not None and self.sample_size < 0:
            problems.append(f"sample_size must be >= 0 (0 = all), got {self.sample_size}")
        if d.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {d.max_new_tokens}")
        if d.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {d.temperature}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.choice_mode not in CHOICE_MODES:
            problems.append(f"choice mode must be one of {', '.join(CHOICE_MODES)}, got {self.choice_mode!r}")
        if self.num_examples < 0:
            problems.append(f"num_examples must be >= 0, got {self.num_examples}")
        if self.num_fewshot < 0:
            problems.append(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if not problems:  # types, NaN and the routing's syntax, before any member loads
            try:
                self.decoding_for(d.routing).validate()
                check_batch_size(self.batch_size)
            except GenerationError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))

    def decoding_for(self, routing: str, stop: Sequence[str] = ()) -> DecodeConfig:
        """The decoding of one model's run: ``routing``, the task's ``stop`` strings, the run's seed."""
        return replace(
            self.decode, routing=routing, stop=[*stop, *self.decode.stops], seed=self.random_seed, truncate="left"
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat, as results files have always held it (the decoding keys where they always were)."""
        d = asdict(self)
        decode = d.pop("decode")
        out: dict[str, Any] = {"sample_size": d.pop("sample_size"), "random_seed": d.pop("random_seed")}
        out.update({k: decode[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "routing")})
        num_fewshot = d.pop("num_fewshot")
        out.update(d)
        out["compile"] = decode["compile"]
        if decode["stop"]:
            out["stop"] = self.decode.stops
        out["num_fewshot"] = num_fewshot
        out["heads"] = "trained" if self.weights else "untrained (random initialisation)"
        return out


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def unavailable_message(task: Task, split: str | None = None) -> str:
    """The one-line way out when a dataset cannot be reached: the exact ``--data`` flag to pass."""
    spec = DATASETS.get(task.source or "")
    split = split or task.split or (spec.default_split if spec else None)
    relpath = (spec.local_relpaths.get(split or "") if spec else None) or f"{task.name}/{split or 'test'}.jsonl"
    if task.source is None:
        return f"{task.name}: the task has no default source; pass --data {task.name}=/path/to/{relpath}"
    return f"{task.name}: the hub is unreachable; pass --data {task.name}=/path/to/{relpath}"


def load_task_examples(task: Task, split: str | None = None) -> list[Example]:
    """All examples of ``task``'s source (a local file, a known name or a hub id)."""
    if task.source is None:
        raise DatasetUnavailableError(unavailable_message(task, split))
    is_file = Path(task.source).expanduser().is_file()
    return load_examples(task.source, split=split if is_file else (split or task.split), name=task.name)


def sample_examples(examples: Sequence[Example], k: int | None, seed: int) -> list[Example]:
    """``k`` examples drawn with ``seed`` (kept in dataset order); every model then sees the same ones."""
    if not k or k >= len(examples):
        return list(examples)
    idx = sorted(random.Random(seed).sample(range(len(examples)), k))
    return [examples[i] for i in idx]


def _scorable(task: Task, examples: Sequence[Example]) -> list[Example]:
    """Drop examples whose gold answer the scorer cannot read (a bad row must not count as a wrong answer)."""
    if task.scorer is None:
        return list(examples)
    keep, dropped = [], []
    for ex in examples:
        try:
            task.scorer("", ex)
        except (ValueError, KeyError) as e:
            dropped.append(f"{ex.id}: {e}")
            continue
        keep.append(ex)
    if dropped:
        logger.warning(
            "%s: %d examples without a usable gold answer were left out (first: %s)",
            task.name,
            len(dropped),
            dropped[0],
        )
    return keep


TaskSpec = str | Task | tuple[str | Task, Sequence[Example]]


def prepare_tasks(
    tasks: Sequence[TaskSpec],
    settings: EvalSettings,
    data: Mapping[str, str] | None = None,
) -> tuple[list[tuple[Task, list[Example]]], dict[str, str]]:
    """Resolve task names, apply ``data`` (name -> local file) and ``settings.split``, load and sample.

    Returns (tasks with their sampled examples, {task name: why it was skipped}). A dataset that cannot
    be loaded is skipped with a message naming the flag that fixes it; the others still run.
    """
    data = dict(data or {})
    runs: list[tuple[Task, list[Example]]] = []
    skipped: dict[str, str] = {}
    for spec in tasks:
        given: Sequence[Example] | None = None
        if isinstance(spec, tuple):
            spec, given = spec
        if isinstance(spec, Task):
            task = spec
        elif spec in TASKS:
            task = TASKS.get(spec)
        elif spec in data:
            task = generic_task(spec)
        else:
            raise KeyError(
                f"unknown dataset {spec!r}: registered tasks are {', '.join(TASKS.names())}; "
                f"pass --data {spec}=/path/to/file.jsonl to evaluate a new one"
            )
        if task.name in data:
            task = task.with_source(data[task.name])
        if given is None:
            try:
                examples = load_task_examples(task, settings.split)
            except DatasetUnavailableError as e:
                logger.debug("%s: %s", task.name, e)
                skipped[task.name] = unavailable_message(task, settings.split)
                continue
            except (FileNotFoundError, IsADirectoryError, DataFormatError) as e:
                skipped[task.name] = f"{task.name}: could not read {task.source}: {e}"
                continue
        else:
            examples = list(given)
        usable = _scorable(task, examples)
        examples = sample_examples(usable, settings.sample_size, settings.random_seed)
        if not examples:
            skipped[task.name] = f"{task.name}: no usable examples"
            continue
        if settings.num_fewshot:
            try:
                task = _fewshot_task(task, examples, usable, settings, given is None)
            except ValueError as e:
                skipped[task.name] = str(e)
                continue
        runs.append((task, examples))
    return runs, skipped


def _fewshot_task(
    task: Task, examples: list[Example], usable: list[Example], settings: EvalSettings, loaded: bool
) -> Task:
    """The task with ``settings.num_fewshot`` shots per example (:func:`salm.evaluation.tasks.draw_shots`).

    Shots come from the dataset's train split when it has one (a known dataset or hub id evaluated on another
    split); otherwise, e.g. for a single local file, from its rows that are not being evaluated.
    """
    pool, source = None, None
    split = settings.split or task.split
    is_file = task.source is not None and Path(task.source).expanduser().is_file()
    if loaded and task.source is not None and not is_file and split != "train":
        try:
            pool = _scorable(task, load_examples(task.source, split="train", name=task.name))
            source = f"train split of {task.source}"
        except (DatasetUnavailableError, DataFormatError, FileNotFoundError, ValueError) as e:
            logger.info("%s: no train split for shots (%s); using rows not evaluated", task.name, e)
    if pool is None:
        evaluated = {ex.id for ex in examples}
        pool = [ex for ex in usable if ex.id not in evaluated]
        source = "rows of the evaluated data that are not evaluated"
    if len(pool) < settings.num_fewshot:
        raise ValueError(
            f"{task.name}: --num_fewshot {settings.num_fewshot} needs that many shots but only {len(pool)} "
            f"{source} are available; lower --sample_size or --num_fewshot"
        )
    shots = draw_shots(task.name, examples, pool, settings.num_fewshot, settings.random_seed)
    return with_fewshot(task, shots, k=settings.num_fewshot, seed=settings.random_seed, source=source)


def count_cut_prompts(tokenizer: Any, prompts: Sequence[str], context_length: int | None, room: int) -> int:
    """How many prompts generation's ``truncate="left"`` will cut (every model gets the same cut prompt, so
    the comparison stays fair; the count is reported)."""
    if context_length is None:
        return 0
    budget = prompt_budget(context_length, room)
    return sum(len(tokenizer(p)["input_ids"]) > budget for p in prompts)


# ----------------------------------------------------------------------------------------------------
# One task
# ----------------------------------------------------------------------------------------------------


def _model_names(model: Any, settings: EvalSettings) -> list[str]:
    names = [ENSEMBLE] + ([] if settings.only_ensemble else list(model.model_ids))
    if ENSEMBLE in model.model_ids:
        raise ValueError(f"a member may not be called {ENSEMBLE!r}: that name is the ensemble's in every report")
    return names


def _routing(name: str, settings: EvalSettings) -> str:
    return settings.decode.routing if name == ENSEMBLE else f"member:{name}"


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


def heads_fingerprint(model: Any) -> str:
    """Hash of the routing heads' weights: stored generations are only reused with the same heads."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def _generation_key(model: Any, task: Task, prompts: list[str], settings: EvalSettings) -> dict[str, Any]:
    """Everything but the routing that decides a task's generations; computed once per task."""
    from salm.features import member_fingerprint

    return {
        "task": task.name,
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "stop": settings.decoding_for(settings.decode.routing, task.stop).stops,
        "decoding": [
            settings.decode.max_new_tokens,
            settings.decode.temperature,
            settings.decode.top_p,
            settings.decode.top_k,
        ],  # fmt: skip
        "seed": settings.random_seed,
        "batch_size": settings.batch_size,
        "members": [member_fingerprint(info) for info in model.infos],
        "dtype": str(model.dtype),
        "heads": heads_fingerprint(model),
    }


def _generate_or_reuse(
    model: Any,
    task: Task,
    prompts: list[str],
    name: str,
    settings: EvalSettings,
    out_dir: Path,
    key: dict[str, Any],
) -> list[Any]:
    """One model's outputs: read back when an earlier run with the same key (``key`` plus this model's
    routing) finished them, else generated and stored atomically (an interrupted run never leaves a
    partial file that a later run trusts)."""
    from salm.generation import GenerationOutput

    full_key = json.dumps({**key, "routing": _routing(name, settings)}, sort_keys=True)
    path = out_dir / GENERATIONS_DIR / f"{name}-{hashlib.sha256(full_key.encode()).hexdigest()[:16]}.jsonl"
    if settings.resume and path.is_file():
        try:
            outputs = [GenerationOutput.from_dict(json.loads(line)) for line in path.read_text().splitlines()]
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("%s: ignoring unreadable stored generations %s (%s)", task.name, path, e)
        else:
            if len(outputs) == len(prompts):
                logger.info("%s: reusing %s's generations from %s", task.name, name, path)
                if settings.progress:
                    progress_message(f"{task.name}: reusing {name}'s finished generations ({path})")
                return outputs
    logger.info("%s: generating with %s (%d prompts)", task.name, name, len(prompts))
    outputs = model.generate(
        prompts,
        config=settings.decoding_for(_routing(name, settings), task.stop),
        batch_size=settings.batch_size,
        return_outputs=True,
        progress=nested_progress(settings.progress),  # inside the datasets bar: only on a terminal
    )
    atomic_write_jsonl(path, (o.to_dict() for o in outputs))
    return outputs


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
    key = _generation_key(model, task, prompts, settings)
    for name in names:
        outputs = _generate_or_reuse(model, task, prompts, name, settings, out_dir, key)
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
            results[name][variant] = {"acc": accuracy_summary(correct), "acc_norm": accuracy_summary(correct_norm)}
    return results, rows


def _majority_baseline(examples: Sequence[Example]) -> float | None:
    labels = [str(ex.label).strip().lower() for ex in examples if ex.label is not None]
    if not labels:
        return None
    return max(labels.count(v) for v in set(labels)) / len(labels)


def evaluate_task(
    model: Any, task: Task, examples: list[Example], settings: EvalSettings, out_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate one task; writes ``results.json`` and ``predictions.jsonl`` into ``out_dir``.

    choose modes -> generate and/or score options -> headline numbers -> teacher forcing -> write.
    Returns (the results dict, HTML items for the examples page).
    """
    t0 = time.perf_counter()
    names = _model_names(model, settings)
    prompts = [task.prompt(ex) for ex in examples]
    n_cut = _warn_cut_prompts(model, task, prompts, settings)
    do_gen, do_loglik = choose_modes(task, examples, settings)
    runs = _TaskRuns(names)
    if do_gen:
        _add_generative(runs, model, task, examples, prompts, settings, out_dir)
    if do_loglik:
        _add_loglik(runs, model, task, examples, settings)
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


@dataclass
class _TaskRuns:
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


def choose_modes(task: Task, examples: Sequence[Example], settings: EvalSettings) -> tuple[bool, bool]:
    """(generate?, score options by log-likelihood?). Log-likelihood needs options (a formatted MedQA copy
    may have none): without them a task that asked for loglik only falls back to generation."""
    has_choices = any(build(ex) for build in task.loglik.values() for ex in examples)
    do_loglik = has_choices and settings.choice_mode != "generative"
    do_gen = task.generative and (settings.choice_mode != "loglik" or not do_loglik)
    return do_gen, do_loglik


def _add_generative(
    runs: _TaskRuns,
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


def _add_loglik(runs: _TaskRuns, model: Any, task: Task, examples: list[Example], settings: EvalSettings) -> None:
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
        "models": _model_names(model, settings),
        "datasets": datasets,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 2),
        "files": {
            name: {"results": f"{name}/results.json", "predictions": f"{name}/predictions.jsonl"} for name in datasets
        },
    }
    if datasets and settings.plots:
        summary["plots"] = reports.write_plots(summary, out)
    if settings.save_examples and html:
        reports.write_examples_html(html, list(model.model_ids), out / "examples.html")
        summary["examples_html"] = "examples.html"
    summary["report"] = "report.md"
    atomic_write_json(out / SUMMARY_NAME, summary)
    atomic_write_text(out / "report.md", reports.render_report(summary))
    return summary
