"""Data that was accepted silently or failed with a raw traceback: every bad row names its file and line (#10)."""

from __future__ import annotations

import pytest

from salm.data import DataFormatError, load_examples, load_training_sets, train_val_split
from tests.conftest import write_jsonl

ROWS = [
    {"question": f"What is {a} plus {b}?", "answer": f"Therefore, the answer is: {a + b}"}
    for a in range(2, 6)
    for b in range(1, 4)
]  # 12 distinct rows


def test_lone_surrogates_and_latin1_files_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "ok", "answer": "fine"}\n{"question": "broken \\ud800 text", "answer": "x"}\n')
    with pytest.raises(DataFormatError, match=rf"{f}, line 2: .*field 'question' holds an invalid character"):
        load_examples(str(f))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"question": "a", "answer": "b"}\n\n{"question": "caf\xe9", "answer": "b"}\n')
    with pytest.raises(DataFormatError, match=rf"{latin}, line 3: not UTF-8 \(byte 0xe9 at column 18\)"):
        load_examples(str(latin))
    for suffix, text in ((".json", b'[{"question": "a",\n "answer": "\xe9"}]'), (".csv", b"question,answer\na,\xe9\n")):
        g = tmp_path / f"latin{suffix}"
        g.write_bytes(text)
        with pytest.raises(DataFormatError, match=rf"{g}, line 2: not UTF-8"):
            load_examples(str(g))


# ---------------------------------------------------------------------------------------------- data accepted silently
def test_non_string_fields_are_errors_naming_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"question": 123, "answer": ["a", "b"]}])
    with pytest.raises(
        DataFormatError, match=rf"{f}, line 2: question_answer row: field 'answer' must be text, got list"
    ):
        load_examples(str(f))
    g = write_jsonl(tmp_path / "e.jsonl", [{"question": 123, "answer": "x"}])
    with pytest.raises(DataFormatError, match=rf"{g}, line 1: .*field 'question' must be text, got int 123"):
        load_examples(str(g))
    h = write_jsonl(tmp_path / "labels.jsonl", [{"text": "good film", "label": 1}])  # class labels may be numbers
    assert load_examples(str(h))[0].answer == "1"


def test_empty_answers_are_skipped_counted_and_reported(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"question": "q1", "answer": ""}, {"question": "q2", "answer": " "}])
    report = load_training_sets([str(f)], val_fraction=0.25).report["datasets"]["d"]
    assert report["empty_answers_skipped"] == 2 and report["train"] + report["val"] == len(ROWS)
    g = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": ""}] * 3)
    with pytest.raises(ValueError, match="every one of its 3 row"):
        load_training_sets([str(g)])


def test_rows_shared_by_train_and_validation_are_dropped_from_validation(tmp_path):
    dup = {"question": "What is 1 plus 1?", "answer": "Therefore, the answer is: 2"}
    rows = ROWS + [dup] * 8
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_training_sets([str(f)], val_fraction=0.4, seed=3)
    train_part, val_part = train_val_split(load_examples(str(f)), 0.4, 3)
    n_dup_val = sum(ex.question == dup["question"] for ex in val_part)
    assert 0 < n_dup_val < 8 and any(ex.question == dup["question"] for ex in train_part)  # the case exercised
    report = data.report["datasets"]["d"]
    assert report["val_duplicates_dropped"] == n_dup_val and report["val"] == len(val_part) - n_dup_val
    seen = {(ex.question, ex.answer) for ex in data.train}
    assert not [ex for ex in data.val if (ex.question, ex.answer) in seen]
