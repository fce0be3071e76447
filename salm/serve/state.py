"""What every route shares: the settings of one server and its engine, in one object on ``app.state.salm``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request

from salm.serve.engine import Engine
from salm.serve.settings import ServeSettings

T = TypeVar("T")


class ServerState:
    """One server's shared state: the engine and its model, the settings, the model ids it answers to, and
    the thread that tokenizes prompts (off the event loop: a long prompt takes seconds to tokenize, and
    the loop must keep answering ``/health`` and streaming tokens meanwhile)."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.model = engine.model
        self.model_name = settings.model_name
        self.member_names = {f"{settings.model_name}/member:{mid}": mid for mid in self.model.model_ids}
        self.created = int(time.time())
        # One thread: prompts are tokenized one at a time, in arrival order, as they were on the loop.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="salm-tokenize")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the tokenizer thread, awaited without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)


def get_state(request: Request) -> ServerState:
    """The routes' dependency: this app's :class:`ServerState`."""
    return request.app.state.salm
