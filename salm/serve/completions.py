"""``POST /v1/completions`` and ``/v1/chat/completions``: the bridge between an OpenAI request and the engine.

A request's prompt is tokenized off the event loop, submitted to the :class:`~salm.serve.engine.Engine`, and
its events come back through an ``asyncio.Queue``: collected into one response, or streamed as Server-Sent
Events. No decoding logic lives here. A client that leaves is noticed at once (a task waits for the
server's disconnect message; see :func:`_watch_disconnect`) and its request leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from salm.generation import GenerationError
from salm.serve.engine import (
    EngineStopped,
    ErrorEvent,
    Event,
    FinishEvent,
    QueueFullError,
    RequestHandle,
    SamplingParams,
)
from salm.serve.errors import RETRY_AFTER_S, APIError
from salm.serve.formatting import FINISH_REASONS, Formatter, sse
from salm.serve.prompts import chat_ids, completion_ids
from salm.serve.protocol import ChatCompletionRequest, CompletionRequest, error_response
from salm.serve.state import ServerState, get_state

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)):
    ids = await state.off_loop(completion_ids, state.model.tokenizer, body.prompt)
    return await _generate(state, request, body, ids, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state)):
    ids = await state.off_loop(chat_ids, state.model.tokenizer, body.messages)
    return await _generate(state, request, body, ids, chat=True)


def _params(state: ServerState, body: CompletionRequest | ChatCompletionRequest, n_prompt: int, chat: bool):
    """The request's :class:`SamplingParams`; a member's model id forces that member's routing."""
    routing = body.routing
    if body.model in state.member_names:
        routing = f"member:{state.member_names[body.model]}"
    elif body.model != state.model_name:
        raise APIError(
            404,
            f"the model {body.model!r} does not exist; this server has {[state.model_name, *state.member_names]}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    max_tokens = body.max_tokens or body.max_completion_tokens
    if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
        ctx = state.model.context_length
        max_tokens = 16 if not chat else max(1, (ctx - n_prompt) if ctx else 1024)
    if chat:
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=body.stop or [],
        seed=body.seed,
        routing=routing,
        logprobs=logprobs,
    )


def _submit(state: ServerState, ids: list[int], params: SamplingParams, sink: Callable, chat: bool) -> RequestHandle:
    """Queue the request in the engine; its refusals as OpenAI errors (a full queue: 429 with Retry-After)."""
    try:
        return state.engine.submit(ids, params, sink)  # called on the loop thread: see app.dispatch_to
    except GenerationError as e:
        msg, code = str(e), None
        if msg.startswith("the prompt"):
            param, code = ("messages" if chat else "prompt"), "context_length_exceeded"
        else:
            param = "routing" if msg.startswith("routing") or "routing" in msg else msg.split()[0]
        raise APIError(400, msg, "invalid_request_error", param, code) from e
    except QueueFullError as e:
        raise APIError(
            429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}
        ) from e
    except EngineStopped as e:
        raise APIError(503, str(e), "server_error", code="shutting_down") from e


async def _watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
    """Put None on ``queue`` when the client disconnects.

    The server reports a disconnect only as a message from ``receive()``. Polling for it once no event has
    come for a while misses the clients of every request that is decoding (a token arrives every step), so
    this task waits on ``receive()`` and wakes the handler the moment the connection drops.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(None)


def _gone() -> JSONResponse:
    return JSONResponse(error_response("client disconnected", "server_error"), status_code=499)


async def _generate(state: ServerState, request: Request, body, ids: list[int], chat: bool):
    """Run the request in the engine: one response, or a stream once its first event is there."""
    params = _params(state, body, len(ids), chat)
    queue: asyncio.Queue[Event | None] = asyncio.Queue()
    handle = _submit(state, ids, params, queue.put_nowait, chat)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    fmt = Formatter(rid, body.model, chat, body, state.model.model_ids)
    watcher = asyncio.create_task(_watch_disconnect(request, queue))
    streaming = False
    try:
        first = await queue.get()
        if first is None:  # the client left while waiting
            return _gone()
        if isinstance(first, ErrorEvent):
            raise APIError(500, f"generation failed: {first.message}", "server_error")
        if body.stream:
            streaming = True  # from here the stream owns the request (and Starlette watches the client)
            return StreamingResponse(
                _stream(first, queue, handle, fmt, body.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                background=BackgroundTask(handle.cancel),  # also when the stream never started
            )
        events = [first]
        while not isinstance(events[-1], (FinishEvent, ErrorEvent)):
            ev = await queue.get()
            if ev is None:
                return _gone()
            events.append(ev)
    finally:
        watcher.cancel()
        if not streaming:
            handle.cancel()  # no-op when finished; frees the slot when the client left or this handler failed
    if isinstance(events[-1], ErrorEvent):
        raise APIError(500, f"generation failed: {events[-1].message}", "server_error")
    return fmt.full(events)


async def _stream(first: Event, queue: asyncio.Queue, handle: RequestHandle, fmt: Formatter, include_usage: bool):
    """The request's events as Server-Sent Events, ending with ``[DONE]``."""
    try:
        if fmt.chat:
            yield sse(fmt.chunk({"role": "assistant", "content": ""}, None, []))
        ev = first
        while True:
            if ev is None:  # the client left (noticed just before the stream began)
                return
            if isinstance(ev, ErrorEvent):
                yield sse(error_response(f"generation failed: {ev.message}", "server_error"))
                break
            if isinstance(ev, FinishEvent):
                yield sse(fmt.chunk({} if fmt.chat else "", FINISH_REASONS.get(ev.finish_reason), []))
                if include_usage:
                    yield sse(fmt.usage_chunk(ev))
                break
            yield sse(fmt.chunk({"content": ev.text} if fmt.chat else ev.text, None, [ev]))
            ev = await queue.get()
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the server stops): the request leaves the batch at the next step
        handle.cancel()
