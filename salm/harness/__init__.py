"""saLM in lm-evaluation-harness: the ``salm`` model (:mod:`salm.harness.adapter`), offline copies of lm-eval's
gsm8k / medqa_4options / boolq tasks and the quickstart's arithmetic in gsm8k's shape (``tasks/``), and
``salm harness`` (:mod:`salm.harness.command`).

Importing this package does not import lm-eval (an optional extra: ``pip install "salm[harness]"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# lm-eval's task name -> the offline copy shipped here (same prompts, filters and metrics, local jsonl).
LOCAL_TASKS = {"gsm8k": "gsm8k_local", "medqa_4options": "medqa_4options_local", "boolq": "boolq_local"}

__all__ = ["LOCAL_TASKS", "TASKS_DIR", "task_manager"]


def task_manager(
    data_dir: str | Path | None = None,
    include_defaults: bool = True,
    include_path: Sequence[str | Path] = (),
    **kwargs: Any,
):
    """An lm-eval ``TaskManager`` that also knows the offline tasks, reading them from ``data_dir``
    (default: ``$SALM_DATA_DIR``, else ``../shared/data``), and the tasks in the folders ``include_path`` (lm-eval's
    ``--include_path``: YAML task files of the user's own). ``include_defaults=False`` knows only those and starts
    in milliseconds instead of indexing lm-eval's hundreds of task folders."""
    from lm_eval.tasks import TaskManager

    from salm.harness.tasks.salm_local import data_dir as resolve

    metadata = {"data_dir": str(resolve({"data_dir": str(data_dir) if data_dir else None}))}
    paths = [str(TASKS_DIR), *map(str, include_path)]
    return TaskManager(include_path=paths, include_defaults=include_defaults, metadata=metadata, **kwargs)
