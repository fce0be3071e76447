"""Tests for answer extraction/scoring (salm.evaluation.scoring) and statistics (salm.evaluation.stats)."""

from __future__ import annotations

import pytest

from salm.evaluation.scoring import (
    extract_choice,
    extract_gsm8k_flexible,
    extract_gsm8k_strict,
    extract_yes_no,
    normalize_number,
    numbers_equal,
    score_choice,
    score_gsm8k,
    score_yes_no,
    truncate_at_stop,
)
from salm.evaluation.stats import accuracy_summary, improvement_over_best, wilson_interval

# ------------------------------------------------------------------------------------------------
# normalize_number / numbers_equal
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,234.50", "1234.5"),
        ("18.00", "18"),
        ("18.", "18"),
        ("-3", "-3"),
        ("\u22127", "-7"),  # typographic minus
        ("-$5", "-5"),
        ("$-5", "-5"),
        ("+4", "4"),
        ("1,000", "1000"),
        ("1,000,000.000", "1000000"),
        (".5", "0.5"),
        ("0.125", "0.125"),
        ("1/2", "0.5"),
        ("1/3", "1/3"),
        ("4/2", "2"),
        ("**18**", "18"),
        ("  42  ", "42"),
        ("25%", "25"),
        ("-0", "0"),
        ("007", "7"),
    ],
)
def test_normalize_number_valid(text: str, expected: str) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text", ["", "   ", ".", "abc", "18 apples", "1,23", "12,3456", "1/0", "1e3", "--5", "$"])
def test_normalize_number_invalid(text: str) -> None:
    assert normalize_number(text) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("18", "18.0"),
        ("$18", "18.00"),
        ("18.", 18),
        (18, 18.0),
        ("1/2", 0.5),
        ("1,000", "1000"),
        ("-3", -3),
        ("0.1", 0.1),
    ],
)
def test_numbers_equal_true(a: object, b: object) -> None:
    assert numbers_equal(a, b)
    assert numbers_equal(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("18", "19"),
        ("-3", "3"),
        ("0.333", "1/3"),
        ("18", None),
        (None, None),
        ("abc", "abc"),
        (True, 1),
        ("18", float("nan")),
        ("100", "10"),
    ],
)
def test_numbers_equal_false(a: object, b: object) -> None:
    assert not numbers_equal(a, b)


# ------------------------------------------------------------------------------------------------
# GSM8K extraction
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Reasoning: 48/2 = 24 clips in May.\nTherefore, the answer is: 72", "72"),
        ("Reasoning: ...\nTherefore, the answer is: 72.", "72"),
        ("So the answer is $18.00.", "18"),
        ("The answer is 1,000.", "1000"),
        ("Therefore, the answer is: **$1,234**", "1234"),
        ("the final answer is -3", "-3"),
        ("Final answer: 12", "12"),
        ("Natalia sold 72 clips.\n#### 1,000", "1000"),
        ("The answer is \\boxed{15}", "15"),
        # First statement wins: the model committed to 5 and then started a new (hallucinated) attempt.
        ("Therefore, the answer is: 5\n\nQuestion: ...\nTherefore, the answer is: 7", "5"),
        # A statement without a number is skipped; the first numeric one is used.
        ("The answer is unclear. Let me redo it: 3 + 4 = 7. The answer is 7", "7"),
    ],
)
def test_gsm8k_strict(text: str, expected: str) -> None:
    assert extract_gsm8k_strict(text) == expected


@pytest.mark.parametrize("text", ["", "She sold 48 + 24 = 72 clips.", "Answer: I don't know", "answer is twelve"])
def test_gsm8k_strict_missing(text: str) -> None:
    assert extract_gsm8k_strict(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She sold 48 + 24 = 72 clips.", "72"),
        ("It costs $1,250.50 in total.", "1250.5"),
        ("The temperature dropped to -4 degrees", "-4"),
        ("Pages 3-5 were read", "5"),  # hyphen between numbers is not a minus sign
        ("She has 10 - 5 left", "5"),  # spaced operator is not a sign either
        ("Then 1,23 is odd", "23"),  # invalid grouping is two numbers, not 123
        ("He ate 18.", "18"),
        ("Half is 1/2", "0.5"),
        ("The answer is 5. Actually 3 + 4 = 7", "7"),
        ("No digits here.", None),
        ("", None),
    ],
)
def test_gsm8k_flexible(text: str, expected: str | None) -> None:
    assert extract_gsm8k_flexible(text) == expected


def test_score_gsm8k_strict_and_flexible_agree() -> None:
    out = "Reasoning: 12/60 = 0.2 per minute; 0.2 * 50 = 10.\nTherefore, the answer is: $10.00."
    res = score_gsm8k(out, "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10")
    assert res == {
        "strict_answer": "10",
        "flexible_answer": "10",
        "strict_correct": True,
        "flexible_correct": True,
        "gold": "10",
    }


def test_score_gsm8k_strict_missing_flexible_present() -> None:
    res = score_gsm8k("48 + 24 = 72 clips altogether", "72")
    assert res["strict_answer"] is None and res["strict_correct"] is False
    assert res["flexible_answer"] == "72" and res["flexible_correct"] is True


def test_score_gsm8k_strict_right_flexible_wrong() -> None:
    # Trailing chatter after the committed answer fools the last-number rule but not the strict one.
    res = score_gsm8k("Therefore, the answer is: 1,000. That took 3 steps.", "#### 1,000")
    assert res["strict_correct"] is True
    assert res["flexible_answer"] == "3" and res["flexible_correct"] is False


def test_score_gsm8k_wrong_answer() -> None:
    res = score_gsm8k("Therefore, the answer is: 71", "72")
    assert res["strict_answer"] == "71"
    assert res["strict_correct"] is False and res["flexible_correct"] is False


def test_score_gsm8k_unparsable_gold_raises() -> None:
    with pytest.raises(ValueError):
        score_gsm8k("The answer is 3", "#### three")


# ------------------------------------------------------------------------------------------------
# Multiple choice (MedQA)
# ------------------------------------------------------------------------------------------------

_OPTIONS = "A. Aspirin\nB. Metformin\nC. Insulin\nD. Atorvastatin"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A 45-year-old woman presents with polyuria. Reasoning: insulin deficiency. The answer is C", "C"),
        (f"Reasoning: the options are\n{_OPTIONS}\nTherefore, the answer is: B", "B"),
        (f"{_OPTIONS}\nTherefore, the answer is: B.", "B"),
        ("The answer is A. Wait, on reflection the answer is (D).", "D"),  # last statement wins
        ("Answer: (C)", "C"),
        ("Therefore, the answer is: C.", "C"),
        ("The correct option is C", "C"),
        ("The correct option is c.", "C"),
        ("the answer is: b", "B"),
        ("Option B is correct because metformin is first line.", "B"),
        ("The best answer is **D**", "D"),
        ("The answer is option C: Insulin", "C"),
        ("Reasoning: a patient with a history of a stroke.\nTherefore, the answer is: A", "A"),
        ("C", "C"),
        ("(B) Metformin", "B"),
        ("Reasoning: it could be B or C, but metformin fits.\n\nB", "B"),
        ("C. Insulin is needed", "C"),
    ],
)
def test_extract_choice(text: str, expected: str) -> None:
    assert extract_choice(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A 45-year-old woman presents with fever and a rash.",  # article A, not option A
        "Answer: A 45-year-old man",  # hallucinated question after "Answer:"
        _OPTIONS,  # restated list without a conclusion: four candidates, no answer
        "This is a classic case, so the answer is a bit unclear.",  # article "a" in prose
        "The answer is not A.",
        "The answer is B-cell lymphoma.",
        "The answer is E",  # not one of the options
        "Both drugs act on a receptor and block a channel.",
    ],
)
def test_extract_choice_none(text: str) -> None:
    assert extract_choice(text) is None


def test_extract_choice_custom_letters() -> None:
    assert extract_choice("The answer is E", letters="ABCDE") == "E"
    with pytest.raises(ValueError):
        extract_choice("The answer is A", letters="AAB")


def test_score_choice() -> None:
    assert score_choice("Therefore, the answer is: C", "C") == {"answer": "C", "correct": True, "gold": "C"}
    assert score_choice("Therefore, the answer is: C", "(c)")["correct"] is True
    assert score_choice("Therefore, the answer is: B", "C")["correct"] is False
    assert score_choice("I am not sure.", "C") == {"answer": None, "correct": False, "gold": "C"}
    with pytest.raises(ValueError):
        score_choice("The answer is A", "E")


# ------------------------------------------------------------------------------------------------
# Yes / no (BoolQ)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No, because the river dried up in 1990.", "no"),
        ("Yes. The passage says so.", "yes"),
        ("Reasoning: the passage states it.\nTherefore, the answer is: yes", "yes"),
        ("Yes at first glance, but the passage contradicts it.\nTherefore, the answer is: no", "no"),
        ("Therefore, the answer is: **Yes**.", "yes"),
        ("The answer is yes. Re-reading the passage, the answer is: no", "no"),  # last statement wins
        ('The answer is "no"', "no"),
        ("True.", "yes"),
        ("answer: False", "no"),
        ("Reasoning: the law was repealed.\nNo", "no"),
    ],
)
def test_extract_yes_no(text: str, expected: str) -> None:
    assert extract_yes_no(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Nobody knows.",
        "Yesterday it rained.",
        "The answer is nothing obvious.",
        "It is unclear.\nYes\nNo",
    ],
)
def test_extract_yes_no_none(text: str) -> None:
    assert extract_yes_no(text) is None


def test_score_yes_no() -> None:
    assert score_yes_no("Therefore, the answer is: yes", True) == {
        "answer": "yes",
        "correct": True,
        "gold": "yes",
    }
    assert score_yes_no("No, it is not.", "no")["correct"] is True
    assert score_yes_no("No, it is not.", "True")["correct"] is False
    assert score_yes_no("Hmm.", False)["correct"] is False
    with pytest.raises(ValueError):
        score_yes_no("yes", "maybe")


# ------------------------------------------------------------------------------------------------
# truncate_at_stop
# ------------------------------------------------------------------------------------------------


def test_truncate_at_stop_earliest() -> None:
    text = "The answer is 5.\n\nQuestion: next one\nAnswer: 7"
    assert truncate_at_stop(text, ["Question:", "\n\n"]) == "The answer is 5."
    assert truncate_at_stop(text, ["Question:"]) == "The answer is 5.\n\n"


def test_truncate_at_stop_no_match_and_empty() -> None:
    assert truncate_at_stop("abc", ["xyz", ""]) == "abc"  # empty stop string must not cut everything
    assert truncate_at_stop("abc", []) == "abc"
    assert truncate_at_stop("", ["x"]) == ""


def test_truncation_changes_strict_score() -> None:
    raw = "I think 3.\n\nQuestion: How many?\nReasoning: ...\nTherefore, the answer is: 9"
    assert extract_gsm8k_strict(raw) == "9"
    assert extract_gsm8k_strict(truncate_at_stop(raw, ["Question:"])) is None


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (8, 10, (0.490, 0.943)),
        (0, 10, (0.000, 0.278)),
        (10, 10, (0.722, 1.000)),
        (50, 100, (0.404, 0.596)),
        (1, 1, (0.207, 1.000)),
    ],
)
def test_wilson_interval_known_values(k: int, n: int, expected: tuple[float, float]) -> None:
    low, high = wilson_interval(k, n)
    assert (round(low, 3), round(high, 3)) == expected
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    narrow, wide = wilson_interval(80, 100), wilson_interval(8, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    z1 = wilson_interval(8, 10, z=1.0)
    assert z1[1] - z1[0] < wide[1] - wide[0]
    for bad in [(11, 10), (-1, 10), (0, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_accuracy_summary() -> None:
    s = accuracy_summary([True] * 8 + [False] * 2)
    assert s["n"] == 10 and s["correct"] == 8
    assert s["accuracy"] == pytest.approx(0.8)
    assert (round(s["ci_low"], 3), round(s["ci_high"], 3)) == (0.490, 0.943)
    empty = accuracy_summary([])
    assert empty == {"accuracy": 0.0, "n": 0, "correct": 0, "ci_low": 0.0, "ci_high": 1.0}


def test_improvement_over_best() -> None:
    res = improvement_over_best(0.62, {"qwen": 0.55, "llama": 0.58, "phi": 0.40})
    assert res["best_member"] == "llama"
    assert res["best_member_accuracy"] == pytest.approx(0.58)
    assert res["delta"] == pytest.approx(0.04)
    worse = improvement_over_best(0.50, {"a": 0.58})
    assert worse["delta"] == pytest.approx(-0.08)
    tie = improvement_over_best(0.6, {"zeta": 0.6, "alpha": 0.6})
    assert tie["best_member"] == "alpha" and tie["delta"] == 0.0
    with pytest.raises(ValueError):
        improvement_over_best(0.5, {})
