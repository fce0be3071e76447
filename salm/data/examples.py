"""The one example type and prompt template shared by training, evaluation and generation.

Keeping the template in a single place matters: routing heads are trained on the hidden states of
prompts built here, so evaluation must build prompts the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"
ANSWER_PREFIX = "Therefore, the answer is:"

_NUMBER_RE = re.compile(r"^[-+]?\$?\d[\d,]*(\.\d+)?$")


def build_prompt(question: str) -> str:
    """Return the prompt shown to every model for ``question`` (the seed's template)."""
    return PROMPT_TEMPLATE.format(question=question)


def format_answer(reasoning: str, label: str) -> str:
    """Return a target in the seed's style: a reasoning line, then the final-answer line."""
    return f"Reasoning: {reasoning.strip()}\n{ANSWER_PREFIX} {label}"


def clean_label(text: str) -> str:
    """Normalise a final answer so labels from different sources compare equal.

    Numbers lose thousands separators, a leading ``$`` and a trailing period; yes/no are lower-cased.
    Anything else is only stripped, so option letters and free text are kept as written.
    """
    label = text.strip().rstrip(".").strip()
    if _NUMBER_RE.match(label):
        return label.replace(",", "").replace("$", "")
    if label.lower() in ("yes", "no"):
        return label.lower()
    return label


def parse_label(answer: str) -> str | None:
    """Extract the final answer from a target: the last ``Therefore, the answer is:`` or ``#### N`` line.

    Returns None when the target has neither, so callers can tell "unknown" from an empty answer.
    """
    for line in reversed(answer.strip().splitlines()):
        line = line.strip()
        if line.startswith(ANSWER_PREFIX):
            return clean_label(line[len(ANSWER_PREFIX) :]) or None
        if line.startswith("####"):
            return clean_label(line[4:]) or None
    return None


@dataclass(frozen=True)
class Example:
    """One question with its target; frozen so examples can be shared between splits safely."""

    id: str
    dataset: str
    question: str
    answer: str
    label: str | None = None
    # Excluded from the hash so MedQA examples stay hashable (usable in sets and as dict keys).
    options: dict[str, str] | None = field(default=None, hash=False)

    @property
    def prompt(self) -> str:
        return build_prompt(self.question)
