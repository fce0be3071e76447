"""The seed's answer generator: ``python answer_generator.py "question" [--output answer_confidence.json]``.

Writes {question, answer, tokens: [{token, token_id, best_model, confidence_scores}]}, the seed's file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from salm.cli import setup_logging
from salm.commands.common import (
    UsageError,
    add_model_arguments,
    add_weights_argument,
    check_routing_members,
    ensemble_from_flags,
    utf8_text,
)
from salm.data import build_prompt
from salm.ensemble import WeightsError
from salm.generation import DecodeConfig, GenerationError
from salm.io import atomic_write_json
from salm.members import MemberError

DEFAULT_WEIGHTS = "./model_outputs/best_model_heads.pt"  # where `python src/train.py` puts the best heads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("question")
    p.add_argument("--output", default="answer_confidence.json")
    p.add_argument("--max-tokens", "--max_new_tokens", dest="max_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.7)
    add_weights_argument(
        p, "--weights-path", "--weights_path",
        help=f"trained heads (default: {DEFAULT_WEIGHTS} when it exists; a path given here must exist)",
    )  # fmt: skip
    p.add_argument("--routing", default="argmax")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, 0 <= seed < 2**63")
    add_model_arguments(p)
    args = p.parse_args(argv)
    setup_logging()  # as the salm command: off a terminal, no per-file loading bars in the log
    weights = args.weights or (DEFAULT_WEIGHTS if Path(DEFAULT_WEIGHTS).exists() else None)
    try:  # everything checkable is checked before the members load
        question = utf8_text(args.question, "the question")
        config = DecodeConfig(
            max_new_tokens=args.max_tokens, temperature=args.temperature, routing=args.routing, seed=args.seed
        ).validate()
        check_routing_members(config.routing, args.models, weights)
        if weights is None:
            print(f"warning: no trained heads at {DEFAULT_WEIGHTS}; routing with UNTRAINED heads", file=sys.stderr)
        model = ensemble_from_flags(args, weights)
        out = model.generate(build_prompt(question), config=config, return_outputs=True)
    except (UsageError, MemberError, WeightsError, GenerationError) as e:
        print(f"answer_generator: error: {e}", file=sys.stderr)
        return 2
    result = {
        "question": question,
        "answer": out.text,
        "tokens": [d.to_seed_dict() for d in out.decisions],
    }
    atomic_write_json(args.output, result)
    print(out.text)
    print(f"wrote {args.output} ({len(out.decisions)} tokens)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
