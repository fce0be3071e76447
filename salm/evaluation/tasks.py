"""Evaluation tasks as data (lm-eval style): where the examples come from, how a prompt is built, when
generation stops and how an output is scored.

Adding a dataset means registering a :class:`Task`, never adding a branch to the runner::

    from salm.evaluation.tasks import TASKS, Task, score_gsm8k_output
    TASKS.register(Task("arithmetic", source="data/arith.jsonl", scorer=score_gsm8k_output))
    TASKS.register(Task("prose", source="data/prose.jsonl", scorer=None))  # NLL only, no generation

A scorer maps ``(output, example)`` to a dict with at least ``correct`` (bool, the primary metric),
``answer`` (what was extracted, None when nothing could be: that is what the detection rate counts) and
``gold``. Extra boolean keys can be reported as further metrics through :attr:`Task.metrics`.

GSM8K's primary ``accuracy`` is lm-eval's *strict-match* (the model's own "the answer is N" statement):
the flexible last-number filter is reported as ``flexible_accuracy`` next to it, but it credits a model
that merely echoes a number from the question, so it is not the headline.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from salm.data.examples import Example, clean_label, format_answer, parse_label
from salm.evaluation.scoring import normalize_number, numbers_equal, score_choice, score_gsm8k, score_yes_no

__all__ = [
    "DEFAULT_STOP",
    "DEFAULT_TASKS",
    "TASKS",
    "Scorer",
    "Task",
    "TaskRegistry",
    "generic_task",
    "letter_choices",
    "answer_choices",
    "score_auto",
    "score_choice_output",
    "score_exact_output",
    "score_gsm8k_output",
    "score_yes_no_output",
    "draw_shots",
    "with_fewshot",
]

Scorer = Callable[[str, Example], dict[str, Any]]
ChoiceBuilder = Callable[[Example], list[tuple[str, str]]]

# A new "Question:" means the model has finished its answer and started inventing the next example.
DEFAULT_STOP: tuple[str, ...] = ("\nQuestion:", "\n\nQuestion")


def _gold_label(example: Example) -> str:
    """The example's label, or the one stated in its target; a missing gold is an error, never 'wrong'."""
    label = example.label if example.label is not None else parse_label(example.answer)
    if label is None:
        raise ValueError(f"example {example.id} has no gold label (no label and no final-answer line in its target)")
    return label


# ----------------------------------------------------------------------------------------------------
# Scorers: (output, example) -> {"correct", "answer", "gold", ...}
# ----------------------------------------------------------------------------------------------------


def score_gsm8k_output(output: str, example: Example) -> dict[str, Any]:
    """Strict (primary) and flexible GSM8K scoring; see the module docstring for the choice."""
    s = score_gsm8k(output, _gold_label(example))
    return {
        "correct": bool(s["strict_correct"]),
        "answer": s["strict_answer"],
        "gold": s["gold"],
        "flexible_correct": bool(s["flexible_correct"]),
        "flexible_answer": s["flexible_answer"],
    }


def score_choice_output(output: str, example: Example) -> dict[str, Any]:
    """Multiple choice over the example's option letters (A-D when it lists none)."""
    letters = "".join(example.options) if example.options else "ABCD"
    return dict(score_choice(output, _gold_label(example), letters))


def score_yes_no_output(output: str, example: Example) -> dict[str, Any]:
    return dict(score_yes_no(output, _gold_label(example)))


_FINAL_RE = re.compile(r"answer\s+is\s*:?[ \t]*(?P<ans>[^\n]*)", re.IGNORECASE)


def score_exact_output(output: str, example: Example) -> dict[str, Any]:
    """Exact match of the last "the answer is: X" statement with the label (case-insensitive, cleaned)."""
    gold = clean_label(_gold_label(example))
    hits = list(_FINAL_RE.finditer(output or ""))
    answer = clean_label(hits[-1].group("ans")) if hits else None
    answer = answer or None
    correct = answer is not None and answer.casefold() == gold.casefold()
    if answer is not None and not correct and normalize_number(answer) is not None:
        correct = numbers_equal(answer, gold)
    return {"correct": correct, "answer": answer, "gold": gold}


def score_auto(output: str, example: Example) -> dict[str, Any]:
    """The scorer a new dataset gets when its task names none: picked from the label's shape.

    A number is scored like GSM8K, a letter among the example's options like MedQA, yes/no like BoolQ,
    anything else by exact match of the stated final answer.
    """
    gold = _gold_label(example)
    if normalize_number(gold) is not None:
        return score_gsm8k_output(output, example)
    if example.options and gold.strip().upper() in {k.upper() for k in example.options}:
        return score_choice_output(output, example)
    if gold.strip().lower() in ("yes", "no", "true", "false"):
        return score_yes_no_output(output, example)
    return score_exact_output(output, example)


# ----------------------------------------------------------------------------------------------------
# Log-likelihood multiple choice: the continuations whose likelihoods are compared
# ----------------------------------------------------------------------------------------------------


def letter_choices(example: Example) -> list[tuple[str, str]]:
    """lm-eval ``medqa_4options`` style: the continuation is the bare option letter after ``Answer:``."""
    return [(letter, letter) for letter in (example.options or {})]


def answer_choices(example: Example) -> list[tuple[str, str]]:
    """Each option written as the trained target ("Reasoning: The correct option is B. ... answer is: B").

    This is the format the routing heads were trained on and it includes the option text, so the
    length-normalised score (acc_norm) is meaningful here, unlike for single-letter continuations.
    """
    out = []
    for letter, text in (example.options or {}).items():
        out.append((letter, format_answer(f"The correct option is {letter}. {text.rstrip('.')}.", letter)))
    return out


# ----------------------------------------------------------------------------------------------------
# Task and registry
# ----------------------------------------------------------------------------------------------------


def _default_prompt(example: Example) -> str:
    return example.prompt


def _default_target(example: Example) -> str:
    return example.answer


@dataclass(frozen=True)
class Task:
    """Everything the runner needs to evaluate one dataset.

    ``source``/``split`` are what :func:`salm.data.load_examples` reads when no local file is given
    (a known name, hub id or file; None means the task needs one). ``scorer=None`` makes the task
    NLL-only: no generation, only the teacher-forced metrics on ``target``. ``metrics`` maps a reported
    metric name to a boolean key of the scorer's dict, the first being the primary ``accuracy``.
    ``loglik`` maps a variant name to the (label, continuation) pairs compared by likelihood; the first
    variant's accuracy is the task's loglik ``acc``. ``random_baseline`` is chance accuracy.
    """

    name: str
    source: str | None = None
    split: str | None = None
    scorer: Scorer | None = score_auto
    metrics: Mapping[str, str] = field(default_factory=lambda: {"accuracy": "correct"})
    stop: tuple[str, ...] = DEFAULT_STOP
    random_baseline: float | None = None
    prompt: Callable[[Example], str] = _default_prompt
    target: Callable[[Example], str] = _default_target
    loglik: Mapping[str, ChoiceBuilder] = field(default_factory=dict)
    description: str = ""
    fewshot: Mapping[str, Any] | None = None  # set by with_fewshot: k, seed, where shots come from, shot ids

    def __post_init__(self) -> None:
        problem = task_name_problem(self.name)
        if problem:
            raise ValueError(f"task name {problem}")
        if self.scorer is not None and "correct" not in self.metrics.values():
            raise ValueError(f"task {self.name!r}: metrics must include the scorer's 'correct' key")

    @property
    def generative(self) -> bool:
        return self.scorer is not None

    def with_source(self, source: str | None, split: str | None = None) -> Task:
        """A copy reading another file or split (``--data NAME=PATH``, ``--split``)."""
        return replace(self, source=source, split=split if split is not None else self.split)

    def describe(self) -> dict[str, Any]:
        """The JSON-able part of the task, written into results so a reader knows how it was scored."""
        return {
            "name": self.name,
            "source": self.source,
            "split": self.split,
            "generative": self.generative,
            "scorer": getattr(self.scorer, "__name__", repr(self.scorer)) if self.scorer else None,
            "metrics": dict(self.metrics),
            "stop": list(self.stop),
            "random_baseline": self.random_baseline,
            "loglik_variants": list(self.loglik),
            "description": self.description,
            "fewshot": dict(self.fewshot) if self.fewshot else None,
        }


class TaskRegistry:
    """Name -> Task. ``register`` refuses to silently replace a task unless ``replace=True``."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def register(self, task: Task, *, replace: bool = False) -> Task:
        if task.name in self._tasks and not replace:
            raise ValueError(f"task {task.name!r} is already registered (pass replace=True to override it)")
        self._tasks[task.name] = task
        return task

    def get(self, name: str) -> Task:
        try:
            return self._tasks[name]
        except KeyError:
            raise KeyError(f"unknown task {name!r}; registered tasks: {', '.join(self._tasks)}") from None

    def names(self) -> list[str]:
        return list(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)


def task_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a task (it is the task's folder in the output), or None if it can."""
    if not name or "/" in name or name.startswith("."):
        return f"{name!r} must be non-empty, hold no '/' and not start with '.': it is used as a folder name"
    return None


def generic_task(name: str, source: str | None = None, scorer: Scorer | None = score_auto, **kwargs: Any) -> Task:
    """A task for a dataset nobody registered (``--data mydata=file.jsonl``): auto scorer, default stops."""
    return Task(
        name=name, source=source, scorer=scorer, description=kwargs.pop("description", "generic task"), **kwargs
    )


DEFAULT_TASKS: tuple[str, ...] = ("gsm8k", "medqa", "boolq")

TASKS = TaskRegistry()
TASKS.register(
    Task(
        "gsm8k",
        source="gsm8k",
        split="test",
        scorer=score_gsm8k_output,
        metrics={"accuracy": "correct", "flexible_accuracy": "flexible_correct"},
        random_baseline=0.0,
        description="grade-school maths; accuracy = strict match of the stated answer, flexible = last number",
    )
)
TASKS.register(
    Task(
        "medqa",
        source="medqa",
        split="test",
        scorer=score_choice_output,
        random_baseline=0.25,
        loglik={"letter": letter_choices, "answer": answer_choices},
        description="USMLE 4-option multiple choice; generative letter extraction and log-likelihood",
    )
)
TASKS.register(
    Task(
        "boolq",
        source="boolq",
        split="validation",
        scorer=score_yes_no_output,
        random_baseline=0.5,
        description="yes/no reading comprehension (passage + question)",
    )
)


# ----------------------------------------------------------------------------------------------------
# Few-shot prompts
# ----------------------------------------------------------------------------------------------------

SHOT_SEPARATOR = "\n\n"


def draw_shots(
    task_name: str, examples: Sequence[Example], pool: Sequence[Example], k: int, seed: int
) -> dict[str, list[Example]]:
    """``k`` shots per example from ``pool``, never the example itself.

    Each example's shots come from its own RNG, seeded by ``(seed, task, example id)``: the same shots for every
    model, whatever order, sample or batch the example is evaluated in, and reproducible for a seed.
    """
    if k < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {k}")
    shots: dict[str, list[Example]] = {}
    for ex in examples:
        candidates = [p for p in pool if p.id != ex.id]
        if len(candidates) < k:
            raise ValueError(
                f"{task_name}: {k} shots wanted but only {len(candidates)} examples can serve as shots for {ex.id}"
            )
        picked = random.Random(f"{seed}:{task_name}:{ex.id}").sample(range(len(candidates)), k)
        shots[ex.id] = [candidates[i] for i in picked]
    return shots


def with_fewshot(task: Task, shots: Mapping[str, Sequence[Example]], **info: Any) -> Task:
    """``task`` whose prompt puts the example's shots first, each as ``prompt + target`` then a blank line.

    Shots use the task's own prompt and target, so a base model sees worked answers in the graded format
    ("Therefore, the answer is: X") before the question; the stop strings end the answer at the next "Question:".
    ``info`` (k, seed, source) is recorded with the shot ids in :meth:`Task.describe`, i.e. in every results file.
    """
    base_prompt, target = task.prompt, task.target

    def prompt(example: Example) -> str:
        context = "".join(base_prompt(s) + target(s) + SHOT_SEPARATOR for s in shots.get(example.id, ()))
        return context + base_prompt(example)

    record = {**info, "shots": {ex_id: [s.id for s in chosen] for ex_id, chosen in shots.items()}}
    return replace(task, prompt=prompt, fewshot=record)
