"""The routers by name: ``HeadConfig.router`` and ``salm train --router`` name a class registered here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class HeadConfigError(ValueError):
    """A head setting that is unknown or out of range; the message names the field."""


_REGISTRY: dict[str, type] = {}


def register_router(cls: type) -> type:
    """Class decorator: make ``cls`` the router named ``cls.name`` (``HeadConfig.router``, ``salm train --router``)."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name or "." in name:
        raise HeadConfigError(f"a router class needs a non-empty name without '.', got {name!r} on {cls.__name__}")
    known = _REGISTRY.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise HeadConfigError(f"router name {name!r} is taken by {known.__module__}.{known.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def router_names() -> tuple[str, ...]:
    """Every registered router, in registration order (the built-in ones first)."""
    return tuple(_REGISTRY)


def router_class(name: str) -> type:
    """The router registered as ``name``; a :class:`HeadConfigError` listing the known ones otherwise."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise HeadConfigError(f"HeadConfig.router must be one of {', '.join(_REGISTRY)}; got {name!r}")
    return cls


def router_of_state(state: Mapping[str, Any]) -> str:
    """The router whose weights ``state`` holds, for weights saved without a config (the seed's ``.pt``)."""
    found = [name for name, cls in _REGISTRY.items() if cls.matches_state(state)]
    if len(found) != 1:
        raise HeadConfigError(
            f"cannot tell the router of these head weights from their tensors (matches: {found or 'none'}); "
            "load the folder save_pretrained wrote, whose salm_config.json names it"
        )
    return found[0]
