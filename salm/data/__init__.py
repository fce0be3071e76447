"""Datasets for saLM: raw formats to :class:`Example`, loading (files or hub), splits and balancing."""

from salm.data.errors import DataFormatError, DatasetUnavailableError
from salm.data.examples import (
    ANSWER_PREFIX,
    PROMPT_TEMPLATE,
    Example,
    build_prompt,
    clean_label,
    format_answer,
    parse_label,
)
from salm.data.formats import SCHEMAS, detect_schema, row_to_example
from salm.data.loading import (
    DATA_DIR_ENV,
    DATASETS,
    FORMATTED_HUB_IDS,
    DatasetSpec,
    ResolvedSource,
    load_examples,
    resolve_dataset,
)
from salm.data.splits import TrainingData, balance, load_training_sets, train_val_split

__all__ = [
    "ANSWER_PREFIX",
    "DATASETS",
    "DATA_DIR_ENV",
    "FORMATTED_HUB_IDS",
    "PROMPT_TEMPLATE",
    "SCHEMAS",
    "DataFormatError",
    "DatasetSpec",
    "DatasetUnavailableError",
    "Example",
    "ResolvedSource",
    "TrainingData",
    "balance",
    "build_prompt",
    "clean_label",
    "detect_schema",
    "format_answer",
    "load_examples",
    "load_training_sets",
    "parse_label",
    "resolve_dataset",
    "row_to_example",
    "train_val_split",
]
