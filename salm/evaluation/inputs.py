"""Which examples an evaluation runs: task names resolved, data loaded, unscorable rows dropped, sampled, shots.

This is the step ``salm evaluate`` runs before any member loads (an offline run learns what is missing in
seconds), so nothing here touches a model. A dataset that cannot be loaded is skipped with a
message naming the ``--data`` flag that fixes it; the others still run.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from salm.data import DATASETS, DataFormatError, DatasetUnavailableError, Example, load_examples
from salm.evaluation.settings import EvalSettings
from salm.evaluation.tasks import TASKS, Task, draw_shots, generic_task, with_fewshot

logger = logging.getLogger(__name__)

TaskSpec = str | Task | tuple[str | Task, Sequence[Example]]

__all__ = ["TaskSpec", "load_task_examples", "prepare_tasks", "sample_examples", "unavailable_message"]


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
        task = _resolve_task(spec, data)
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
        if settings.num_fewshot and not task.fewshot:  # a prepared task (salm evaluate's) carries its shots
            try:
                task = _fewshot_task(task, examples, usable, settings, given is None)
            except ValueError as e:
                skipped[task.name] = str(e)
                continue
        runs.append((task, examples))
    return runs, skipped


def _resolve_task(spec: str | Task, data: Mapping[str, str]) -> Task:
    """The task ``spec`` names (registered, or generic for a ``--data`` name), reading ``data``'s file if given."""
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
    return task


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
