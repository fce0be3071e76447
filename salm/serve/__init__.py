"""``salm serve``: the ensemble behind an OpenAI-compatible HTTP API, with a playground page.

Only argparse is imported here, so ``salm --help`` stays instant; FastAPI, uvicorn and torch load when
the server starts (``pip install 'salm[serve]'``).
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from salm.cli import add_model_arguments

    add_model_arguments(parser)
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
        import uvicorn
    except ImportError as e:
        raise SystemExit(f"salm serve needs the serve extra: pip install 'salm[serve]' ({e})") from e
    from salm.cli import load_ensemble
    from salm.serve.app import create_app
    from salm.serve.engine import Engine

    model = load_ensemble(args, args.weights)
    engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue)
    app = create_app(engine, model_name=args.model_name, api_key=args.api_key)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_grace, log_level="info"
    )
    print(f"saLM serving {model.model_ids} as {args.model_name!r} at http://{args.host}:{args.port}/", flush=True)
    _Server(config).run()
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown (exit status 143); a server that stopped
        cleanly on request exits 0, as supervisors expect."""

        def handle_exit(self, sig, frame) -> None:
            import signal

            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)

    return Server


def _Server(config):  # noqa: N802 - a class made on first use, so uvicorn loads only when serving
    return _server_class()(config)
