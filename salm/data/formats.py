"""Convert one raw row (a dict) into an :class:`Example`, detecting its schema from its keys.

Every dataset is turned into the seed's target style (``Reasoning: ...`` then
``Therefore, the answer is: X``) so that training and answer extraction see one format whatever the
source. Schemas, tried in this order:

* ``medqa``: question, options ({letter: text} or [{key, value}]), answer_idx (letter).
  Target: ``Reasoning: The correct option is B. <option text>.`` + final line ``B``.
* ``medqa_mc``: sent1, ending0..endingN, label (int index): the multiple-choice layout of some MedQA
  hub copies (e.g. GBaker/MedQA-USMLE-4-options-hf-MPNet-IR); endings become options A, B, ...
* ``boolq``: question, passage, answer (bool, or true/false/yes/no text).
  Question shown: ``<passage>\\n<Question>?``; target ``Reasoning: According to the passage, the answer
  is yes.`` + final line ``yes``.
* ``formatted``: question, answer whose text has a ``Therefore, the answer is:`` line (the seed's
  ``cola13/*_formatted`` hub datasets); kept verbatim, label parsed from that line.
* ``gsm8k``: question, answer with a ``#### N`` line. ``<<a*b=c>>`` calculator notes are removed, the
  lines before ``####`` become the reasoning and N (commas removed) the label.
* ``question_answer`` / ``input_target``: any other question+answer or input+target pair, kept as is;
  the label is parsed when the target has a final-answer line, else None.
* ``text_label``: text, label; the label is both the target and the label.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from salm.data.errors import DataFormatError
from salm.data.examples import ANSWER_PREFIX, Example, clean_label, format_answer, parse_label

SCHEMAS: dict[str, str] = {
    "medqa": "question, options, answer_idx",
    "medqa_mc": "sent1, ending0.., label",
    "boolq": "question, passage, answer (bool)",
    "formatted": f"question, answer containing '{ANSWER_PREFIX}'",
    "gsm8k": "question, answer containing '#### N'",
    "question_answer": "question, answer",
    "input_target": "input, target",
    "text_label": "text, label",
}

_CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


def detect_schema(row: Mapping[str, Any]) -> str | None:
    """Return the name of the first schema in :data:`SCHEMAS` that ``row`` matches, or None."""
    keys = set(row)
    if {"question", "options", "answer_idx"} <= keys:
        return "medqa"
    if {"sent1", "ending0", "label"} <= keys:
        return "medqa_mc"
    if {"question", "passage", "answer"} <= keys:
        return "boolq"
    if {"question", "answer"} <= keys:
        answer = str(row["answer"])
        if ANSWER_PREFIX in answer:
            return "formatted"
        if re.search(r"(^|\n)\s*####", answer):
            return "gsm8k"
        return "question_answer"
    if {"input", "target"} <= keys:
        return "input_target"
    if {"text", "label"} <= keys:
        return "text_label"
    return None


def row_to_example(row: Mapping[str, Any], *, dataset: str, split: str, index: int, where: str = "row") -> Example:
    """Convert ``row`` to an Example with id ``dataset/split/index``.

    ``where`` locates the row for error messages (e.g. ``"data.jsonl, line 3"``); loaders pass it so a
    user can find the bad row in their file.
    """
    schema = detect_schema(row)
    if schema is None:
        accepted = "; ".join(f"{name} ({keys})" for name, keys in SCHEMAS.items())
        raise DataFormatError(
            f"{where}: row matches no known schema (keys found: {sorted(row)}); accepted schemas: {accepted}"
        )
    try:
        fields = _CONVERTERS[schema](row)
    except DataFormatError as err:
        raise DataFormatError(f"{where}: {schema} row: {err}") from None
    return Example(id=f"{dataset}/{split}/{index}", dataset=dataset, **fields)


def _gsm8k(row: Mapping[str, Any]) -> dict[str, Any]:
    solution = _CALCULATOR_NOTE.sub("", _field(row, "answer"))
    reasoning, _, final = solution.rpartition("####")
    label = clean_label(final)
    if not label:
        raise DataFormatError("nothing after '####'")
    return {"question": _field(row, "question"), "answer": format_answer(reasoning, label), "label": label}


def _medqa(row: Mapping[str, Any]) -> dict[str, Any]:
    options = _options(row["options"])
    letter = str(row["answer_idx"]).strip().upper()
    if letter not in options:
        raise DataFormatError(f"answer_idx {row['answer_idx']!r} is not one of the options {sorted(options)}")
    return _multiple_choice(_field(row, "question"), options, letter)


def _medqa_mc(row: Mapping[str, Any]) -> dict[str, Any]:
    endings = []
    while f"ending{len(endings)}" in row:
        endings.append(_field(row, f"ending{len(endings)}"))
    options = {chr(ord("A") + i): text for i, text in enumerate(endings)}
    try:
        letter = chr(ord("A") + int(row["label"]))
    except (TypeError, ValueError):
        raise DataFormatError(f"label {row['label']!r} is not an option index") from None
    if letter not in options:
        raise DataFormatError(f"label {row['label']!r} is out of range for {len(options)} endings")
    stem = " ".join(part for part in (_field(row, "sent1"), str(row.get("sent2") or "").strip()) if part)
    return _multiple_choice(stem, options, letter)


def _multiple_choice(stem: str, options: dict[str, str], letter: str) -> dict[str, Any]:
    listed = "\n".join(f"{key}. {text}" for key, text in options.items())
    choice = options[letter].rstrip(".")
    return {
        "question": f"{stem}\n{listed}",
        "answer": format_answer(f"The correct option is {letter}. {choice}.", letter),
        "label": letter,
        "options": options,
    }


def _boolq(row: Mapping[str, Any]) -> dict[str, Any]:
    value = row["answer"]
    text = str(value).strip().lower()  # CSV and some hub copies store the boolean as text
    if text not in _TRUE | _FALSE:
        raise DataFormatError(f"answer {value!r} is not a boolean")
    label = "yes" if text in _TRUE else "no"
    question = _field(row, "question").rstrip("?")
    question = question[:1].upper() + question[1:] + "?"
    passage = _field(row, "passage")
    return {
        "question": f"{passage}\n{question}",
        "answer": format_answer(f"According to the passage, the answer is {label}.", label),
        "label": label,
    }


def _pair(question_key: str, answer_key: str):
    def convert(row: Mapping[str, Any]) -> dict[str, Any]:
        answer = _field(row, answer_key)
        return {"question": _field(row, question_key), "answer": answer, "label": parse_label(answer)}

    return convert


def _text_label(row: Mapping[str, Any]) -> dict[str, Any]:
    label = _field(row, "label", numbers_ok=True)  # class labels are often integers
    return {"question": _field(row, "text"), "answer": label, "label": label}


def _options(raw: Any) -> dict[str, str]:
    """Accept options as {letter: text} or [{key, value}] (both occur in MedQA copies); drop empty slots.

    A JSON string is decoded first, since CSV files can only hold the options as text.
    """
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise DataFormatError("options is text but not JSON") from None
    if isinstance(raw, Mapping):
        items = raw.items()
    elif isinstance(raw, list) and all(isinstance(o, Mapping) and {"key", "value"} <= set(o) for o in raw):
        items = ((o["key"], o["value"]) for o in raw)
    else:
        raise DataFormatError(f"options must be a mapping of letters to text, got {type(raw).__name__}")
    options = {str(k).strip().upper(): _text(v, f"option {k!r}", numbers_ok=True) for k, v in items if v is not None}
    if not options:
        raise DataFormatError("options are empty")
    return dict(sorted(options.items()))


def _field(row: Mapping[str, Any], key: str, numbers_ok: bool = False) -> str:
    value = row[key]
    if value is None:
        raise DataFormatError(f"field {key!r} is null")
    return _text(value, f"field {key!r}", numbers_ok)


def _text(value: Any, what: str, numbers_ok: bool = False) -> str:
    """``value`` as stripped text, refusing what would train on the wrong text.

    A list or an object would become its Python repr (``['a', 'b']``) and a number where text belongs
    is almost always a mis-mapped column; a lone surrogate (``"\\ud800"`` in JSON) cannot be tokenized.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (str, int, float))
        or (not numbers_ok and not isinstance(value, str))
    ):
        raise DataFormatError(f"{what} must be text, got {type(value).__name__} {_short(value)}")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataFormatError(
            f"{what} holds an invalid character {text[err.start]!r} at position {err.start} "
            "(an unpaired UTF-16 surrogate); fix the file's escapes"
        ) from None
    return text.strip()


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


_CONVERTERS = {
    "medqa": _medqa,
    "medqa_mc": _medqa_mc,
    "boolq": _boolq,
    "formatted": _pair("question", "answer"),
    "gsm8k": _gsm8k,
    "question_answer": _pair("question", "answer"),
    "input_target": _pair("input", "target"),
    "text_label": _text_label,
}
