"""``salm generate``: one routed answer, streamed to the terminal with each token coloured by its member."""

from __future__ import annotations

import argparse
import sys

from salm.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="+", help="the question or prompt text")
    common.add_model_arguments(parser)
    common.add_weights_argument(
        parser, "--weights_path", help="trained heads (without: untrained heads, with a warning)"
    )
    parser.add_argument("--max_new_tokens", "--max-tokens", dest="max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--routing", default="argmax", help="argmax | mixture | threshold:<p> | member:<id>")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed, 0 <= seed < 2**63")
    parser.add_argument(
        "--raw", action="store_true", help="send the prompt as is (default: the Question/Answer template)"
    )
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument(
        "--compile", action="store_true", help="static caches + torch.compile'd decode step (pays a warm-up first)"
    )


def decode_config(args: argparse.Namespace):
    """The :class:`salm.generation.DecodeConfig` the flags describe, checked (before any member loads)."""
    from salm.generation import DecodeConfig

    return DecodeConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        routing=args.routing, stop=args.stop, seed=args.seed, compile=args.compile,
    ).validate()  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from salm.data import build_prompt
    from salm.display import legend, member_shares, print_decisions, use_colour

    for i, word in enumerate(args.prompt):  # checked before the members load, like every flag
        common.utf8_text(word, "the prompt" if len(args.prompt) == 1 else f"prompt argument {i + 1}")
    config = decode_config(args)
    common.check_routing_members(config.routing, args.models, args.weights)
    model = common.ensemble_from_flags(args, args.weights)
    if not args.weights and not config.routing.startswith("member:"):
        common.warn_untrained_heads("salm generate")
    text = " ".join(args.prompt)
    prompt = text if args.raw else build_prompt(text)
    colour = use_colour(sys.stdout)
    print(legend(model.model_ids, colour), file=sys.stderr)
    tokens = model.stream(prompt, config=config)
    printed = print_decisions(tokens, model.model_ids, sys.stdout, colour)
    if not printed:
        print("(no tokens: the first token chosen was an end-of-sequence token)", file=sys.stderr)
    else:
        shares = member_shares(printed, model.model_ids)
        print(", ".join(f"{m} {v:.0%}" for m, v in shares.items()) + f" of {len(printed)} tokens", file=sys.stderr)
    if args.compile:
        common.print_warmups(model)
    return 0
