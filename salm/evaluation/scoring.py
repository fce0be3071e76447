"""Answer extraction and scoring for GSM8K, MedQA (A-D) and BoolQ generations.

Model outputs are free text generated after ``"Question: ...\\nAnswer:\\n"``; training targets end in
``"Therefore, the answer is: X"``.  The extractors therefore look for that explicit statement first and
only fall back to weaker heuristics when it is missing, so a model that follows the trained format is
never penalised by a heuristic and a model that rambles is not rewarded by a lucky guess.

GSM8K mirrors lm-evaluation-harness' two filters:

* *strict*: the model's own answer statement (``the answer is N``) or the dataset's ``#### N``;
* *flexible*: the last number anywhere in the text.

Numbers are compared exactly as rationals after normalisation, so ``18 == 18.0 == $18 == 18.00 == "18."``
and ``1/2 == 0.5``.  No floating-point tolerance is applied: GSM8K answers are exact.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache

__all__ = [
    "normalize_number",
    "numbers_equal",
    "extract_gsm8k_strict",
    "extract_gsm8k_flexible",
    "score_gsm8k",
    "extract_choice",
    "score_choice",
    "extract_yes_no",
    "score_yes_no",
    "truncate_at_stop",
]

# ----------------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------------

# Digits with *valid* thousands grouping ("1,234,567") or plain digits, optional decimals, optional
# "/denominator".  Requiring groups of exactly three stops "3,4,5" or "1,23" from fusing into one number.
_NUM_BODY = r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?:/\d+)?"
# A number as written in prose.  The minus sign only counts when it is not preceded by a word character
# or closing bracket, so the "-" of "3-5" or "x-2" is read as a hyphen/operator, not a sign.
_NUM_IN_TEXT = rf"(?:(?<![\w)\]])[-+])?(?:\$\s?)?(?:(?<![\w)\]])-)?{_NUM_BODY}"
_NUM_TOKEN_RE = re.compile(_NUM_IN_TEXT)
_NUM_FULL_RE = re.compile(rf"(?P<sign1>[-+])?\$?\s*(?P<sign2>[-+])?(?P<body>{_NUM_BODY})")

_UNICODE_MINUS = {"\u2212": "-"}
_MARKUP = " \t\r\n*_`\"'"


def _clean_text(text: str) -> str:
    """Replace the typographic minus so that ``−3`` (U+2212) parses like ``-3``."""
    for src, dst in _UNICODE_MINUS.items():
        text = text.replace(src, dst)
    return text


def _to_fraction_str(text: str) -> Fraction | None:
    """Parse one number (already stripped of surrounding markup) into an exact rational."""
    m = _NUM_FULL_RE.fullmatch(text)
    if m is None or (m.group("sign1") and m.group("sign2")):
        return None
    negative = "-" in ((m.group("sign1") or "") + (m.group("sign2") or ""))
    body = m.group("body").replace(",", "")
    if "/" in body:
        num, den = body.split("/")
        if Fraction(den) == 0:
            return None
        value = Fraction(num) / Fraction(den)
    else:
        value = Fraction(body)
    return -value if negative else value


def _format_fraction(value: Fraction) -> str:
    """Canonical text: integers as ``"18"``, terminating decimals as ``"0.25"``, otherwise ``"1/3"``."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:  # non-terminating decimal: keep it exact rather than round
        return f"{value.numerator}/{value.denominator}"
    k = max(twos, fives)
    scaled = abs(value.numerator) * (10**k // value.denominator)
    digits = str(scaled).rjust(k + 1, "0")
    text = f"{digits[:-k]}.{digits[-k:]}".rstrip("0").rstrip(".")
    return f"-{text}" if value < 0 else text


def normalize_number(text: str) -> str | None:
    """Canonicalise a number written as text, or return None if ``text`` is not (just) a number.

    Accepted: optional sign, ``$``, thousands commas in groups of three, decimals, a trailing ``.``/``%``
    and surrounding markdown (``**18**``).  ``"$1,234.50" -> "1234.5"``, ``"18.00" -> "18"``.
    Fractions are evaluated exactly: ``"1/2" -> "0.5"``, ``"1/3" -> "1/3"`` (never rounded, so two
    spellings of the same rational compare equal and different ones never do).  Badly grouped commas
    (``"1,23"``) and anything with words in it (``"18 apples"``) give None.
    """
    if text is None:
        return None
    s = _clean_text(str(text)).strip(_MARKUP)
    # Trailing sentence punctuation / percent sign carry no numeric meaning here.
    s = s.rstrip(".").rstrip("%").strip(_MARKUP)
    if not s:
        return None
    value = _to_fraction_str(s)
    return None if value is None else _format_fraction(value)


def _as_fraction(value: object) -> Fraction | None:
    """Exact rational for str/int/float/Fraction inputs; None for anything non-numeric (incl. bool, NaN)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | Fraction):
        return Fraction(value)
    if isinstance(value, float):
        # repr() gives the shortest round-tripping decimal, so 0.1 -> 1/10 rather than the binary value.
        return Fraction(repr(value)) if value == value and abs(value) != float("inf") else None
    norm = normalize_number(str(value))
    return None if norm is None else Fraction(norm)


def numbers_equal(a: object, b: object) -> bool:
    """True when ``a`` and ``b`` denote the same number (``18 == "18.0" == "$18" == "18."``).

    Comparison is exact on rationals.  If either side is not a plain number and the optional
    ``math_verify`` package is importable, it is consulted for symbolic forms (e.g. ``\\frac{1}{2}``);
    it is not a dependency and is never required for GSM8K, whose answers are plain numbers.
    """
    fa, fb = _as_fraction(a), _as_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    if isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip():
        try:  # optional symbolic fallback
            import math_verify  # type: ignore[import-not-found]

            return bool(math_verify.verify(math_verify.parse(b), math_verify.parse(a)))
        except Exception:  # missing package or a parse failure both mean "not equal"
            return False
    return False


# ----------------------------------------------------------------------------------------------------
# GSM8K
# ----------------------------------------------------------------------------------------------------

_ANSWER_IS = r"\banswer\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be)\s*[:=]?|\bfinal\s+answer\s*[:=]"
_STRICT_RE = re.compile(
    rf"(?:(?i:{_ANSWER_IS})[\s*_]*(?:\\boxed\{{)?[\s*_]*|####\s*)(?P<num>{_NUM_IN_TEXT})",
)


def extract_gsm8k_strict(text: str) -> str | None:
    """Number from the first explicit answer statement (``the answer is: N`` or ``#### N``), normalised.

    The *first* statement wins: after committing to an answer a model often keeps generating (a new
    "Question:", a second attempt), and that continuation must not overwrite the committed answer.
    """
    if not text:
        return None
    for m in _STRICT_RE.finditer(_clean_text(text)):
        norm = normalize_number(m.group("num"))
        if norm is not None:
            return norm
    return None


def extract_gsm8k_flexible(text: str) -> str | None:
    """The last number anywhere in ``text``, normalised (lm-eval "flexible-extract" spirit)."""
    if not text:
        return None
    for token in reversed(_NUM_TOKEN_RE.findall(_clean_text(text))):
        norm = normalize_number(token)
        if norm is not None:
            return norm
    return None


def _gsm8k_gold(gold: object) -> str:
    """Gold number from ``"42"``, ``42`` or a raw solution ending in ``"#### 42"``."""
    s = str(gold)
    if "####" in s:
        s = s.rsplit("####", 1)[1]
    norm = normalize_number(s)
    if norm is None:
        # Fail loudly: a silently unparsable gold would count every prediction as wrong.
        raise ValueError(f"cannot parse GSM8K gold answer: {str(gold)[-80:]!r}")
    return norm


def score_gsm8k(output: str, gold: str) -> dict[str, object]:
    """Score one GSM8K generation with both strict and flexible extraction.

    Returns ``{strict_answer, flexible_answer, strict_correct, flexible_correct, gold}``; answers are
    normalised strings or None.  Raises ValueError if ``gold`` has no parsable number.
    """
    gold_norm = _gsm8k_gold(gold)
    strict = extract_gsm8k_strict(output)
    flexible = extract_gsm8k_flexible(output)
    return {
        "strict_answer": strict,
        "flexible_answer": flexible,
        "strict_correct": strict is not None and numbers_equal(strict, gold_norm),
        "flexible_correct": flexible is not None and numbers_equal(flexible, gold_norm),
        "gold": gold_norm,
    }


# ----------------------------------------------------------------------------------------------------
# Multiple choice (MedQA)
# ----------------------------------------------------------------------------------------------------

_CONNECTOR = r"(?:is|would\s+be|should\s+be|will\s+be|must\s+be)"


_Patterns = tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str], re.Pattern[str]]


@lru_cache(maxsize=16)
def _choice_patterns(letters: str) -> _Patterns:
    """Compile the letter-specific regexes once per option set."""
    if not letters or not letters.isalpha() or len(set(letters.upper())) != len(letters):
        raise ValueError(f"letters must be distinct alphabetic characters, got {letters!r}")
    up, lo = re.escape(letters.upper()), re.escape(letters.lower())
    # One option letter.  Upper case stands alone unless it starts a word/hyphenation ("A-fib", "A's") or
    # is the article of "A 45-year-old ...".  Lower case is only trusted in parentheses or at line end,
    # so the article "a" in prose is never read as option A.
    tok = (
        rf"(?:\(\s*(?P<p>[{up}{lo}])\s*\)|\[(?P<b>[{up}{lo}])\]"
        rf"|(?P<u>[{up}])(?![\w'\u2019-])(?!\s+\d)|(?P<l>[{lo}])(?=[.:)]?[ \t*_]*$))"
    )
    statement = re.compile(
        rf"(?i:\banswer(?:\s+{_CONNECTOR}\s*[:=]?|\s*[:=])|\b(?:option|choice)\s+{_CONNECTOR}\s*[:=]?)"
        rf"[\s*_]*(?:(?i:option|choice|letter)\b[\s*_]*)?{tok}",
        re.MULTILINE,
    )
    # "option C is correct" / "choice (B) is the best"
    postfix = re.compile(
        rf"(?i:\b(?:option|choice|answer))\s*[*_]*{tok}[*_]*\s+(?i:is\s+(?:the\s+)?(?:correct|right|best))",
        re.MULTILINE,
    )
    lone = re.compile(rf"^[ \t*_>#]*\(?(?P<x>[{up}{lo}])\)?[.:)]?[ \t*_]*$", re.MULTILINE)
    line_start = re.compile(rf"^[ \t*_]*(?:\((?P<y>[{up}{lo}])\)|(?P<z>[{up}])[.)])(?=\s|$)", re.MULTILINE)
    return statement, postfix, lone, line_start


def _first_group(m: re.Match[str]) -> str:
    return next(g for g in m.groups() if g is not None)


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """Option letter (upper case) from a multiple-choice generation, or None if nothing reliable.

    1. The LAST explicit statement ("the answer is C", "Answer: (C)", "correct option is C",
       "option C is correct"): reasoning often mentions or restates options before concluding.
    2. Otherwise a lone letter on its own line, or "(C)"/"C." at a line start -- but only if exactly one
       distinct letter appears that way, so a restated option list ("A. ...\\nB. ...") yields None.
    """
    if not text:
        return None
    statement, postfix, lone, line_start = _choice_patterns(letters)
    hits = [(m.start(), _first_group(m)) for pat in (statement, postfix) for m in pat.finditer(text)]
    if hits:
        return max(hits)[1].upper()
    candidates = {_first_group(m).upper() for pat in (lone, line_start) for m in pat.finditer(text)}
    return candidates.pop() if len(candidates) == 1 else None


def score_choice(output: str, gold_letter: str, letters: str = "ABCD") -> dict[str, object]:
    """``{answer, correct, gold}`` for one multiple-choice generation; gold may be ``"c"`` or ``"(C)"``."""
    gold = str(gold_letter).strip().strip("()[]. ").upper()
    if len(gold) != 1 or gold not in letters.upper():
        raise ValueError(f"gold letter {gold_letter!r} not in {letters!r}")
    answer = extract_choice(output, letters)
    return {"answer": answer, "correct": answer == gold, "gold": gold}


# ----------------------------------------------------------------------------------------------------
# Yes / no (BoolQ)
# ----------------------------------------------------------------------------------------------------

_YN = r"(?P<yn>yes|no|true|false)\b"
_QUOTES = "\"'\u201c\u201d\u2018\u2019"
_YN_STATEMENT_RE = re.compile(rf"\banswer(?:\s+{_CONNECTOR}\s*[:=]?|\s*[:=])[\s*_{_QUOTES}]*{_YN}", re.IGNORECASE)
_YN_START_RE = re.compile(rf"^[\s*_{_QUOTES}]*{_YN}", re.IGNORECASE)
_YN_LONE_RE = re.compile(rf"^[ \t*_{_QUOTES}]*{_YN}[.!]?[ \t*_{_QUOTES}]*$", re.IGNORECASE | re.MULTILINE)
_YN_MAP = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def extract_yes_no(text: str) -> str | None:
    """``"yes"``/``"no"`` from a BoolQ generation (True/False map to yes/no), or None.

    Priority: the LAST explicit answer statement ("Therefore, the answer is: yes"), then a yes/no opening
    the text ("No, because ..."), then a lone yes/no line if exactly one distinct value appears.
    """
    if not text:
        return None
    statements = list(_YN_STATEMENT_RE.finditer(text))
    if statements:
        return _YN_MAP[statements[-1].group("yn").lower()]
    m = _YN_START_RE.match(text)
    if m:
        return _YN_MAP[m.group("yn").lower()]
    lone = {_YN_MAP[m.group("yn").lower()] for m in _YN_LONE_RE.finditer(text)}
    return lone.pop() if len(lone) == 1 else None


def _yes_no_gold(gold: object) -> str:
    if isinstance(gold, bool):
        return "yes" if gold else "no"
    key = str(gold).strip().strip(".").lower()
    if key not in _YN_MAP:
        raise ValueError(f"gold {gold!r} is not yes/no/true/false")
    return _YN_MAP[key]


def score_yes_no(output: str, gold: str | bool) -> dict[str, object]:
    """``{answer, correct, gold}`` for one BoolQ generation; gold may be a bool or yes/no/true/false."""
    gold_norm = _yes_no_gold(gold)
    answer = extract_yes_no(output)
    return {"answer": answer, "correct": answer == gold_norm, "gold": gold_norm}


# ----------------------------------------------------------------------------------------------------
# Generation post-processing
# ----------------------------------------------------------------------------------------------------


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (empty stop strings are ignored).

    Generation runs in batches and may overrun a stop sequence (e.g. the model starts a new
    "Question:"); scoring must only see the text before it.
    """
    cut = len(text)
    for s in stop or ():
        if s:
            idx = text.find(s)
            if 0 <= idx < cut:
                cut = idx
    return text[:cut]
