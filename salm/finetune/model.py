"""The base model with fresh LoRA adapters on its projections: the only trainable weights of a finetune."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from salm.finetune.config import FinetuneConfig, FinetuneError

PEFT_MISSING = 'the peft package is missing: pip install -e ".[finetune]"'


def require_peft() -> Any:
    """The ``peft`` module, or a one-line error saying how to install it (the core install leaves it out)."""
    try:
        import peft
    except ImportError:
        raise FinetuneError(PEFT_MISSING) from None
    return peft


def base_info(cfg: FinetuneConfig) -> Any:
    """The base as a member (:class:`salm.members.ModelInfo`): it loads, and fails, the way members do."""
    from salm.members import ModelInfo

    return ModelInfo(id="base", name=cfg.base, path=cfg.base, revision=cfg.revision)


@contextlib.contextmanager
def base_errors(cfg: FinetuneConfig) -> Iterator[None]:
    """A base that cannot load is a FinetuneError naming ``--base`` (the members' messages name a member and
    suggest ``--models``, which this command does not have)."""
    from salm.members import MemberError, hub_offline

    try:
        yield
    except MemberError as e:
        if hub_offline() and not Path(cfg.base).expanduser().exists():
            raise FinetuneError(
                f"--base {cfg.base} is not in the local Hugging Face cache and the hub is offline or unreachable: "
                f"pass a local model folder (download it once where the hub is reachable: hf download {cfg.base} "
                "--local-dir DIR)"
            ) from None
        message = " ".join(line.strip() for line in str(e).splitlines())  # library errors run over lines
        raise FinetuneError(message.replace("member 'base': ", "--base: ", 1)) from None


def load_tokenizer(cfg: FinetuneConfig) -> Any:
    from salm.members import load_tokenizer as load_member_tokenizer

    with base_errors(cfg):
        tokenizer = load_member_tokenizer(base_info(cfg), trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:  # padding positions are masked out; any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The last name part of every linear layer (``q_proj``, ``down_proj``, ...): what PEFT targets match."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_targets(model: torch.nn.Module, targets: list[str], base: str) -> None:
    """Unknown ``--target_modules`` fail naming the base's linear layers (PEFT's own error lists every module)."""
    if targets == ["all-linear"]:  # PEFT's shorthand: every linear layer but the output head
        return
    known = linear_module_names(model)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise FinetuneError(
            f"--target_modules: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a linear layer of "
            f"{base} (its linear layers: {', '.join(known)})"
        )


def load_lora_model(cfg: FinetuneConfig, device: torch.device) -> Any:
    """The frozen base with seeded, untrained LoRA adapters (B = 0: at first it computes exactly the base).

    The adapters' own weights stay fp32 whatever the base's dtype (PEFT's default), so bf16 bases train
    full-precision adapters.
    """
    peft = require_peft()
    from salm.members import load_member_model

    with base_errors(cfg):
        model = load_member_model(base_info(cfg), device, getattr(torch, cfg.dtype), cfg.trust_remote_code, pack=False)
    targets = list(cfg.target_modules)
    check_targets(model, targets, cfg.base)
    if cfg.gradient_checkpointing:  # non-reentrant: works with a frozen embedding, replays dropout's RNG exactly
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    lora = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed)  # the adapters' initialisation depends on the seed alone
    with warnings.catch_warnings():  # peft calls a transformers 5 deprecated name; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, lora)


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapters' weights by parameter name (a copy on the CPU): what a checkpoint holds."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: Any, state: dict[str, torch.Tensor], source: str) -> None:
    """Put a checkpoint's adapter weights back; a different set of weights is an error naming the file."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state) or any(params[n].shape != state[n].shape for n in params):
        raise FinetuneError(f"--resume: {source} holds other adapter weights than these settings make")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
