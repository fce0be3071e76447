"""The ``salm`` command: parses flags and hands them to the step modules. No logic lives here."""

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
    "train": ("salm.training", "train the routing heads on frozen members"),
    "evaluate": ("salm.evaluation.runner", "evaluate the ensemble against each member"),
    "generate": ("salm.cli", "generate a routed answer, tokens coloured by member"),
    "quickstart": ("salm.quickstart.run", "the whole pipeline offline on the small embedded default"),
    "knowledge": (
        "salm.quickstart.knowledge",
        "knowledge-split benchmark: does the router pick the member that knows?",
    ),
    "harness": ("salm.harness.command", "the ensemble and each member through lm-evaluation-harness"),
    "serve": ("salm.serve", "an OpenAI-compatible server with continuous batching and a playground page"),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every command that loads members shares."""
    g = parser.add_argument_group("members")
    g.add_argument("--models", default=None, help="member-set file (YAML/JSON); default: the Qwen2.5-1.5B trio")
    g.add_argument("--device", default=None, help="cuda, cpu or mps (default: best available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="members' dtype")
    g.add_argument("--trust_remote_code", action="store_true", help="allow members' custom code (off by default)")


def load_ensemble(args: argparse.Namespace, weights: str | None = None, **kwargs):
    """The ensemble the flags describe: fresh heads, or trained heads from ``weights``."""
    from salm.ensemble import MultiModelWithScalarHeads

    common = dict(device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if weights:
        return MultiModelWithScalarHeads.from_pretrained(weights_path=weights, base_models=args.models, **common)
    return MultiModelWithScalarHeads(args.models, **common, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``salm generate``."""
    parser.add_argument("prompt", nargs="+", help="the question or prompt text")
    add_model_arguments(parser)
    parser.add_argument("--weights", "--weights_path", dest="weights", default=None, help="trained heads")
    parser.add_argument("--max_new_tokens", "--max-tokens", dest="max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--routing", default="argmax", help="argmax | mixture | threshold:<p> | member:<id>")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--raw", action="store_true", help="send the prompt as is (default: the Question/Answer template)"
    )
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument(
        "--compile", action="store_true", help="static caches + torch.compile'd decode step (pays a warm-up first)"
    )


def run(args: argparse.Namespace) -> int:
    from salm.data import build_prompt
    from salm.display import legend, member_shares, print_decisions, use_colour
    from salm.generation import check_decoding

    check_decoding(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.routing, args.stop, args.seed)
    model = load_ensemble(args, args.weights)
    text = " ".join(args.prompt)
    prompt = text if args.raw else build_prompt(text)
    colour = use_colour(sys.stdout)
    print(legend(model.model_ids, colour), file=sys.stderr)
    tokens = model.stream(
        prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, routing=args.routing, seed=args.seed, stop=args.stop, compile=args.compile,
    )  # fmt: skip
    printed = print_decisions(tokens, model.model_ids, sys.stdout, colour)
    if not printed:
        print("(no tokens: the first token chosen was an end-of-sequence token)", file=sys.stderr)
    else:
        shares = member_shares(printed, model.model_ids)
        print(", ".join(f"{m} {v:.0%}" for m, v in shares.items()) + f" of {len(printed)} tokens", file=sys.stderr)
    if args.compile:
        print_warmups(model)
    return 0


def print_warmups(model) -> None:
    """What ``--compile`` cost up front: one line per compiled shape bucket."""
    from salm.fast_decode import warmup_report

    for w in warmup_report(model):
        print(
            f"compiled the decode step of {', '.join(w.members)} (batch {w.batch}, cache {w.cache_len}) "
            f"in {w.seconds:.1f}s",
            file=sys.stderr,
        )


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
    from salm.data import DataFormatError, DatasetUnavailableError
    from salm.ensemble import WeightsError
    from salm.generation import GenerationError
    from salm.members import MemberError

    try:
        return int(importlib.import_module(args._module).run(args) or EXIT_OK)
    except (MemberError, WeightsError, GenerationError, DataFormatError, DatasetUnavailableError) as e:
        print(f"salm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"salm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
