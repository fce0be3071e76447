"""``salm serve``: flags -> a loaded ensemble -> :func:`salm.serve.serve`."""

from __future__ import annotations

import argparse
import math
import sys

from salm.commands import common
from salm.serve.settings import DEFAULT_MAX_BODY_BYTES, ServeSettings

# The numeric flags' valid ranges, checked before any member loads: (is the value valid?, what it must be).
RANGES = {
    "port": (lambda v: 1 <= v <= 65535, "a TCP port, 1 to 65535"),
    "max_batch": (lambda v: v >= 1, ">= 1"),
    "max_queue": (lambda v: v >= 0, ">= 0"),
    "shutdown_grace": (lambda v: math.isfinite(v) and v >= 0, "a number of seconds >= 0"),
    "max_body_bytes": (lambda v: v >= 1, ">= 1"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument(
        "--weights", "--weights_path", dest="weights", required=True,
        help="trained heads (a saLM folder); without --models its config names the members",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on, 1 to 65535")
    parser.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--model_name", default="salm", help="the ensemble's id in /v1/models and requests")
    parser.add_argument("--max_batch", type=int, default=16, help="requests decoded together")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting beyond max_batch (then 429)")
    parser.add_argument(
        "--shutdown_grace", type=float, default=10.0,
        help="seconds in-flight requests may finish after SIGTERM before they are cancelled",
    )  # fmt: skip
    parser.add_argument(
        "--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted (then 413), read no further: enough for a prompt filling a 128k-token "
        "context, small enough that no client can make the server buffer and parse huge bodies",
    )  # fmt: skip


def check_flags(args: argparse.Namespace) -> str | None:
    """The first bad flag as a one-line message naming it, or None; needs nothing loaded."""
    for name, (ok, what) in RANGES.items():
        value = getattr(args, name)
        if not ok(value):
            return f"--{name} must be {what}, got {value}"
    if args.api_key == "":
        return "--api_key is empty; leave it out for an open server"
    if not args.model_name:
        return "--model_name is empty"
    return None


def run(args: argparse.Namespace) -> int:
    error = check_flags(args)
    if error:
        print(f"salm serve: error: {error}", file=sys.stderr)
        return 2
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f'salm serve needs the serve extra: pip install -e ".[serve]" ({e})') from e
    from salm.serve import serve

    settings = ServeSettings(model_name=args.model_name, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    model = common.ensemble_from_flags(args, args.weights)
    serve(
        model, host=args.host, port=args.port, settings=settings,
        max_batch=args.max_batch, max_queue=args.max_queue, shutdown_grace=args.shutdown_grace,
    )  # fmt: skip
    return 0
