"""Showing which member spoke: terminal colours (plain when piped) and a legend."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from salm.generation import TokenDecision

# Matplotlib's tab10, reused by the HTML report and plots so a member has one colour everywhere.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
_ANSI = [34, 33, 32, 31, 35, 36, 95, 90, 93]


def member_colour(model_ids: Sequence[str], member: str) -> str:
    return PALETTE[list(model_ids).index(member) % len(PALETTE)]


def stream_is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def use_colour(stream: TextIO) -> bool:
    return stream_is_terminal(stream)


def nested_progress(enabled: bool) -> bool:
    """Whether a progress bar drawn *inside* another one should show: only on a terminal.

    Written to a file or a pipe, every redraw of a nested bar leaves cursor-up codes (``ESC[A``) and
    half-drawn lines in the log; there the outer bar alone tells how far the run is.
    """
    return enabled and stream_is_terminal(sys.stderr)


def progress_message(message: str) -> None:
    """A line on stderr that does not break an active progress bar (tqdm clears and redraws it)."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def quiet_library_progress_bars() -> None:
    """Switch off Hugging Face's per-file bars (downloads, "Loading weights"), e.g. when stderr is a log file."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read at import by libraries not imported yet
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def ansi(text: str, index: int, enabled: bool) -> str:
    return f"\033[{_ANSI[index % len(_ANSI)]}m{text}\033[0m" if enabled else text


def legend(model_ids: Sequence[str], colour: bool) -> str:
    return "members: " + "  ".join(ansi(f"■ {m}", i, colour) for i, m in enumerate(model_ids))


def print_decisions(
    decisions: Iterable[TokenDecision],
    model_ids: Sequence[str],
    stream: TextIO = sys.stdout,
    colour: bool | None = None,
) -> list[TokenDecision]:
    """Print tokens as they come, coloured by the member that emitted each (plain text when piped);
    returns the decisions printed."""
    colour = use_colour(stream) if colour is None else colour
    index = {m: i for i, m in enumerate(model_ids)}
    seen = []
    for d in decisions:
        stream.write(ansi(d.token, index[d.member], colour))
        stream.flush()
        seen.append(d)
    stream.write("\n")
    return seen


def member_shares(decisions: Sequence[TokenDecision], model_ids: Sequence[str]) -> dict[str, float]:
    n = max(len(decisions), 1)
    return {m: sum(d.member == m for d in decisions) / n for m in model_ids}
