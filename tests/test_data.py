"""Tests for salm.data: raw formats, loading (files and a mocked hub), splits and balancing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from salm.data import (
    ANSWER_PREFIX,
    DataFormatError,
    DatasetUnavailableError,
    Example,
    balance,
    build_prompt,
    detect_schema,
    load_examples,
    load_training_sets,
    resolve_dataset,
    row_to_example,
    train_val_split,
)
from tests.conftest import SHARED_DATA, write_jsonl

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"public data folder {SHARED_DATA} is absent (only on project machines)"
)

GSM8K_ROW = {
    "question": "Tom has 1,200 apples and buys 34 more. How many apples?",
    "answer": "He has 1200+34=<<1200+34=1234>>1234 apples.\nSo that is it.\n#### 1,234",
}
MEDQA_ROW = {
    "question": "Which vitamin deficiency causes scurvy?",
    "options": {"B": "Vitamin C", "A": "Vitamin A", "C": "Vitamin D", "D": "Vitamin K"},
    "answer": "Vitamin C",
    "answer_idx": "B",
    "meta_info": "step1",
}
BOOLQ_ROW = {"question": "is the sky blue", "title": "Sky", "passage": "The sky is blue.", "answer": True}


def _convert(row: dict) -> Example:
    return row_to_example(row, dataset="d", split="s", index=7, where="f.jsonl, line 8")


# --- prompt and formats -------------------------------------------------------------------------


def test_prompt_template_is_the_seeds() -> None:
    assert build_prompt("2+2?") == "Question: 2+2?\nAnswer:\n"
    assert Example(id="x", dataset="d", question="Q", answer="A").prompt == "Question: Q\nAnswer:\n"


def test_gsm8k_row_strips_calculator_notes_and_commas() -> None:
    ex = _convert(GSM8K_ROW)
    assert ex.id == "d/s/7" and ex.label == "1234"
    assert ex.answer == ("Reasoning: He has 1200+34=1234 apples.\nSo that is it.\nTherefore, the answer is: 1234")
    assert ex.question == GSM8K_ROW["question"]


def test_medqa_row_lists_sorted_options_and_answers_with_letter() -> None:
    ex = _convert(MEDQA_ROW)
    assert ex.question == (
        "Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin C\nC. Vitamin D\nD. Vitamin K"
    )
    assert ex.answer == "Reasoning: The correct option is B. Vitamin C.\nTherefore, the answer is: B"
    assert ex.label == "B"
    assert list(ex.options) == ["A", "B", "C", "D"]
    assert hash(ex)  # options are excluded from the hash, so MedQA examples stay hashable


def test_medqa_option_list_and_multiple_choice_layouts() -> None:
    as_list = dict(MEDQA_ROW, options=[{"key": k, "value": v} for k, v in MEDQA_ROW["options"].items()])
    assert _convert(as_list).question == _convert(MEDQA_ROW).question
    mc = {"sent1": "Which vitamin?", "sent2": "", "ending0": "A1", "ending1": "C1", "ending2": "D1", "label": 1}
    ex = _convert(mc)
    assert detect_schema(mc) == "medqa_mc"
    assert ex.label == "B" and ex.options == {"A": "A1", "B": "C1", "C": "D1"}
    assert ex.question.endswith("\nA. A1\nB. C1\nC. D1")


def test_medqa_answer_not_among_options_is_an_error() -> None:
    with pytest.raises(DataFormatError, match=r"f\.jsonl, line 8: medqa row: answer_idx 'E' is not one of"):
        _convert(dict(MEDQA_ROW, answer_idx="E"))


def test_boolq_row_formats_passage_question_and_yes_no() -> None:
    ex = _convert(BOOLQ_ROW)
    assert ex.question == "The sky is blue.\nIs the sky blue?"
    assert ex.answer == "Reasoning: According to the passage, the answer is yes.\nTherefore, the answer is: yes"
    assert ex.label == "yes"
    assert _convert(dict(BOOLQ_ROW, answer="False")).label == "no"  # CSV stores booleans as text
    with pytest.raises(DataFormatError, match="answer 'maybe' is not a boolean"):
        _convert(dict(BOOLQ_ROW, answer="maybe"))


def test_seed_formatted_row_is_kept_and_label_parsed() -> None:
    row = {"question": "Q", "answer": f"Reasoning: r\n{ANSWER_PREFIX} 1,500."}
    ex = _convert(row)
    assert detect_schema(row) == "formatted"
    assert ex.answer == row["answer"] and ex.label == "1500"


def test_generic_pairs_parse_label_only_when_present() -> None:
    assert _convert({"input": "Q", "target": "free text"}).label is None
    assert _convert({"input": "Q", "target": "steps\n#### 7"}).label == "7"
    assert _convert({"question": "Q", "answer": "Paris"}).label is None
    ex = _convert({"text": "T", "label": 3})
    assert (ex.question, ex.answer, ex.label) == ("T", "3", "3")


# --- real files -------------------------------------------------------------------------------


@needs_shared_data
def test_real_files_first_rows() -> None:
    gsm = load_examples(str(SHARED_DATA / "gsm8k" / "test.jsonl"), limit=3)
    assert len(gsm) == 3 and gsm[0].id == "gsm8k/test/0" and gsm[0].label == "18"
    assert "<<" not in gsm[0].answer and gsm[0].answer.endswith("Therefore, the answer is: 18")

    med = load_examples(str(SHARED_DATA / "medqa" / "test_4options.jsonl"), limit=3)
    assert med[0].dataset == "medqa" and med[0].label == "B" and med[0].id == "medqa/test/0"
    assert "\nA. Disclose the error" in med[0].question and len(med[0].options) == 4

    boolq = load_examples(str(SHARED_DATA / "boolq" / "validation.jsonl"), limit=3)
    assert boolq[0].label == "no" and boolq[0].question.endswith("\nDoes ethanol take more energy make that produces?")


@needs_shared_data
def test_short_names_resolve_to_shared_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALM_DATA_DIR", str(SHARED_DATA))
    assert load_examples("boolq", limit=2)[1].id == "boolq/validation/1"
    assert resolve_dataset("gsm8k", "train").path == SHARED_DATA / "gsm8k" / "train.jsonl"
    assert resolve_dataset("medqa", "train").hub_id == "GBaker/MedQA-USMLE-4-options-hf"  # no local train


# --- loading errors ---------------------------------------------------------------------------


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GSM8K_ROW) + "\n\n" + '{"question": "x", "answer": \n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load_examples(str(path))


def test_unknown_schema_names_file_line_keys_and_schemas(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [GSM8K_ROW, {"prompt": "x", "completion": "y"}])
    pattern = r"odd\.jsonl, line 2: row matches no known schema \(keys found: \['completion', 'prompt'\]\)"
    with pytest.raises(DataFormatError, match=pattern + r".*accepted schemas: medqa .*input_target"):
        load_examples(str(path))


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_says_it_has_no_rows(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"empty\.jsonl contains no rows"):
        load_examples(str(path))


def test_missing_file_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.jsonl"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataFormatError, match="unsupported file type '.txt'"):
        load_examples(str(tmp_path / "data.txt"))
    with pytest.raises(FileNotFoundError, match="unknown dataset 'mystery'"):
        load_examples("mystery")


# --- local formats round trip -----------------------------------------------------------------


def test_json_csv_parquet_round_trip(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    gsm_rows = [GSM8K_ROW, dict(GSM8K_ROW, answer="x\n#### 5")]
    reference = load_examples(str(write_jsonl(tmp_path / "ref.jsonl", gsm_rows)), name="d")

    (tmp_path / "list.json").write_text(json.dumps(gsm_rows), encoding="utf-8")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": gsm_rows}), encoding="utf-8")
    write_jsonl(tmp_path / "lines.json", gsm_rows)  # JSON Lines under a .json name, as on the hub
    pd.DataFrame(gsm_rows).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame(gsm_rows).to_parquet(tmp_path / "t.parquet")
    for name in ("list.json", "wrapped.json", "lines.json", "t.csv", "t.parquet"):
        loaded = load_examples(str(tmp_path / name), name="d")
        assert [(e.question, e.answer, e.label) for e in loaded] == [
            (e.question, e.answer, e.label) for e in reference
        ], name

    # Nested options (parquet struct) and booleans (CSV text) survive their file formats.
    pd.DataFrame([MEDQA_ROW]).to_parquet(tmp_path / "med.parquet")
    med, ref = load_examples(str(tmp_path / "med.parquet"))[0], _convert(MEDQA_ROW)
    assert med.id == "med/all/0"
    assert (med.question, med.answer, med.label, med.options) == (ref.question, ref.answer, ref.label, ref.options)
    pd.DataFrame([BOOLQ_ROW, dict(BOOLQ_ROW, answer=False)]).to_csv(tmp_path / "bq.csv", index=False)
    assert [e.label for e in load_examples(str(tmp_path / "bq.csv"))] == ["yes", "no"]


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("question,answer\nq1,a1\nq2\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"t\.csv, line 3: question_answer row: field 'answer' is null"):
        load_examples(str(tmp_path / "t.csv"))
    (tmp_path / "u.csv").write_text("foo,bar\n1,2\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"u\.csv, line 2: row matches no known schema"):
        load_examples(str(tmp_path / "u.csv"))


def test_limit_and_file_naming(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mydata" / "train.jsonl", [GSM8K_ROW] * 5)
    examples = load_examples(str(path), limit=2)
    assert [e.id for e in examples] == ["mydata/train/0", "mydata/train/1"]  # split-named file: folder name
    other = write_jsonl(tmp_path / "arith.jsonl", [GSM8K_ROW])
    assert load_examples(str(other), split="test")[0].id == "arith/test/0"


# --- hub (mocked: never touches the network) --------------------------------------------------


def test_hub_offline_raises_dataset_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("SALM_DATA_DIR", raising=False)
    with pytest.raises(DatasetUnavailableError, match=r"'cola13/gsm8k_formatted'.*hub could not be reached"):
        load_examples("cola13/gsm8k_formatted")
    with pytest.raises(DatasetUnavailableError, match=r"Pass a local data file.*SALM_DATA_DIR.*gsm8k/test\.jsonl"):
        load_examples("gsm8k")
    with pytest.raises(DatasetUnavailableError, match=r"no local copy of the medqa 'train' split"):
        load_training_sets(["medqa"])


def test_hub_rows_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return [GSM8K_ROW, GSM8K_ROW]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.delenv("SALM_DATA_DIR", raising=False)
    examples = load_examples("gsm8k", limit=1)
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [e.id for e in examples] == ["gsm8k/test/0"] and examples[0].label == "1234"


def test_training_sets_use_hub_validation_split(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    splits = {"train": [BOOLQ_ROW] * 8, "validation": [dict(BOOLQ_ROW, answer=False)] * 3}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: splits)
    data = load_training_sets(["google/boolq"], val_fraction=0.25, seed=0)
    info = data.report["datasets"]["boolq"]
    assert info["held_out"] is False and (info["train"], info["val"], info["loaded"]) == (8, 3, 11)
    assert {e.label for e in data.val} == {"no"} and all(e.id.startswith("boolq/validation/") for e in data.val)


# --- splits and balancing ---------------------------------------------------------------------


def _examples(name: str, n: int) -> list[Example]:
    return [Example(id=f"{name}/train/{i}", dataset=name, question=f"q{i}", answer="a") for i in range(n)]


def test_train_val_split_is_seeded_disjoint_and_complete() -> None:
    examples = _examples("d", 50)
    train, val = train_val_split(examples, 0.1, seed=3)
    assert (len(train), len(val)) == (45, 5)
    assert {e.id for e in train}.isdisjoint(e.id for e in val)
    assert sorted(e.id for e in train + val) == sorted(e.id for e in examples)
    assert train_val_split(examples, 0.1, seed=3) == (train, val)
    assert train_val_split(examples, 0.1, seed=4)[1] != val


def test_train_val_split_small_inputs() -> None:
    assert [len(part) for part in train_val_split(_examples("d", 2), 0.1)] == [1, 1]
    assert [len(part) for part in train_val_split(_examples("d", 1), 0.1)] == [1, 0]
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(_examples("d", 5), 1.0)


def test_balance_truncates_to_smallest_and_is_order_independent() -> None:
    sets = {"a": _examples("a", 10), "b": _examples("b", 4), "c": _examples("c", 7)}
    mixed = balance(sets, seed=1)
    assert len(mixed) == 12 and len({e.id for e in mixed}) == 12
    assert {name: sum(e.dataset == name for e in mixed) for name in sets} == {"a": 4, "b": 4, "c": 4}
    assert balance(dict(reversed(sets.items())), seed=1) == mixed
    assert balance(sets, seed=2) != mixed
    with pytest.raises(ValueError, match="dataset 'b' has no examples"):
        balance({"a": _examples("a", 3), "b": []})


def test_load_training_sets_holds_out_and_balances_local_files(tmp_path: Path) -> None:
    gsm = write_jsonl(tmp_path / "arith.jsonl", [dict(GSM8K_ROW, question=f"q{i}") for i in range(40)])
    bq = write_jsonl(tmp_path / "yesno.jsonl", [dict(BOOLQ_ROW, question=f"q{i}") for i in range(20)])
    data = load_training_sets([str(gsm), str(bq)], val_fraction=0.25, seed=5)
    arith, yesno = data.report["datasets"]["arith"], data.report["datasets"]["yesno"]
    assert arith["held_out"] and yesno["held_out"]
    assert (arith["loaded"], arith["train"], arith["val"]) == (40, 30, 10)
    assert (yesno["loaded"], yesno["train"], yesno["val"]) == (20, 15, 5)
    assert arith["train_balanced"] == 15 and data.report["train_total"] == 30 and data.report["val_total"] == 10
    assert {e.id for e in data.train}.isdisjoint(e.id for e in data.val)
    assert load_training_sets([str(gsm), str(bq)], val_fraction=0.25, seed=5).train == data.train

    capped = load_training_sets([str(gsm)], val_fraction=0.25, seed=5, max_examples=8)
    assert (capped.report["datasets"]["arith"]["loaded"], len(capped.train), len(capped.val)) == (8, 6, 2)


def test_balance_none_keeps_every_row_seeded_and_order_independent() -> None:
    sets = {"a": _examples("a", 10), "b": _examples("b", 4)}
    mixed = balance(sets, seed=1, mode="none")
    assert sorted(e.id for e in mixed) == sorted(e.id for ex in sets.values() for e in ex)
    assert balance(dict(reversed(sets.items())), seed=1, mode="none") == mixed
    assert [e.id for e in balance(sets, seed=2, mode="none")] != [e.id for e in mixed]
    with pytest.raises(ValueError, match="balance mode must be one of truncate, none, got 'upsample'"):
        balance(sets, mode="upsample")


def test_load_training_sets_balance_none_reports_every_row(tmp_path: Path) -> None:
    gsm = write_jsonl(tmp_path / "arith.jsonl", [dict(GSM8K_ROW, question=f"q{i}") for i in range(40)])
    bq = write_jsonl(tmp_path / "yesno.jsonl", [dict(BOOLQ_ROW, question=f"q{i}") for i in range(20)])
    data = load_training_sets([str(gsm), str(bq)], val_fraction=0.25, seed=5, balance_mode="none")
    arith, yesno = data.report["datasets"]["arith"], data.report["datasets"]["yesno"]
    assert (arith["train_balanced"], arith["val_balanced"]) == (30, 10)
    assert (yesno["train_balanced"], yesno["val_balanced"]) == (15, 5)
    assert (len(data.train), len(data.val)) == (45, 15)


def test_load_training_sets_rejects_name_clash(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "x" / "data.jsonl", [GSM8K_ROW] * 3)
    second = write_jsonl(tmp_path / "y" / "data.jsonl", [GSM8K_ROW] * 3)
    with pytest.raises(ValueError, match="are both named 'data'"):
        load_training_sets([str(first), str(second)])


def test_data_dir_known_name_uses_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from salm.data import loading

    rows = [dict(GSM8K_ROW, question=f"{GSM8K_ROW['question']} ({i})") for i in range(10)]  # distinct: a repeat
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows)  # in both splits would be dropped from validation
    data = load_training_sets(["gsm8k"], val_fraction=0.2, data_dir=tmp_path)
    info = data.report["datasets"]["gsm8k"]
    assert info["held_out"] is True and len(data.val) == 2 and info["source_split"] == "train"
    assert info["location"] == str(tmp_path / "gsm8k" / "train.jsonl")

    # A known dataset with local train and validation files uses its own validation file.
    spec = loading.DatasetSpec(
        hub_id="google/boolq",
        local_relpaths={"train": "boolq/train.jsonl", "validation": "boolq/validation.jsonl"},
    )
    monkeypatch.setitem(loading.DATASETS, "boolq", spec)
    write_jsonl(tmp_path / "boolq" / "train.jsonl", [BOOLQ_ROW] * 6)
    write_jsonl(tmp_path / "boolq" / "validation.jsonl", [dict(BOOLQ_ROW, answer=False)] * 3)
    monkeypatch.setenv("SALM_DATA_DIR", str(tmp_path))
    data = load_training_sets(["boolq"])
    assert data.report["datasets"]["boolq"]["held_out"] is False
    assert [e.label for e in data.val] == ["no"] * 3 and len(data.train) == 6
