"""Offline corpora for the quickstart ensemble: three domains that need no download.

* ``code``  -- Python source of the standard library installed with the interpreter.
* ``prose`` -- English help texts shipped with the standard library (``pydoc_data.topics``).
* ``math``  -- generated two-step arithmetic word problems with worked, GSM8K-style solutions.

Every domain is a list of :class:`Document` objects. Documents are assigned to the members' split and the
train/validation/test example splits *before* any examples are cut from them (see :func:`split_documents`),
so examples of different splits never share a source document, and the members never train on the text
the routing heads train on, stop early on or are scored on. Examples are ``(question, answer)`` pairs,
written as jsonl rows that :mod:`salm.data` loads; the members are trained on exactly the text that loader
makes of their split's examples (:func:`render_example`: the shared prompt template, GSM8K answers
reformatted), plus raw domain text.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import random
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from salm.io import atomic_write_jsonl

DOMAINS: tuple[str, ...] = ("code", "prose", "math")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
MEMBERS_SPLIT = "members"  # what the members train on; never written as examples

# Fractions (of characters) of each domain's documents held out from the members: test and validation,
# then ``CorpusConfig.heads_fraction`` for the heads' train split; the rest is the members' split.
VALIDATION_FRACTION = 0.1
TEST_FRACTION = 0.1
DEFAULT_HEADS_FRACTION = 0.3

DEFAULT_CODE_CHARS = 1_500_000
MAX_CODE_FILE_BYTES = 150_000
DEFAULT_MATH_PROBLEMS = 20_000


@dataclass(frozen=True)
class Document:
    """One unit of source text; the unit that the split is decided on.

    Generated documents (math) carry their single example in ``qa``; their ``text`` is its rendering.
    """

    doc_id: str
    text: str
    qa: tuple[str, str] | None = None


def render_example(question: str, answer: str, domain: str = "quickstart") -> tuple[str, str]:
    """(prompt, target) exactly as saLM's data loader and prompt template present this jsonl row.

    Training the members on this rendering is what lets the pipeline's prompts reach them in-domain,
    e.g. a ``#### N`` solution becomes ``Reasoning: ...`` plus ``Therefore, the answer is: N``.
    """
    from salm.data.formats import row_to_example

    ex = row_to_example({"question": question, "answer": answer}, dataset=domain, split="train", index=0)
    return ex.prompt, ex.answer


def rendering_probe() -> str:
    """Renderings of one example per domain: hashed into the build recipe, so a template change rebuilds."""
    samples = {
        "math": ("Tom has 3 apples and buys 4 more. How many apples does he have now?", "3 + 4 = 7.\n#### 7"),
        "code": ("def f(x):\n    y = x", "    return y"),
        "prose": ("A first sentence.", "A second sentence."),
    }
    return json.dumps({d: render_example(q, a, d) for d, (q, a) in samples.items()}, sort_keys=True)


# ----------------------------------------------------------------------------------------------------------
# Splitting


def _stable_key(seed: int, doc_id: str) -> str:
    return hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()


def split_documents(
    documents: Sequence[Document], seed: int = 0, heads_fraction: float = DEFAULT_HEADS_FRACTION
) -> dict[str, list[Document]]:
    """Assign whole documents to splits by a seeded hash of their id: deterministic, machine independent.

    Documents are taken in hash order into test until it holds ``TEST_FRACTION`` of the characters, then
    into validation and train (the heads' split, ``heads_fraction``) likewise; the rest is the members'
    split. Counting characters rather than documents keeps the held-out share stable when document sizes
    vary a lot (stdlib modules range from 1 to 150 KB).

    Why the heads get text of their own: a router is a stacked model, and it must learn from predictions
    the members make on text they have not seen. On their own training text the members are far better
    than on new text (build 1's code specialist, trained on 80 %: 3.15 vs 3.95 nats per token) and the specialist
    is nearly always the best member there, so heads trained on it learn "always the specialist" and
    miss the tokens where another member is better on new text.
    """
    ordered = sorted(documents, key=lambda d: _stable_key(seed, d.doc_id))
    total = sum(len(d.text) for d in ordered)
    held = {"test": TEST_FRACTION, "validation": VALIDATION_FRACTION, "train": heads_fraction}
    parts: dict[str, list[Document]] = {name: [] for name in (*held, MEMBERS_SPLIT)}
    filled = dict.fromkeys(held, 0)
    for i, doc in enumerate(ordered):
        remaining = len(ordered) - i
        name = next((h for h in held if filled[h] < held[h] * total and remaining > 1), MEMBERS_SPLIT)
        parts[name].append(doc)
        if name != MEMBERS_SPLIT:
            filled[name] += len(doc.text)
    # Restore a readable order inside each split (the hash order only decides membership).
    by_id = {d.doc_id: i for i, d in enumerate(documents)}
    return {name: sorted(part, key=lambda d: by_id[d.doc_id]) for name, part in parts.items()}


# ----------------------------------------------------------------------------------------------------------
# code: the standard library's Python source


def stdlib_dir() -> Path:
    """Folder of the running interpreter's standard library (exists on every Python install)."""
    return Path(inspect.getfile(os)).parent


def _is_test_file(path: Path) -> bool:
    name = path.name
    return name.startswith("test") or name.endswith("_test.py") or name == "conftest.py"


def code_documents(max_chars: int = DEFAULT_CODE_CHARS) -> list[Document]:
    """Top-level stdlib modules, in a hash order independent of their names, up to ``max_chars``.

    Test files and huge generated files are skipped; the hash order keeps the sample spread over the
    alphabet instead of taking only modules starting with ``a``.
    """
    root = stdlib_dir()
    files = [p for p in sorted(root.glob("*.py")) if not _is_test_file(p) and p.stat().st_size <= MAX_CODE_FILE_BYTES]
    files.sort(key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    docs: list[Document] = []
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = _clean_code(text)
        if len(text) < 200:
            continue
        if total + len(text) > max_chars and docs:
            continue  # keep looking for smaller files that still fit
        docs.append(Document(path.name, text))
        total += len(text)
    docs.sort(key=lambda d: d.doc_id)
    return docs


def _clean_code(text: str) -> str:
    """Normalise line endings and trailing spaces; tabs become four spaces (one indentation alphabet)."""
    lines = [line.rstrip().replace("\t", "    ") for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def code_examples_from(doc: Document, question_lines: int = 3, answer_lines: int = 4) -> list[tuple[str, str]]:
    """(first lines of a function, the lines that follow) for every function long enough to continue."""
    try:
        tree = ast.parse(doc.text)
    except (SyntaxError, ValueError):
        return []
    src = doc.text.split("\n")
    out: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        end = node.end_lineno or node.lineno
        block = textwrap.dedent("\n".join(src[start:end])).split("\n")
        block = [line for line in block if line.strip()]
        if len(block) < question_lines + 2:
            continue
        question = "\n".join(block[:question_lines])
        answer = "\n".join(block[question_lines : question_lines + answer_lines])
        if len(question) > 240 or len(answer) > 320:
            continue
        out.append((question, answer))
    out.sort(key=lambda qa: (qa[0], qa[1]))
    return out


# ----------------------------------------------------------------------------------------------------------
# prose: the standard library's help texts

_HEADING_UNDERLINE = re.compile(r"^(\*{3,}|={3,}|-{3,})$")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"”’][.!?])\s+(?=[A-Z\"“(])")
_FALLBACK_MODULES = (
    "argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "email", "enum",
    "fractions", "functools", "heapq", "http", "inspect", "itertools", "json", "logging", "os", "pathlib",
    "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
    "tarfile", "textwrap", "threading", "typing", "unittest", "urllib", "uuid", "zipfile",
)  # fmt: skip


def _help_texts() -> dict[str, str]:
    """``pydoc_data.topics.topics`` where the interpreter ships it, else a fixed set of module docstrings."""
    try:
        from pydoc_data.topics import topics  # type: ignore[import-not-found]

        if isinstance(topics, dict) and topics:
            return {str(k): str(v) for k, v in topics.items()}
    except ImportError:
        pass
    import importlib

    texts: dict[str, str] = {}
    for name in _FALLBACK_MODULES:
        try:
            doc = importlib.import_module(name).__doc__
        except Exception:  # noqa: BLE001 -- any broken optional module is simply skipped
            continue
        if doc:
            texts[name] = doc
    return texts


def _prose_paragraph(block: list[str]) -> list[str] | None:
    """The sentences of a paragraph if it reads as prose (not grammar, code, tables or headings)."""
    dedented = textwrap.dedent("\n".join(block)).split("\n")
    if any(line.startswith((" ", "\t")) for line in dedented):
        return None  # nested indentation: code sample or grammar
    text = " ".join(line.strip() for line in dedented)
    text = re.sub(r"\s*\[\d+\]", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) < 60 or "::=" in text or ">>>" in text or not text.endswith((".", "?", "!")):
        return None
    if not (text[0].isupper() or text[0] in '"“'):
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters / len(text) < 0.85:
        return None
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    return sentences or None


def prose_documents() -> list[Document]:
    """One document per section of each help topic, as sentences one per line, paragraphs blank-separated.

    Sections (not whole topics) are the split unit so the held-out splits get enough distinct text.
    Topics repeat each other (``specialnames`` contains ``customization``...), so a paragraph is kept
    only where it first appears: otherwise one text could land in two splits.
    """
    docs: list[Document] = []
    seen: set[str] = set()
    for topic, raw in sorted(_help_texts().items()):
        lines = raw.replace("\r\n", "\n").split("\n")
        sections: list[list[list[str]]] = [[]]
        block: list[str] = []
        for i, line in enumerate(lines):
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if _HEADING_UNDERLINE.match(line.strip()):
                continue
            if line.strip() and _HEADING_UNDERLINE.match(nxt):  # a heading starts a new section
                if block:
                    sections[-1].append(block)
                    block = []
                sections.append([])
                continue
            if line.strip():
                block.append(line)
            elif block:
                sections[-1].append(block)
                block = []
        if block:
            sections[-1].append(block)
        for s_idx, blocks in enumerate(sections):
            paragraphs = []
            for p in (_prose_paragraph(b) for b in blocks):
                if p and " ".join(p) not in seen:
                    seen.add(" ".join(p))
                    paragraphs.append(p)
            if paragraphs:
                text = "\n\n".join("\n".join(p) for p in paragraphs) + "\n"
                docs.append(Document(f"{topic}/{s_idx}", text))
    return docs


def prose_examples_from(doc: Document, answer_sentences: int = 2) -> list[tuple[str, str]]:
    """(a sentence, the sentences after it in its paragraph) for every sentence that has a continuation."""
    out: list[tuple[str, str]] = []
    for para in doc.text.strip().split("\n\n"):
        sentences = para.split("\n")
        for i in range(len(sentences) - 1):
            question, answer = sentences[i], "\n".join(sentences[i + 1 : i + 1 + answer_sentences])
            if len(question) < 20 or len(question) > 300 or len(answer) > 400:
                continue
            out.append((question, answer))
    return out


# ----------------------------------------------------------------------------------------------------------
# math: generated two-step word problems

_NAMES = (
    ("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Mia", "she"), ("Sam", "he"), ("Lily", "she"),
    ("Max", "he"), ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"), ("Jack", "he"), ("Ella", "she"),
)  # fmt: skip
_ITEMS = ("apples", "marbles", "stickers", "cookies", "pencils", "books", "coins", "cards", "shells", "balloons")
_MORE = ("buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more", "picks up {n} more")
_LESS = ("gives away {n}", "loses {n}", "eats {n}", "sells {n}", "gives {n} to a friend")
_MAX_START = 12
_MAX_STEP = 9


@dataclass(frozen=True)
class MathProblem:
    """A generated problem; ``solution`` is the worked answer ending ``#### <result>``."""

    question: str
    solution: str
    result: int


def make_math_problem(rng: random.Random) -> MathProblem:
    """Start value, then two changes (+/-) with single-digit amounts; never negative, at most 30.

    Small numbers keep the number of distinct arithmetic facts in the hundreds, which a few-million-
    parameter model learns in a minute or two of CPU training.
    """
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    value = rng.randint(2, _MAX_START)
    steps: list[str] = []
    clauses: list[str] = []
    for _ in range(2):
        amount = rng.randint(1, _MAX_STEP)
        if amount > value or rng.random() < 0.5:
            phrase, new = rng.choice(_MORE), value + amount
            steps.append(f"{value} + {amount} = {new}.")
        else:
            phrase, new = rng.choice(_LESS), value - amount
            steps.append(f"{value} - {amount} = {new}.")
        clauses.append(phrase.format(n=amount))
        value = new
    start = int(steps[0].split(" ")[0])
    question = (
        f"{name} has {start} {item} and {clauses[0]}. Then {pronoun} {clauses[1]}. "
        f"How many {item} does {pronoun} have now?"
    )
    return MathProblem(question, " ".join(steps) + f"\n#### {value}", value)


def math_documents(n_problems: int = DEFAULT_MATH_PROBLEMS, seed: int = 0) -> list[Document]:
    """``n_problems`` distinct problems (question text is unique, so splits cannot share a problem)."""
    rng = random.Random(f"salm-quickstart-math-{seed}")
    seen: set[str] = set()
    docs: list[Document] = []
    attempts = 0
    while len(docs) < n_problems and attempts < n_problems * 20:
        attempts += 1
        p = make_math_problem(rng)
        if p.question in seen:
            continue
        seen.add(p.question)
        prompt, target = render_example(p.question, p.solution, "math")
        docs.append(Document(f"math-{len(docs):06d}", prompt + target, qa=(p.question, p.solution)))
    return docs


def parse_final_answer(text: str) -> int | None:
    """The integer after the first ``####`` in ``text`` (None when missing or malformed)."""
    m = re.search(r"####\s*(-?\d+)", text)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------------------
# Domains, examples and files


@dataclass(frozen=True)
class CorpusConfig:
    """What a domain's documents are made of (part of the build recipe)."""

    code_chars: int = DEFAULT_CODE_CHARS
    math_problems: int = DEFAULT_MATH_PROBLEMS
    split_seed: int = 0
    heads_fraction: float = DEFAULT_HEADS_FRACTION


@lru_cache(maxsize=16)
def _documents_cached(domain: str, code_chars: int, math_problems: int, seed: int) -> tuple[Document, ...]:
    if domain == "code":
        return tuple(code_documents(code_chars))
    if domain == "prose":
        return tuple(prose_documents())
    if domain == "math":
        return tuple(math_documents(math_problems, seed))
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def documents(domain: str, config: CorpusConfig = CorpusConfig()) -> list[Document]:
    """All documents of a domain, before splitting."""
    return list(_documents_cached(domain, config.code_chars, config.math_problems, config.split_seed))


def split_domain(domain: str, config: CorpusConfig = CorpusConfig()) -> dict[str, list[Document]]:
    """The domain's documents split into the members' split and train/validation/test."""
    return split_documents(documents(domain, config), seed=config.split_seed, heads_fraction=config.heads_fraction)


def corpus_digest(config: CorpusConfig = CorpusConfig()) -> str:
    """Hash of every document of every domain: a different Python install gives a different cache key."""
    h = hashlib.sha256()
    for domain in DOMAINS:
        for doc in documents(domain, config):
            h.update(domain.encode())
            h.update(doc.doc_id.encode())
            h.update(doc.text.encode())
    return h.hexdigest()


def _examples_from(domain: str, doc: Document) -> list[tuple[str, str]]:
    if doc.qa is not None:
        return [doc.qa]
    if domain == "code":
        return code_examples_from(doc)
    if domain == "prose":
        return prose_examples_from(doc)
    return []


@lru_cache(maxsize=32)
def _split_examples(domain: str, split: str, config: CorpusConfig) -> tuple[tuple[str, str], ...]:
    """Every example of a split, unique by question, none whose question occurs in an earlier split.

    Identical snippets exist in different documents (``def __repr__(self):`` in many modules); the
    order members -> train -> validation -> test decides where such a question is kept, so splits stay
    disjoint.
    """
    order = (MEMBERS_SPLIT, *SPLITS)
    earlier: set[str] = set()
    for prior in order[: order.index(split)]:
        earlier.update(q for q, _ in _split_examples(domain, prior, config))
    out: list[tuple[str, str]] = []
    for doc in split_domain(domain, config)[split]:
        for q, a in _examples_from(domain, doc):
            if q not in earlier:
                earlier.add(q)
                out.append((q, a))
    return tuple(out)


def make_examples(
    domain: str, n: int, seed: int = 0, split: str = "train", config: CorpusConfig = CorpusConfig()
) -> list[tuple[str, str]]:
    """Up to ``n`` (question, answer) pairs cut only from documents of ``split``, sampled with ``seed``.

    Fewer than ``n`` come back when the split's documents do not hold that many examples. ``split`` may also
    be ``MEMBERS_SPLIT``: examples of the members' own training text (what the benchmarks compare with).
    """
    if split not in (*SPLITS, MEMBERS_SPLIT):
        raise ValueError(f"unknown split {split!r}; expected one of {(*SPLITS, MEMBERS_SPLIT)}")
    pool = list(_split_examples(domain, split, config))
    random.Random(f"salm-quickstart-examples-{domain}-{split}-{seed}").shuffle(pool)
    return pool[:n]


def training_texts(domain: str, config: CorpusConfig = CorpusConfig()) -> list[str]:
    """What a member trains on for ``domain``: the members' documents plus their rendered examples.

    Math documents are rendered examples already; code and prose add their raw text, so the members
    learn the domain itself and also the question/answer layout the pipeline prompts them with.
    """
    texts = [doc.text for doc in split_domain(domain, config)[MEMBERS_SPLIT]]
    if domain != "math":
        texts += ["".join(render_example(q, a, domain)) for q, a in _split_examples(domain, MEMBERS_SPLIT, config)]
    return texts


def write_example_files(
    data_dir: Path, counts: dict[str, int], seed: int = 0, config: CorpusConfig = CorpusConfig()
) -> dict[str, dict[str, Path]]:
    """``<domain>_<split>.jsonl`` for each domain and split plus ``mixed_<split>.jsonl`` (domains interleaved).

    ``counts`` maps split -> examples per domain. Rows are ``{"question", "answer", "domain"}``.
    """
    files: dict[str, dict[str, Path]] = {d: {} for d in (*DOMAINS, "mixed")}
    for split in SPLITS:
        per_domain = {d: make_examples(d, counts[split], seed=seed, split=split, config=config) for d in DOMAINS}
        for domain, pairs in per_domain.items():
            path = data_dir / f"{domain}_{split}.jsonl"
            atomic_write_jsonl(path, ({"question": q, "answer": a, "domain": domain} for q, a in pairs))
            files[domain][split] = path
        mixed: list[dict[str, str]] = []
        for i in range(max(len(p) for p in per_domain.values())):
            for domain in DOMAINS:
                if i < len(per_domain[domain]):
                    q, a = per_domain[domain][i]
                    mixed.append({"question": q, "answer": a, "domain": domain})
        path = data_dir / f"mixed_{split}.jsonl"
        atomic_write_jsonl(path, mixed)
        files["mixed"][split] = path
    return files
