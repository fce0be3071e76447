"""The quickstart's language-model toolkit: saLM's one BPE tokenizer builder, the members' training loop and the
held-out scores the build checks (answer NLL, arithmetic accuracy). :mod:`salm.quickstart.build` composes them
into the recipe; the knowledge split and the tests' tiny members use them too."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from salm.quickstart.corpora import (
    render_example,
)

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class TrainPhase:
    """One optimisation run: AdamW, linear warmup then cosine decay to 10% of ``lr``."""

    steps: int
    lr: float
    batch_size: int
    warmup: int = 20
    weight_decay: float = 0.1
    replay: float = 0.0  # specialists: share of windows drawn from the general mix (limits forgetting)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
r"""Qwen2's pre-tokenizer split. ``\p{N}`` isolates every digit, so numbers are spelled digit by digit."""


def train_tokenizer(texts: Sequence[str], vocab_size: int, save_dir: Path | None = None, pretokenizer: str = "qwen2"):
    """Train a byte-level BPE with ``EOS_TOKEN``/``PAD_TOKEN``: saLM's one tokenizer builder (the quickstart and
    knowledge-split members, and :func:`salm.testing.build_tokenizer` for the tests' tiny members).

    ``pretokenizer="qwen2"`` (every built member): the normalizer and pre-tokenizer are exactly Qwen2's:
    transformers 5 loads any folder whose ``config.json`` says ``qwen2`` with ``Qwen2Tokenizer``, which
    re-installs those components, so any other pipeline (e.g. a ``Digits`` pre-tokenizer) would silently
    tokenize differently after loading. It is saved to ``save_dir`` and returned as reloaded by
    ``AutoTokenizer``, which guarantees training and every later user see the same ids.
    ``pretokenizer="gpt2"``: GPT-2's byte-level split and no normalizer, returned as built (saved to
    ``save_dir`` when given); what the tests' tiny members have always used.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

    if pretokenizer not in ("qwen2", "gpt2"):
        raise ValueError(f"pretokenizer must be 'qwen2' or 'gpt2', got {pretokenizer!r}")
    qwen2 = pretokenizer == "qwen2"
    if qwen2 and save_dir is None:
        raise ValueError("a qwen2 tokenizer is checked by reloading it: pass save_dir")
    tok = Tokenizer(models.BPE())
    if qwen2:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    specials = dict(eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, **({"unk_token": EOS_TOKEN} if qwen2 else {}))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    if not qwen2:
        return fast
    # Resolve the class exactly as AutoTokenizer does for a member folder (whose config says qwen2).
    loaded = AutoTokenizer.from_pretrained(save_dir, config=Qwen2Config())
    probe = "".join(t[:2000] for t in texts[:50])
    if loaded(probe, add_special_tokens=False)["input_ids"] != tok.encode(probe).ids:
        raise RuntimeError("reloaded quickstart tokenizer does not reproduce the trained tokenization")
    return loaded


# ----------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TokenStream:
    """One domain's training texts as a single token sequence, with the offset where each text starts."""

    ids: torch.Tensor
    starts: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def window_start(self, pos: int, seq_len: int) -> int:
        """``pos``, moved to the next text start when that is less than half a window away.

        Short texts (a math problem, a rendered example) then start whole at the beginning of a window,
        instead of losing the question whose answer the window asks the model to predict; long texts
        (a module's source) keep uniformly random windows.
        """
        i = int(torch.searchsorted(self.starts, pos))
        if i < len(self.starts) and int(self.starts[i]) - pos < seq_len // 2:
            pos = int(self.starts[i])
        return min(pos, len(self.ids) - seq_len)


def _token_stream(tokenizer, texts: list[str]) -> TokenStream:
    """All texts tokenized, each followed by EOS, concatenated."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    starts: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        starts.append(len(ids))
        ids.extend(enc)
        ids.append(eos)
    return TokenStream(torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long))


def _lr_at(step: int, phase: TrainPhase) -> float:
    if step < phase.warmup:
        return phase.lr * (step + 1) / phase.warmup
    progress = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
    return phase.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(
    model: torch.nn.Module,
    streams: list[TokenStream],
    weights: list[float],
    phase: TrainPhase,
    seq_len: int,
    seed: int,
    desc: str,
    progress: bool,
) -> list[float]:
    """Next-token training on random windows; each row's stream is drawn by ``weights``. Returns losses."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": phase.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=phase.lr,
        betas=(0.9, 0.95),
    )
    w = torch.tensor(weights, dtype=torch.float)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(phase.steps), desc=desc, disable=not progress, leave=False, file=sys.stderr)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, phase)
        rows = []
        choice = torch.multinomial(w, phase.batch_size, replacement=True, generator=gen)
        for s in choice.tolist():
            stream = streams[s]
            start = stream.window_start(int(torch.randint(0, len(stream) - seq_len, (1,), generator=gen)), seq_len)
            rows.append(stream.ids[start : start + seq_len])
        batch = torch.stack(rows)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == phase.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------------------
# Evaluation


_NO_LIMIT = 1 << 30  # held-out examples are scored whole


def _tokenized(tokenizer, pairs: list[tuple[str, str]], domain: str):
    """(question, answer) pairs as the pipeline's head training tokenizes them (:mod:`salm.features`)."""
    from salm.data.formats import row_to_example
    from salm.features import tokenize_examples

    examples = [
        row_to_example({"question": q, "answer": a}, dataset=domain, split="test", index=i)
        for i, (q, a) in enumerate(pairs)
    ]
    return tokenize_examples(examples, tokenizer, _NO_LIMIT, "answer", domain)


def tokenize_example(tokenizer, question: str, answer: str, domain: str = "quickstart") -> tuple[list[int], int]:
    """``tokenizer(prompt) + tokenizer(answer) + [eos]`` of the rendered example, and the prompt's length:
    exactly the pipeline's layout, so the NLLs here are the numbers the routing heads will see."""
    split = _tokenized(tokenizer, [(question, answer)], domain)
    return split.input_ids[0], split.labels[0].count(-100)


@torch.no_grad()
def answer_nll(model, tokenizer, pairs: list[tuple[str, str]], domain: str, batch_size: int = 16) -> float:
    """Mean negative log-likelihood per answer token (EOS included) given the rendered prompt."""
    from salm.features import collate

    split = _tokenized(tokenizer, pairs, domain)
    total, count = 0.0, 0
    for i in range(0, len(split), batch_size):
        ids, mask, labels = collate(split, range(i, min(i + batch_size, len(split))), tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((target != -100).sum())
    return total / max(1, count)


@torch.no_grad()
def math_accuracy(model, tokenizer, problems: list[tuple[str, str]], max_new_tokens: int = 48) -> float:
    """Share of problems whose greedy completion of the rendered prompt states the right final answer."""
    from salm.data.examples import parse_label

    if not problems:
        return 0.0
    correct = 0
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only: pad on the left
    try:
        for i in range(0, len(problems), 25):
            rendered = [render_example(q, a, "math") for q, a in problems[i : i + 25]]
            enc = tokenizer([p for p, _ in rendered], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for text, (_, gold) in zip(texts, rendered):
                got = parse_label(text)
                correct += int(got is not None and got == parse_label(gold))
    finally:
        tokenizer.padding_side = side
    return correct / len(problems)
