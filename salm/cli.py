"""The ``salm`` command: the dispatcher at the top. Each command lives in :mod:`salm.commands` (its flags and a
``run(args)`` that builds configs and calls the library); only the chosen command's module is imported."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Exit codes, the same for every command (and the seed's entry points); documented in the README.
EXIT_OK = 0
EXIT_FAILED = 1  # the run finished but failed its own checks (salm quickstart); also Python's code for a crash
EXIT_BAD_INPUT = 2  # something the user must fix: a flag, file, member, dataset or weights (argparse uses 2 too)
EXIT_INTERRUPTED = 130  # Ctrl-C

# command -> (module, help); each module defines add_arguments(parser) and run(args) -> int | None
COMMANDS = {
    "train": ("salm.commands.train", "train the routing heads on frozen members"),
    "evaluate": ("salm.commands.evaluate", "evaluate the ensemble against each member"),
    "generate": ("salm.commands.generate", "generate a routed answer, tokens coloured by member"),
    "quickstart": ("salm.commands.quickstart", "the whole pipeline offline on the small embedded default"),
    "knowledge": (
        "salm.commands.knowledge",
        "knowledge-split benchmark: does the router pick the member that knows?",
    ),
    "harness": ("salm.commands.harness", "the ensemble and each member through lm-evaluation-harness"),
    "serve": ("salm.commands.serve", "an OpenAI-compatible server with continuous batching and a playground page"),
    "finetune": ("salm.commands.finetune", "LoRA-train a specialist of a base model on your text or Q/A data"),
}


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Append ``(default: X)`` to every option's help that has a default and does not describe it already.

    argparse's ArgumentDefaultsHelpFormatter skips options without a help text and prints lists as
    Python lists; this covers every option and prints a list as it is typed.
    """
    for action in parser._actions:
        default = action.default
        if not action.option_strings or action.help == argparse.SUPPRESS or default is argparse.SUPPRESS:
            continue
        if default is None or isinstance(default, bool) or (isinstance(default, (list, tuple)) and not default):
            continue  # nothing to show, or a switch (its help says what it does)
        if "default" in (action.help or "").lower():
            continue
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        text = f"default: {shown}".replace("%", "%%")  # argparse %-formats help strings
        action.help = f"{action.help} ({text})" if action.help else text
    return parser


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported (``salm --help`` stays instant)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = argparse.ArgumentParser(prog="salm", description="Token-routed ensembles of frozen language models")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
            show_defaults(p)
        p.set_defaults(_module=module)
    return parser


def _version() -> str:
    from salm import __version__

    return f"salm {__version__}"


def setup_logging(verbose: bool = False) -> None:
    """saLM's messages on stderr, each once.

    ``huggingface_hub`` and ``datasets`` print through handlers of their own *and* pass every record on to
    the root logger, so with a root handler each of their warnings appeared twice; they keep only their own.
    Off a terminal (a log file, a pipe) the libraries' per-file download/loading bars are switched off.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    for name in ("huggingface_hub", "datasets"):
        logging.getLogger(name).propagate = False
    from salm.display import quiet_library_progress_bars, stream_is_terminal

    if not stream_is_terminal(sys.stderr):
        quiet_library_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    setup_logging(args.verbose)
    from salm.commands.common import UsageError
    from salm.data import DataFormatError, DatasetUnavailableError
    from salm.ensemble import WeightsError
    from salm.generation import GenerationError
    from salm.members import MemberError

    try:
        return int(importlib.import_module(args._module).run(args) or EXIT_OK)
    except (UsageError, MemberError, WeightsError, GenerationError, DataFormatError, DatasetUnavailableError) as e:
        print(f"salm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"salm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
