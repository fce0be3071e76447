"""``salm serve``: flags -> a loaded ensemble -> :func:`salm.serve.serve`."""

from __future__ import annotations

import argparse

from salm.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument(
        "--weights", "--weights_path", dest="weights", required=True,
        help="trained heads (a saLM folder); without --models its config names the members",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--model_name", default="salm", help="the ensemble's id in /v1/models and requests")
    parser.add_argument("--max_batch", type=int, default=16, help="requests decoded together")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting beyond max_batch (then 429)")
    parser.add_argument(
        "--shutdown_grace", type=float, default=10.0,
        help="seconds in-flight requests may finish after SIGTERM before they are cancelled",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"salm serve needs the serve extra: pip install 'salm[serve]' ({e})") from e
    from salm.serve import serve

    model = common.ensemble_from_flags(args, args.weights)
    serve(
        model, host=args.host, port=args.port, model_name=args.model_name, api_key=args.api_key,
        max_batch=args.max_batch, max_queue=args.max_queue, shutdown_grace=args.shutdown_grace,
    )  # fmt: skip
    return 0
