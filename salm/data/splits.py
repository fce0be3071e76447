"""Seeded train/validation splits, dataset balancing, and the training-set loader used by ``salm train``.

Everything here is deterministic given the seed, so a run can be reproduced and its validation
examples are never seen in training.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salm.data.examples import Example
from salm.data.loading import load_training_source


def train_val_split(
    examples: Sequence[Example], val_fraction: float = 0.1, seed: int = 42
) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded ``val_fraction`` of ``examples`` for datasets without a validation split.

    At least one example is held out when there are two or more (and ``val_fraction > 0``), so small
    datasets still get a validation signal; at least one always stays in training. Both parts keep the
    input order, and membership depends only on the seed and the number of examples.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(examples)
    n_val = 0 if val_fraction == 0.0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    indices = list(range(n))
    random.Random(seed).shuffle(indices)
    held_out = set(indices[:n_val])
    train = [ex for i, ex in enumerate(examples) if i not in held_out]
    val = [ex for i, ex in enumerate(examples) if i in held_out]
    return train, val


BALANCE_MODES = ("truncate", "none")
"""How :func:`balance` mixes datasets: ``truncate`` (each cut to the smallest, equal weight: the seed's rule)
or ``none`` (every row kept, so a dataset weighs by its size; for when the small sets are small because
little of them is needed, and cutting the large one to their size would throw most of it away)."""


def balance(datasets: dict[str, list[Example]], seed: int = 42, mode: str = "truncate") -> list[Example]:
    """Mix datasets, then shuffle all: with equal weight (``mode="truncate"``, the seed's rule: cut each to
    the smallest size), or every row of every dataset (``mode="none"``).

    Each dataset is cut after its own seeded shuffle, so the kept examples are a random sample rather than
    the first rows. Datasets are visited in name order, so the result does not depend on the order in
    which they were given.
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"balance mode must be one of {', '.join(BALANCE_MODES)}, got {mode!r}")
    if not datasets:
        raise ValueError("balance() needs at least one dataset")
    empty = [name for name, examples in datasets.items() if not examples]
    if empty:
        raise ValueError(f"cannot balance: dataset {empty[0]!r} has no examples")
    smallest = min(len(examples) for examples in datasets.values())
    rng = random.Random(seed)
    mixed = [
        ex
        for name in sorted(datasets)
        for ex in rng.sample(list(datasets[name]), smallest if mode == "truncate" else len(datasets[name]))
    ]
    rng.shuffle(mixed)
    return mixed


@dataclass
class TrainingData:
    """Balanced training and validation examples plus a per-dataset report of how they were made."""

    train: list[Example]
    val: list[Example]
    report: dict[str, Any] = field(default_factory=dict)


def load_training_sets(
    sources: list[str],
    val_fraction: float = 0.1,
    seed: int = 42,
    max_examples: int | None = None,
    data_dir: str | Path | None = None,
    balance_mode: str = "truncate",
) -> TrainingData:
    """Load, split and balance the training sources of ``salm train --datasets``.

    A source with its own validation split (hub datasets, or a local validation file under the data
    folder) uses it; otherwise a seeded ``val_fraction`` of its train rows is held out, and the report
    says so (``held_out``). ``max_examples`` keeps the first rows of each source for quick runs.
    Train and validation are balanced separately (``balance_mode``, see :data:`BALANCE_MODES`) so, by
    default, neither is dominated by the largest dataset.

    Rows with an empty answer are skipped (they would train on the end-of-text token alone) and counted
    (``empty_answers_skipped``); validation rows whose prompt and answer also occur in any training set
    are dropped (``val_duplicates_dropped``), so validation never measures memorised training rows.
    """
    if not sources:
        raise ValueError("no training datasets given")
    train_sets: dict[str, list[Example]] = {}
    val_sets: dict[str, list[Example]] = {}
    per_dataset: dict[str, dict[str, Any]] = {}
    for source in sources:
        loaded = load_training_source(source, max_examples=max_examples, val_fraction=val_fraction, data_dir=data_dir)
        name = loaded.resolved.name
        n_loaded = len(loaded.train) + len(loaded.val or [])
        loaded.train = [ex for ex in loaded.train if ex.answer.strip()]
        if loaded.val is not None:
            loaded.val = [ex for ex in loaded.val if ex.answer.strip()]
        empty = n_loaded - len(loaded.train) - len(loaded.val or [])
        if not loaded.train:
            raise ValueError(f"dataset {name!r} ({source}): every one of its {n_loaded} row(s) has an empty answer")
        if name in per_dataset:
            raise ValueError(
                f"training sources {per_dataset[name]['source']!r} and {source!r} are both named {name!r}; "
                "give the files distinct names"
            )
        held_out = loaded.val is None
        train, val = train_val_split(loaded.train, val_fraction, seed) if held_out else (loaded.train, loaded.val)
        if not val:
            raise ValueError(
                f"dataset {name!r} ({source}) has no validation examples: it has {len(loaded.train)} row(s) "
                f"and val_fraction={val_fraction}; give it more rows or a larger val_fraction"
            )
        train_sets[name], val_sets[name] = train, val
        per_dataset[name] = {
            "source": source,
            "location": loaded.resolved.describe(),
            "source_split": loaded.resolved.split,
            "loaded": n_loaded,
            "empty_answers_skipped": empty,
            "held_out": held_out,
            "train": len(train),
            "val": len(val),
        }
    seen = {(ex.question, ex.answer) for examples in train_sets.values() for ex in examples}
    for name, val in val_sets.items():
        kept = [ex for ex in val if (ex.question, ex.answer) not in seen]
        per_dataset[name]["val_duplicates_dropped"] = len(val) - len(kept)
        per_dataset[name]["val"] = len(kept)
        if not kept:
            raise ValueError(
                f"dataset {name!r} ({per_dataset[name]['source']}): all {len(val)} validation row(s) also occur in "
                "the training data; give it distinct validation rows"
            )
        val_sets[name] = kept
    train = balance(train_sets, seed, balance_mode)
    val = balance(val_sets, seed, balance_mode)
    for name in per_dataset:
        per_dataset[name]["train_balanced"] = sum(ex.dataset == name for ex in train)
        per_dataset[name]["val_balanced"] = sum(ex.dataset == name for ex in val)
    report = {
        "datasets": per_dataset,
        "train_total": len(train),
        "val_total": len(val),
        "val_fraction": val_fraction,
        "seed": seed,
        "max_examples": max_examples,
    }
    return TrainingData(train=train, val=val, report=report)
