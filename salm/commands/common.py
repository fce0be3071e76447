"""Flags and helpers several commands share: the member and weights flags, checks of what is known before the
members load, loading the ensemble they describe, warnings and warm-ups."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


class UsageError(ValueError):
    """Bad command-line input found by a command itself; the message names the flag or argument (exit 2)."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every command that loads members shares."""
    g = parser.add_argument_group("members")
    g.add_argument("--models", default=None, help="member-set file (YAML/JSON); default: the Qwen2.5-1.5B trio")
    g.add_argument("--device", default=None, help="cuda, cpu or mps (default: best available)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="members' dtype; auto: bfloat16 on accelerators and on CPUs that multiply it natively "
        "(avx512_bf16, AMX), else float32",
    )
    g.add_argument("--trust_remote_code", action="store_true", help="allow members' custom code (off by default)")


def add_weights_argument(parser: argparse.ArgumentParser, *aliases: str, help: str = "trained heads") -> None:
    """``--weights`` (every command spells it so), plus the seed's spellings as ``aliases``; into ``args.weights``."""
    parser.add_argument("--weights", *aliases, dest="weights", default=None, help=help)


def ensemble_from_flags(args: argparse.Namespace, weights: str | None = None, **kwargs: Any) -> Any:
    """The ensemble the member flags describe: fresh heads, or trained heads from ``weights``."""
    from salm.ensemble import load_ensemble

    return load_ensemble(
        args.models, weights, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code, **kwargs
    )


def check_routing_members(routing: str, models: str | None, weights: str | None) -> None:
    """A ``member:<id>`` routing checked against the member set before any member loads, where the set is known
    without loading: the ``--models`` file, else the members the weights' config names, else the default trio
    (no weights) or the trio the seed's ``.pt`` heads imply. Raises GenerationError, MemberError or WeightsError.
    """
    if not routing.startswith("member:"):
        return
    from salm.ensemble import config_members, read_weights
    from salm.generation import parse_routing
    from salm.members import MODELS, resolve_models

    infos = None
    if models is not None:
        infos = resolve_models(models)
    elif weights:
        _, config = read_weights(weights)  # small: the heads only
        if config is not None:
            infos = config_members(config)
        elif not str(weights).endswith(".safetensors"):
            infos = MODELS
    else:
        infos = MODELS
    if infos is not None:
        parse_routing(routing, infos)


def utf8_text(value: str, what: str) -> str:
    """``value`` unchanged if it is valid text; else a :class:`UsageError` naming ``what`` and the first bad byte.

    Python hands command-line bytes that are not UTF-8 over as lone surrogates (``surrogateescape``), which
    the tokenizer rejects with a raw TypeError. Refusing them (rather than replacing them with U+FFFD) keeps
    the model from answering a question it was not asked.
    """
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError as e:
        position = e.start
    try:
        raw = os.fsencode(value)  # the bytes as given on the command line
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{what} is not valid UTF-8: byte 0x{raw[e.start]:02x} at byte position {e.start}; pass UTF-8 text"
        ) from None
    except UnicodeEncodeError:
        pass
    raise UsageError(f"{what} holds an unpaired surrogate at character position {position}; pass UTF-8 text")


def warn_untrained_heads(prog: str, flag: str = "--weights") -> None:
    """The banner every command prints when it routes with fresh (random) heads."""
    print(
        "=" * 78 + f"\nWARNING ({prog}): no {flag} given: the routing heads are UNTRAINED (random).\n"
        f"The ensemble's outputs say nothing about saLM; pass {flag} PATH for trained heads.\n" + "=" * 78,
        file=sys.stderr,
    )


def print_warmups(model: Any) -> None:
    """What ``--compile`` cost up front: one line per compiled shape bucket."""
    from salm.fast_decode import warmup_report

    for w in warmup_report(model):
        print(
            f"compiled the decode step of {', '.join(w.members)} (batch {w.batch}, cache {w.cache_len}) "
            f"in {w.seconds:.1f}s",
            file=sys.stderr,
        )
