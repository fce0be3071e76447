"""``salm serve``: the ensemble behind an OpenAI-compatible HTTP API, with a playground page.

Nothing heavy is imported here; FastAPI, uvicorn and torch load when the server starts
(``pip install -e ".[serve]"`` from a clone). The command's flags live in :mod:`salm.commands.serve`.
"""

from __future__ import annotations

import logging
from typing import Any

from salm.serve.settings import ServeSettings

__all__ = ["ServeSettings", "serve"]

log = logging.getLogger(__name__)


def serve(
    model: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    shutdown_grace: float = 10.0,
) -> None:
    """Serve ``model`` (a loaded ensemble) until SIGINT/SIGTERM: the engine, the app, uvicorn.
    ``settings``: the HTTP layer's (model id, API key, body cap; see :class:`ServeSettings`)."""
    import uvicorn

    from salm.serve.app import create_app
    from salm.serve.engine import Engine

    settings = settings or ServeSettings()
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_grace, log_level="info")
    print(f"saLM serving {model.model_ids} as {settings.model_name!r} at http://{host}:{port}/", flush=True)
    _Server(config).run()


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
