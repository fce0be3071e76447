"""The finetuning data as token ids and labels: plain text packed into windows, question/answer rows as saLM
prompts them.

Question/answer rows come from saLM's own loaders (:func:`salm.data.load_examples`) and are tokenized by
:func:`salm.features.tokenize_examples`, the routing heads' tokenizer: the specialist learns its answers
behind exactly the prompt the ensemble will show it. Plain text is one stream per file (EOS at its end),
cut into ``max_length``-token windows with no padding, every token a target.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salm.features import TokenizedSplit, tokenize_examples
from salm.finetune.config import FinetuneConfig, FinetuneError, is_text_source


@dataclass
class FinetuneData:
    """One split (train or eval): every source's rows together, and what each source gave."""

    split: TokenizedSplit
    sources: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.split)


def load_split(sources: list[str], tokenizer: Any, cfg: FinetuneConfig, name: str) -> FinetuneData:
    """Every source of ``sources`` tokenized, in order; each source's counts for the report."""
    parts: list[TokenizedSplit] = []
    report: list[dict[str, Any]] = []
    for source in sources:
        if is_text_source(source):
            part = text_windows(Path(source).expanduser(), tokenizer, cfg.max_length, name)
            kind, skipped = "text", 0
        else:
            part, skipped = _qa_split(source, tokenizer, cfg, name)
            kind = "question/answer"
        parts.append(part)
        report.append({
            "source": source, "kind": kind, "rows": len(part), "tokens": sum(map(len, part.input_ids)),
            "loss_tokens": sum(part.n_positions), "empty_answers_skipped": skipped,
            "prompts_truncated": sum(part.prompts_truncated.values()),
            "answers_truncated": sum(part.answers_truncated.values()),
        })  # fmt: skip
    return FinetuneData(_concat(parts, name), report)


def text_windows(path: Path, tokenizer: Any, max_length: int, name: str) -> TokenizedSplit:
    """``path``'s text + EOS, cut into consecutive ``max_length``-token windows labelled on every token.

    A last window shorter than two tokens has no next-token target and is dropped.
    """
    from salm.data.loading import read_utf8  # the loaders' UTF-8 reader: a bad byte names its line

    text = read_utf8(path)
    if not text.strip():
        raise FinetuneError(f"{path}: no text to train on (the file is empty)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FinetuneError("the base model's tokenizer has no EOS token; text documents end with EOS")
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) + [eos]
    windows = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    windows = [w for w in windows if len(w) >= 2]
    dataset = path.stem
    return TokenizedSplit(
        name, windows, [list(w) for w in windows], [dataset] * len(windows),
        [f"{dataset}/text/{i}" for i in range(len(windows))],
    )  # fmt: skip


def _qa_split(source: str, tokenizer: Any, cfg: FinetuneConfig, name: str) -> tuple[TokenizedSplit, int]:
    """A question/answer source's rows (rows with an empty answer skipped and counted), tokenized."""
    from salm.data import load_examples

    split = None if Path(source).expanduser().is_file() else "train"
    examples = load_examples(source, split=split, limit=cfg.max_examples)
    kept = [ex for ex in examples if ex.answer.strip()]
    if not kept:
        raise FinetuneError(f"{source}: every one of its {len(examples)} row(s) has an empty answer")
    return tokenize_examples(kept, tokenizer, cfg.max_length, cfg.loss_on, name), len(examples) - len(kept)


def _concat(parts: list[TokenizedSplit], name: str) -> TokenizedSplit:
    out = TokenizedSplit(name, [], [], [], [])
    for p in parts:
        out.input_ids += p.input_ids
        out.labels += p.labels
        out.datasets += p.datasets
        out.example_ids += p.example_ids
        out.prompts_truncated = dict(Counter(out.prompts_truncated) + Counter(p.prompts_truncated))
        out.answers_truncated = dict(Counter(out.answers_truncated) + Counter(p.answers_truncated))
    return out
