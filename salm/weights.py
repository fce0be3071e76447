"""Head weights on disk: saLM folders (``heads.safetensors`` + ``salm_config.json``), bare ``.safetensors``
files and the seed's ``.pt`` heads, read into a state dict and the config naming their members and heads.

Weights are untrusted input: ``.pt`` files load with ``weights_only=True``; a config is checked enough that
using it cannot fail with a raw traceback; a state dict that does not fit the ensemble is refused with
every mismatch named (:func:`head_state_problems`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from salm.members import MEMBER_FIELDS, ModelInfo, resolve_member_id
from salm.routers import HeadConfig, HeadConfigError, router_class, router_of_state

CONFIG_NAME = "salm_config.json"
WEIGHTS_NAME = "heads.safetensors"
SEED_WEIGHTS_NAME = "best_model_heads.pt"


class WeightsError(ValueError):
    """Head weights that are missing or do not fit the members."""


class RoutingError(WeightsError):
    """Head weights that load but route on NaN or infinity at run time (see ``check_routing`` of the ensemble)."""


def heads_of_state(state: Mapping[str, torch.Tensor]) -> HeadConfig:
    """The HeadConfig that weights saved without a config (the seed's ``.pt``) were built with, from their tensors.

    The router tells itself from the tensors and reads what else they hold (norm, width); dropout has no
    weights, so it takes the default, which only matters if these heads are trained further.
    """
    try:
        name = router_of_state(state)
    except HeadConfigError as e:
        raise WeightsError(str(e)) from None
    return HeadConfig(router=name, **router_class(name).config_of_state(state))


def head_state_problems(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], model_ids: Sequence[str]
) -> list[str]:
    """Every way ``state`` does not fit an ensemble whose heads' state dict is ``own``: members without heads or
    heads without members (for routers with per-member ``projection_heads``), missing, unexpected and
    mis-shaped tensors."""
    problems = []
    per_member = any(k.startswith("projection_heads.") for k in own)
    file_ids = sorted({k.split(".")[1] for k in state if k.startswith("projection_heads.")})
    missing_ids = [i for i in model_ids if i not in file_ids] if per_member else []
    extra_ids = [i for i in file_ids if i not in model_ids]
    if missing_ids:
        problems.append(f"no heads for members {missing_ids}")
    if extra_ids:
        problems.append(f"heads for members not in this ensemble {extra_ids}")
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            problems.append(f"{k}: shape {tuple(v.shape)} in the file, {tuple(own[k].shape)} expected")

    def member(k: str) -> str | None:
        return k.split(".")[1] if k.startswith("projection_heads.") else None

    missing = [k for k in own if k not in state and member(k) not in missing_ids]
    unexpected = [k for k in state if k not in own and member(k) not in extra_ids]
    if missing:
        problems.append(f"missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    return problems


def canonical_state(state: Mapping[str, torch.Tensor], infos: Sequence[ModelInfo]) -> dict[str, torch.Tensor]:
    """Rename aliased member ids (the seed's ``quen-25-15b-med``) to the canonical ids; unknown ids stay
    (:meth:`MultiModelWithScalarHeads.load_heads` lists them)."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) > 1 and parts[0] == "projection_heads":
            parts[1] = resolve_member_id(parts[1], infos) or parts[1]
        out[".".join(parts)] = v
    return out


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, saLM config or None) from a folder, a .safetensors file or a (seed) .pt file.

    ``.pt`` files are untrusted input: they are read with ``weights_only=True`` (no pickled code runs).
    """
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"weights path {p} does not exist")
    config = None
    if p.is_dir():
        if (p / CONFIG_NAME).is_file():
            config = read_config(p / CONFIG_NAME)
        if (p / WEIGHTS_NAME).is_file():
            if config is None:  # never guess the members of a saLM folder (the hub trio would load silently)
                raise WeightsError(
                    f"weights folder {p} holds {WEIGHTS_NAME} but no {CONFIG_NAME}: an incomplete save (a run "
                    "killed while writing it?); use another checkpoint, or pass the .safetensors file with --models"
                )
            p = p / WEIGHTS_NAME
        elif (p / SEED_WEIGHTS_NAME).is_file():
            p = p / SEED_WEIGHTS_NAME
        else:
            raise WeightsError(f"weights folder {p} holds neither {WEIGHTS_NAME} nor {SEED_WEIGHTS_NAME}")
    elif p.suffix == ".safetensors" and (p.parent / CONFIG_NAME).is_file():
        config = read_config(p.parent / CONFIG_NAME)
    try:
        if p.suffix == ".safetensors":
            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"could not read head weights from {p}: {e}") from e
    if isinstance(state, dict) and "heads" in state and isinstance(state["heads"], dict):
        state = state["heads"]  # a training checkpoint
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{p} does not hold a state dict of tensors")
    return state, config


def read_config(path: Path) -> dict[str, Any]:
    """A ``salm_config.json``, checked enough that using it cannot fail with a raw traceback."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(config, dict) or not isinstance(config.get("members"), list) or not config["members"]:
        raise WeightsError(f"{path} is not a saLM config: it needs a non-empty 'members' list")
    for i, m in enumerate(config["members"]):
        if not isinstance(m, dict) or not {"id", "path"} <= set(m):
            raise WeightsError(f"{path}: member #{i + 1} needs at least 'id' and 'path'")
        unknown = set(m) - MEMBER_FIELDS - {"hidden_size"}
        if unknown:
            raise WeightsError(
                f"{path}: member {m['id']!r} has unknown fields {sorted(unknown)} (known: {sorted(MEMBER_FIELDS)})"
            )
    try:
        config_heads(config)
    except HeadConfigError as e:
        raise WeightsError(f"{path}: {e}") from None
    return config


# How folders saved before HeadConfig existed (flat keys) named its fields. ``router`` was added
# later than the others: a folder without it holds seed heads, whatever HeadConfig's default router is.
_LEGACY_HEAD_KEYS = {
    "head_hidden_dim": "hidden_dim",
    "head_dropout": "dropout",
    "head_norm": "norm",
    "router": "router",
}


def config_heads(config: dict[str, Any]) -> HeadConfig:
    """The :class:`HeadConfig` a saLM config holds: its ``"heads"`` object, or the flat keys of older folders."""
    if "heads" in config:
        legacy = sorted(k for k in _LEGACY_HEAD_KEYS if k in config)
        if legacy:
            raise HeadConfigError(f"the config has both a 'heads' object and the older flat keys {legacy}; keep one")
        return HeadConfig.from_dict(config["heads"])
    fields = {new: config[old] for old, new in _LEGACY_HEAD_KEYS.items() if old in config}
    fields.setdefault("router", "seed")
    return HeadConfig.from_dict(fields)


def config_members(config: dict[str, Any]) -> list[ModelInfo]:
    """The members a (checked) saLM config names."""
    members = []
    for m in config["members"]:
        kw = {k: v for k, v in m.items() if k != "hidden_size"}
        kw.setdefault("name", kw["id"])
        members.append(ModelInfo(**kw))
    return members
