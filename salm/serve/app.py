"""The HTTP layer, assembled: the routes (:mod:`salm.serve.info`, :mod:`salm.serve.completions`), the door
of the API (:mod:`salm.serve.guard`: key, then body size), OpenAI-style errors (:mod:`salm.serve.errors`)
and the engine's lifetime. Shared state lives in one :class:`~salm.serve.state.ServerState` on ``app.state``."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from salm.serve import completions, info
from salm.serve.engine import Engine
from salm.serve.errors import InternalErrors, install_error_handlers
from salm.serve.guard import RequestGuard
from salm.serve.settings import ServeSettings
from salm.serve.state import ServerState


def dispatch_to(loop: asyncio.AbstractEventLoop):
    """An :class:`Engine` ``dispatch`` delivering a whole step's events to ``loop`` in one wake-up."""

    def deliver(items) -> None:
        for sink, event in items:
            sink(event)

    return lambda items: loop.call_soon_threadsafe(deliver, items)


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``, which is started with the app (its events go to the app's event
    loop, see :func:`dispatch_to`) and shut down with it."""
    state = ServerState(engine, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start(dispatch_to(asyncio.get_running_loop()))
        try:
            yield
        finally:
            # uvicorn has already waited (up to its grace period) for in-flight responses; cancel what is left.
            await asyncio.to_thread(engine.shutdown, 0.0)
            state.close()

    app = FastAPI(title="saLM", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.salm = state
    install_error_handlers(app)
    # Added last = outermost: a bug anywhere (the guard included) is answered by InternalErrors.
    app.add_middleware(RequestGuard, settings=state.settings)
    app.add_middleware(InternalErrors)
    app.include_router(info.router)
    app.include_router(completions.router)
    return app
