"""Tiny random members built offline, for tests and benchmarks (no hub, no GPU).

They go through exactly the same loading path as hub models: ordinary Hugging Face folders. The tokenizer
comes from saLM's one BPE builder (:func:`salm.quickstart.lm.train_tokenizer`) and member-set files from
:func:`salm.members.write_member_set` (re-exported here); helpers that only tests use live in ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from salm.members import ModelInfo, write_member_set

__all__ = ["build_member", "build_tiny_members", "build_tokenizer", "write_member_set"]

_CORPUS = [
    "Question: what is two plus three?\nAnswer:\nReasoning: 2 + 3 = 5.\nTherefore, the answer is: 5",
    "The patient presented with fever and cough; the doctor prescribed rest and fluids.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "The quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow.",
    "Tom has 12 apples. He gives 4 to Ann and buys 7 more. 12 - 4 = 8. 8 + 7 = 15.\n#### 15",
] * 20


def build_tokenizer(vocab_size: int = 300, corpus: Sequence[str] = _CORPUS):
    """A byte-level BPE tokenizer with an EOS/pad token, wrapped as a fast HF tokenizer (GPT-2's split; see
    :func:`salm.quickstart.lm.train_tokenizer`, the one builder)."""
    from salm.quickstart.lm import train_tokenizer

    return train_tokenizer(corpus, vocab_size, pretokenizer="gpt2")


def build_member(
    out_dir: str | Path,
    tokenizer,
    seed: int,
    arch: str = "qwen2",
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    max_position_embeddings: int = 256,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random-init causal LM (Qwen2 or Llama architecture) and the tokenizer as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    cfg = cfg_cls(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype)
    with torch.no_grad():  # larger-than-default init so random members disagree clearly (no ties in tests)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_members(
    root: str | Path,
    n: int = 3,
    tokenizer=None,
    hidden_sizes: Sequence[int] | None = None,
    archs: Sequence[str] | None = None,
    **kwargs,
) -> list[ModelInfo]:
    """``n`` tiny members in ``root/<id>`` sharing one tokenizer; hidden sizes may differ per member."""
    tokenizer = tokenizer or build_tokenizer()
    infos = []
    for i in range(n):
        mid = f"tiny-{i}"
        h = hidden_sizes[i] if hidden_sizes else 32
        arch = archs[i] if archs else "qwen2"
        path = build_member(Path(root) / mid, tokenizer, seed=i, arch=arch, hidden_size=h, **kwargs)
        infos.append(ModelInfo(mid, f"Tiny member {i}", str(path), "tiny", "test"))
    return infos


def build_lora_adapter(
    base: str | Path,
    out_dir: str | Path,
    seed: int,
    r: int = 4,
    target_modules: Sequence[str] = ("q_proj", "v_proj", "down_proj"),
    scale: float = 0.5,
    **lora_kwargs,
) -> Path:
    """Save a PEFT LoRA adapter of the model at ``base`` with random (non-zero) B matrices, as PEFT users save
    their finetunes (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, scale)
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    return out
