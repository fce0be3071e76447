"""Load examples from local files or the Hugging Face hub, with short names for the known datasets.

Local files always work offline; the hub is only touched for hub ids (or known names whose local copy
is missing), and ``datasets`` is imported lazily so that file loading never depends on it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salm.data.errors import DataFormatError, DatasetUnavailableError
from salm.data.examples import Example
from salm.data.formats import row_to_example

DATA_DIR_ENV = "SALM_DATA_DIR"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SPLIT_NAMES = ("train", "validation", "dev", "val", "test")
VALIDATION_SPLITS = ("validation", "dev", "val")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a known dataset lives: on the hub, and (optionally) under a local data folder."""

    hub_id: str
    config: str | None = None
    splits: tuple[str, ...] = ("train", "test")
    default_split: str = "test"  # the split evaluation uses when none is given
    local_relpaths: Mapping[str, str] = field(default_factory=dict)  # split -> path under the data folder


DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec(
        hub_id="openai/gsm8k",
        config="main",
        splits=("train", "test"),
        default_split="test",
        local_relpaths={"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    ),
    "medqa": DatasetSpec(
        hub_id="GBaker/MedQA-USMLE-4-options-hf",
        splits=("train", "test"),
        default_split="test",
        local_relpaths={"test": "medqa/test_4options.jsonl"},
    ),
    "boolq": DatasetSpec(
        hub_id="google/boolq",
        splits=("train", "validation"),
        default_split="validation",
        local_relpaths={"validation": "boolq/validation.jsonl"},
    ),
}

# The seed's pre-formatted copies (question, answer ending "Therefore, the answer is: X"); hub only.
FORMATTED_HUB_IDS: dict[str, str] = {
    "cola13/gsm8k_formatted": "gsm8k",
    "cola13/medqa_formatted": "medqa",
    "cola13/boolq_formatted": "boolq",
}


@dataclass(frozen=True)
class ResolvedSource:
    """A source string pinned down to a local file or a hub dataset, plus the names used in Example ids."""

    name: str
    split: str
    path: Path | None = None
    hub_id: str | None = None
    config: str | None = None

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"hub:{self.hub_id}" + (f" ({self.config})" if self.config else "")


def data_dir_from_env(data_dir: str | Path | None = None) -> Path | None:
    """Return ``data_dir`` or ``$SALM_DATA_DIR`` (the folder of local copies of the known datasets)."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def resolve_dataset(name_or_path: str, split: str | None = None, data_dir: str | Path | None = None) -> ResolvedSource:
    """Decide where ``name_or_path`` is read from, without reading it.

    Order: an existing file; a known name or hub id (a local copy under the data folder wins over the
    hub); a missing file (error); any other ``owner/name`` as a hub id. An unknown split defaults to the
    dataset's evaluation split for known datasets and ``train`` for other hub ids.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        name, inferred_split = _name_and_split_from_path(path)
        return ResolvedSource(name=name, split=split or inferred_split, path=path)

    known = _known_name(name_or_path)
    if known is not None:
        spec = DATASETS[known]
        split = split or spec.default_split
        if name_or_path in FORMATTED_HUB_IDS:
            return ResolvedSource(name=known, split=split, hub_id=name_or_path)
        local = _local_copy(known, split, data_dir)
        if local is not None:
            return ResolvedSource(name=known, split=split, path=local)
        return ResolvedSource(name=known, split=split, hub_id=spec.hub_id, config=spec.config)

    if path.is_dir():
        raise IsADirectoryError(f"{name_or_path} is a folder; pass a data file ({', '.join(LOCAL_SUFFIXES)})")
    if path.suffix.lower() in LOCAL_SUFFIXES:
        raise FileNotFoundError(f"data file not found: {name_or_path}")
    if "/" in name_or_path:
        name = name_or_path.rstrip("/").rsplit("/", 1)[-1].lower()
        return ResolvedSource(name=name, split=split or "train", hub_id=name_or_path)
    raise FileNotFoundError(
        f"unknown dataset {name_or_path!r}: not an existing file, a known name ({', '.join(DATASETS)}) "
        "or a hub id (owner/name)"
    )


def load_examples(
    source: str,
    split: str | None = None,
    name: str | None = None,
    limit: int | None = None,
    data_dir: str | Path | None = None,
) -> list[Example]:
    """Load ``source`` (file, known name or hub id) as Examples, keeping at most the first ``limit`` rows.

    ``name`` overrides the dataset name recorded in each Example (default: the known name, the hub id's
    last part, or the file stem, or its folder when the stem is just a split name like ``test``).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    resolved = resolve_dataset(source, split, data_dir)
    if resolved.path is not None:
        rows = iter_file_rows(resolved.path)
    else:
        dataset = _load_hub(source, resolved, resolved.split, data_dir)
        rows = _iter_dataset_rows(dataset, resolved.hub_id, resolved.split)
    return _convert(rows, name or resolved.name, resolved.split, limit, resolved.describe())


@dataclass
class SourceSplits:
    """What one training source provides: its rows for training and, if it has one, its own validation."""

    resolved: ResolvedSource
    train: list[Example]
    val: list[Example] | None  # None: no validation split of its own, the caller holds one out


def load_training_source(
    source: str,
    max_examples: int | None = None,
    val_fraction: float = 0.1,
    data_dir: str | Path | None = None,
) -> SourceSplits:
    """Load a source's train split and its own validation split when it has one.

    A plain file has no validation split. A known name read from the data folder uses the local
    validation file if there is one; a hub dataset uses its ``validation``/``dev``/``val`` split.
    ``max_examples`` keeps the first rows of the train split, and a proportional number of validation rows.
    """
    plain_file = Path(source).expanduser().is_file()
    # A plain file keeps the split its name implies (training on "medqa/test" should show in the ids).
    resolved = resolve_dataset(source, None if plain_file else "train", data_dir)
    val_limit = None if max_examples is None else max(1, math.ceil(max_examples * val_fraction))
    if resolved.path is not None:
        train = _convert(
            iter_file_rows(resolved.path), resolved.name, resolved.split, max_examples, resolved.describe()
        )
        local_val = None
        if not plain_file:  # a known name read from the data folder
            candidates = (_local_copy(resolved.name, split, data_dir) for split in VALIDATION_SPLITS)
            local_val = next((path for path in candidates if path is not None), None)
        if local_val is None:
            return SourceSplits(resolved, train, None)
        val = _convert(iter_file_rows(local_val), resolved.name, "validation", val_limit, str(local_val))
        return SourceSplits(resolved, train, val)

    splits = _load_hub(source, resolved, None, data_dir)
    if "train" not in splits:
        raise DataFormatError(f"{source} has no 'train' split (splits: {', '.join(splits)})")
    train = _convert(
        _iter_dataset_rows(splits["train"], resolved.hub_id, "train"),
        resolved.name,
        "train",
        max_examples,
        resolved.describe(),
    )
    val_split = next((split for split in VALIDATION_SPLITS if split in splits), None)
    if val_split is None:
        return SourceSplits(resolved, train, None)
    val = _convert(
        _iter_dataset_rows(splits[val_split], resolved.hub_id, val_split),
        resolved.name,
        val_split,
        val_limit,
        resolved.describe(),
    )
    return SourceSplits(resolved, train, val)


def iter_file_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, row)`` for each row of a local file; ``where`` names the file and line for errors."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
        for row in reader:
            yield f"{path}, line {reader.line_num}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}, row {number}", row
    else:
        raise DataFormatError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def read_utf8(path: Path) -> str:
    """The file's text; a file that is not UTF-8 (e.g. Latin-1) is an error naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(_not_utf8(path, data, err)) from None


def _not_utf8(path: Path, data: bytes, err: UnicodeDecodeError, line_offset: int = 0) -> str:
    line = line_offset + data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return (
        f"{path}, line {line}: not UTF-8 (byte 0x{data[err.start]:02x} at column {column}); data files must be "
        "UTF-8: re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def _utf8_lines(path: Path) -> Iterator[str]:
    """The file's lines, decoded one at a time so a bad byte is reported with its line number."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(_not_utf8(path, raw, err, lineno - 1)) from None


def _iter_jsonl(path: Path, text: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    lines = text.splitlines() if text is not None else _utf8_lines(path)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}, line {lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        yield f"{path}, line {lineno}", row


def _iter_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A JSON list of rows or ``{"data": [...]}``; JSON Lines under a .json name (as on the hub) also work."""
    text = read_utf8(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            yield from _iter_jsonl(path, text)
            return
        raise DataFormatError(f"{path}, line {err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(document, dict):
        # {"data": [...]} holds the rows; any other object is a single row (one-line JSON Lines).
        document = document["data"] if isinstance(document.get("data"), list) else [document]
    if not isinstance(document, list):
        raise DataFormatError(f"{path}: expected a JSON list of rows or an object with a 'data' list")
    for number, row in enumerate(document, start=1):
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}, item {number}: expected a JSON object, got {type(row).__name__}")
        yield f"{path}, item {number}", row


def _convert(
    rows: Iterator[tuple[str, Mapping[str, Any]]], dataset: str, split: str, limit: int | None, origin: str
) -> list[Example]:
    examples: list[Example] = []
    for index, (where, row) in enumerate(rows):
        if limit is not None and index >= limit:
            break
        examples.append(row_to_example(row, dataset=dataset, split=split, index=index, where=where))
    if not examples:
        raise DataFormatError(f"{origin} contains no rows")
    return examples


def _load_hub(source: str, resolved: ResolvedSource, split: str | None, data_dir: str | Path | None) -> Any:
    """Call ``datasets.load_dataset``; turn network failures into a DatasetUnavailableError with a way out."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise DatasetUnavailableError(f"cannot load {source!r}: the 'datasets' package is missing") from err
    from salm.members import prepare_hub

    prepare_hub()  # an unreachable hub: offline at once (cached copies still load), not a minute of retries
    try:
        return datasets.load_dataset(resolved.hub_id, resolved.config, split=split)
    except OSError as err:  # ConnectionError offline; hub and datasets "not found" errors are OSErrors too
        raise DatasetUnavailableError(_unavailable_message(source, resolved, split, data_dir, err)) from err


def _unavailable_message(
    source: str, resolved: ResolvedSource, split: str | None, data_dir: str | Path | None, err: Exception
) -> str:
    message = (
        f"could not load {source!r} from the Hugging Face hub ({resolved.hub_id}): the hub could not be "
        f"reached or does not have it ({type(err).__name__}: {err}). Pass a local data file instead "
        f"({', '.join(LOCAL_SUFFIXES)})"
    )
    spec = DATASETS.get(resolved.name)
    if spec is None or source in FORMATTED_HUB_IDS:
        return message + "."
    wanted = split or "train"
    relpath = spec.local_relpaths.get(wanted)
    folder = data_dir_from_env(data_dir)
    if relpath is None:
        local = ", ".join(f"{s}: {p}" for s, p in spec.local_relpaths.items()) or "none"
        return message + f"; no local copy of the {resolved.name} {wanted!r} split is known (local: {local})."
    if folder is None:
        return message + f", or set {DATA_DIR_ENV} to a folder holding {relpath}."
    return message + f"; {DATA_DIR_ENV}={folder} has no {relpath}."


def _iter_dataset_rows(dataset: Any, hub_id: str | None, split: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for number, row in enumerate(dataset, start=1):
        yield f"{hub_id} ({split}), row {number}", row


def _known_name(source: str) -> str | None:
    if source in DATASETS:
        return source
    if source in FORMATTED_HUB_IDS:
        return FORMATTED_HUB_IDS[source]
    return next((name for name, spec in DATASETS.items() if spec.hub_id == source), None)


def _local_copy(name: str, split: str, data_dir: str | Path | None) -> Path | None:
    folder = data_dir_from_env(data_dir)
    relpath = DATASETS[name].local_relpaths.get(split)
    if folder is None or relpath is None or not (folder / relpath).is_file():
        return None
    return folder / relpath


def _name_and_split_from_path(path: Path) -> tuple[str, str]:
    """Name a local file: a known dataset's local copy keeps its name, ``x/test.jsonl`` is ``x``."""
    posix = path.resolve().as_posix()
    for name, spec in DATASETS.items():
        for split, relpath in spec.local_relpaths.items():
            if posix.endswith("/" + relpath):
                return name, split
    if path.stem.lower() in SPLIT_NAMES and path.resolve().parent.name:
        return path.resolve().parent.name, path.stem.lower()
    return path.stem, "all"
