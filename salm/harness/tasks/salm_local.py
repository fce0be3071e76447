"""Loaders for the offline task YAMLs in this folder (lm-eval's ``custom_dataset`` hook).

Each returns a ``datasets.DatasetDict`` in the schema of the hub dataset lm-eval's own task reads, so the YAMLs
keep lm-eval's prompts verbatim. The data folder is ``data_dir`` from lm-eval's task metadata
(``--metadata '{"data_dir": "/data"}'``, or ``salm harness --data_dir``), else ``$SALM_DATA_DIR``, else
``../shared/data``. Rows are read with the standard library and handed to ``Dataset.from_list``: nothing is
written to the ``datasets`` cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "SALM_DATA_DIR"
DEFAULT_DATA_DIR = "../shared/data"
# task -> {split: path under the data folder}; the layout of the project's shared data (see its README).
FILES = {
    "gsm8k_local": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "medqa_4options_local": {"test": "medqa/test_4options.jsonl"},
    "boolq_local": {"validation": "boolq/validation.jsonl"},
    # data folder: a quickstart build (``salm quickstart`` prints its members.yaml; the folder holding it)
    "quickstart_arithmetic": {"train": "data/math_train.jsonl", "test": "data/math_test.jsonl"},
}


def data_dir(metadata: dict[str, Any] | None = None) -> Path:
    """The folder holding the local copies: ``data_dir`` metadata, ``$SALM_DATA_DIR``, ``../shared/data``."""
    value = (metadata or {}).get("data_dir") or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(value).expanduser()


def missing_files(task: str, folder: Path) -> list[Path]:
    return [folder / rel for rel in FILES[task].values() if not (folder / rel).is_file()]


def _rows(task: str, split: str, folder: Path) -> list[dict[str, Any]]:
    path = folder / FILES[task][split]
    if not path.is_file():
        raise FileNotFoundError(
            f"{task}: {path} not found; point the task at the data folder with salm harness --data_dir DIR, "
            f'lm-eval\'s --metadata \'{{"data_dir": "DIR"}}\', or {DATA_DIR_ENV}=DIR'
        )
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: malformed JSON ({err.msg})") from None
    return rows


def _build(task: str, convert, **metadata: Any):
    import datasets

    folder = data_dir(metadata)
    out = {}
    for split in FILES[task]:
        rows = []
        for i, row in enumerate(_rows(task, split, folder), start=1):
            try:
                rows.append(convert(row))
            except (KeyError, ValueError, TypeError) as err:
                raise ValueError(f"{folder / FILES[task][split]}, row {i}: {err!r} (unexpected schema)") from None
        out[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)


def gsm8k(**metadata: Any):
    """openai/gsm8k (main): question, answer (worked solution ending ``#### N``)."""
    return _build("gsm8k_local", lambda r: {"question": r["question"], "answer": r["answer"]}, **metadata)


def _medqa(row: dict[str, Any]) -> dict[str, Any]:
    options = row["options"]
    if isinstance(options, list):  # [{"key": "A", "value": ...}, ...]
        options = {o["key"]: o["value"] for o in options}
    letters = ["A", "B", "C", "D"]
    return {
        "sent1": row["question"],
        **{f"ending{i}": options[k] for i, k in enumerate(letters)},
        "label": letters.index(str(row["answer_idx"]).strip().upper()),
    }


def medqa_4options(**metadata: Any):
    """MedQA 4 options as GBaker/MedQA-USMLE-4-options-hf: sent1, ending0..3, label (index of the gold letter)."""
    return _build("medqa_4options_local", _medqa, **metadata)


def _boolq(row: dict[str, Any]) -> dict[str, Any]:
    answer = row["answer"]
    if isinstance(answer, str):
        answer = answer.strip().lower() in ("true", "yes")
    return {"passage": row["passage"], "question": row["question"], "label": int(bool(answer))}


def boolq(**metadata: Any):
    """BoolQ as super_glue/boolq: passage, question, label (1 = yes)."""
    return _build("boolq_local", _boolq, **metadata)


def _seed_style(row: dict[str, Any]) -> dict[str, Any]:
    """A GSM8K-style row as saLM's data loader renders it (:func:`salm.data.formats.row_to_example`): the prompt
    template and the ``Reasoning: ...`` / ``Therefore, the answer is: N`` answer the quickstart members learned."""
    from salm.data.formats import row_to_example

    ex = row_to_example(row, dataset="quickstart_arithmetic", split="test", index=0)
    return {"question": ex.question, "prompt": ex.prompt, "answer": ex.answer}


def quickstart_arithmetic(**metadata: Any):
    """The quickstart build's arithmetic train/test splits: question, prompt, answer (saLM's template)."""
    return _build("quickstart_arithmetic", _seed_style, **metadata)
