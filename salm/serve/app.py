"""The HTTP layer: translates OpenAI-style requests into :class:`~salm.serve.engine.Engine` calls and
engine events back into OpenAI responses and Server-Sent Events. No decoding logic lives here."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import asdict
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from salm.generation import GenerationError
from salm.serve.engine import (
    Engine,
    EngineStopped,
    ErrorEvent,
    FinishEvent,
    QueueFullError,
    SamplingParams,
    TokenEvent,
)
from salm.serve.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, error_response

log = logging.getLogger(__name__)

# OpenAI's finish reasons: an EOS token or a stop string is "stop", running out of tokens or context "length".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
# saLM's own template for tokenizers without a chat template: the Question/Answer prompt the heads are
# trained on (salm.data.build_prompt) for user turns; earlier answers follow their question; a system
# message comes first, on its own.
PLAIN_USER, PLAIN_ASSISTANT = "Question: {content}\nAnswer:\n", "{content}\n\n"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def render_chat(tokenizer: Any, messages: list[ChatMessage]) -> tuple[str, bool]:
    """The prompt text for ``messages`` and whether it already holds the special tokens: the tokenizer's
    chat template when it has one, otherwise the plain Question/Answer template (see PLAIN_USER)."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True), True
    parts = []
    for t in turns:
        if t["role"] == "system":
            parts.append(t["content"] + "\n\n")
        elif t["role"] == "user":
            parts.append(PLAIN_USER.format(content=t["content"]))
        else:
            parts.append(PLAIN_ASSISTANT.format(content=t["content"]))
    return "".join(parts), False


def dispatch_to(loop: asyncio.AbstractEventLoop):
    """An :class:`Engine` ``dispatch`` delivering a whole step's events to ``loop`` in one wake-up."""

    def deliver(items) -> None:
        for sink, event in items:
            sink(event)

    return lambda items: loop.call_soon_threadsafe(deliver, items)


def create_app(engine: Engine, model_name: str = "salm", api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``, which is started with the app (its events go to the app's event
    loop, see :func:`dispatch_to`) and shut down with it."""
    model = engine.model
    member_names = {f"{model_name}/member:{mid}": mid for mid in model.model_ids}
    created = int(time.time())

    async def lifespan(_app: FastAPI):
        engine.start(dispatch_to(asyncio.get_running_loop()))
        yield
        # uvicorn has already waited (up to its grace period) for in-flight responses; cancel what is left.
        await asyncio.to_thread(engine.shutdown, 0.0)

    app = FastAPI(title="saLM", lifespan=lifespan, docs_url=None, redoc_url=None)

    # ------------------------------------------------------------------ errors, OpenAI-style
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError):
        return JSONResponse(error_response(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            where = f" at character {loc[0]}" if loc else ""
            message = f"the request body is not valid JSON{where}: {err.get('ctx', {}).get('error', err.get('msg'))}"
            param = None
        elif err.get("type") == "missing":
            message = f"missing required field {param!r}"
        else:
            message = f"invalid {param!r}: {err.get('msg')}".replace("Value error, ", "")
        return JSONResponse(error_response(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, e: StarletteHTTPException):
        return JSONResponse(error_response(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, e: Exception):
        log.exception("internal error")
        return JSONResponse(error_response(f"internal error: {type(e).__name__}: {e}", "server_error"), 500)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                "invalid_request_error",
                code="invalid_api_key",
            )

    # ------------------------------------------------------------------ endpoints
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return resources.files("salm.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "members": model.model_ids, **engine.stats()}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        entry = {"object": "model", "created": created, "owned_by": "salm"}
        data = [dict(entry, id=model_name, members=model.model_ids)]
        data += [dict(entry, id=name, member=mid) for name, mid in member_names.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        ids = model.tokenizer(_utf8(body.prompt, "prompt"))["input_ids"]
        return await _generate(request, body, ids, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            text, templated = render_chat(model.tokenizer, body.messages)
        except ValueError as e:
            raise APIError(400, str(e), "invalid_request_error", "messages") from e
        ids = model.tokenizer(_utf8(text, "messages"), add_special_tokens=not templated)["input_ids"]
        return await _generate(request, body, ids, chat=True)

    # ------------------------------------------------------------------ the bridge to the engine
    def _params(body: CompletionRequest | ChatCompletionRequest, n_prompt: int, chat: bool) -> SamplingParams:
        routing = body.routing
        if body.model in member_names:
            routing = f"member:{member_names[body.model]}"
        elif body.model != model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server has {[model_name, *member_names]}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        max_tokens = body.max_tokens or body.max_completion_tokens
        if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
            ctx = model.context_length
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

    async def _generate(request: Request, body, ids: list[int], chat: bool):
        params = _params(body, len(ids), chat)
        queue: asyncio.Queue = asyncio.Queue()
        try:
            handle = engine.submit(ids, params, queue.put_nowait)  # called on the loop thread: see dispatch
        except GenerationError as e:
            msg, code = str(e), None
            if msg.startswith("the prompt"):
                param, code = ("messages" if chat else "prompt"), "context_length_exceeded"
            else:
                param = "routing" if msg.startswith("routing") or "routing" in msg else msg.split()[0]
            raise APIError(400, msg, "invalid_request_error", param, code) from e
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from e
        except EngineStopped as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from e
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        fmt = _Formatter(rid, model_name if body.model == model_name else body.model, chat, body, model.model_ids)
        try:
            first = await _next_event(queue, request)
        except BaseException:
            handle.cancel()
            raise
        if first is None:  # the client left while waiting
            handle.cancel()
            return JSONResponse(error_response("client disconnected", "server_error"), status_code=499)
        if isinstance(first, ErrorEvent):
            raise APIError(500, f"generation failed: {first.message}", "server_error")
        if body.stream:
            return StreamingResponse(
                _stream(first, queue, handle, fmt, body.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        events = [first]
        try:
            while not isinstance(events[-1], (FinishEvent, ErrorEvent)):
                ev = await _next_event(queue, request)
                if ev is None:
                    handle.cancel()
                    return JSONResponse(error_response("client disconnected", "server_error"), status_code=499)
                events.append(ev)
        finally:
            handle.cancel()  # no-op when finished; frees the slot if this handler was cancelled
        if isinstance(events[-1], ErrorEvent):
            raise APIError(500, f"generation failed: {events[-1].message}", "server_error")
        return fmt.full(events)

    async def _stream(first, queue: asyncio.Queue, handle, fmt: _Formatter, include_usage: bool):
        try:
            if fmt.chat:
                yield _sse(fmt.chunk({"role": "assistant", "content": ""}, None, []))
            ev = first
            while True:
                if isinstance(ev, ErrorEvent):
                    yield _sse(error_response(f"generation failed: {ev.message}", "server_error"))
                    break
                if isinstance(ev, FinishEvent):
                    yield _sse(fmt.chunk({} if fmt.chat else "", FINISH_REASONS.get(ev.finish_reason), []))
                    if include_usage:
                        yield _sse(fmt.usage_chunk(ev))
                    break
                yield _sse(fmt.chunk({"content": ev.text} if fmt.chat else ev.text, None, [ev]))
                ev = await queue.get()
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the server stops): the request leaves the batch at the next step
            handle.cancel()

    return app


def _utf8(text: str, param: str) -> str:
    """``text`` if it is valid Unicode; JSON can carry lone surrogates (``"\\ud800"``) the tokenizer rejects."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400, f"{param} holds an unpaired surrogate at position {e.start}", "invalid_request_error", param
        ) from None
    return text


async def _next_event(queue: asyncio.Queue, request: Request, poll: float = 0.25):
    """The request's next engine event, or None once its client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), poll)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Formatter:
    """Engine events -> OpenAI response objects (one request)."""

    def __init__(self, rid: str, model: str, chat: bool, body, model_ids: list[str]):
        self.rid, self.model, self.chat, self.body = rid, model, chat, body
        self.created = int(time.time())
        self.model_ids = model_ids

    def _head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, events: list[TokenEvent]) -> dict | None:
        toks = [e for e in events if e.decision is not None and e.logprob is not None]
        if not toks:
            return None
        if self.chat:
            return {
                "content": [
                    {
                        "token": e.decision.token,
                        "logprob": e.logprob,
                        "bytes": list(e.decision.token.encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": v, "bytes": list(t.encode())}
                            for t, v in (e.top_logprobs or {}).items()
                        ],
                    }
                    for e in toks
                ]
            }
        offsets, pos = [], 0
        for e in toks:
            offsets.append(pos)
            pos += len(e.decision.token)
        return {
            "tokens": [e.decision.token for e in toks],
            "token_logprobs": [e.logprob for e in toks],
            "top_logprobs": [e.top_logprobs or {} for e in toks],
            "text_offset": offsets,
        }

    def _attribution(self, events: list[TokenEvent]) -> dict:
        if not self.body.attribution:
            return {}
        return {"attribution": [asdict(e.decision) for e in events if e.decision is not None]}

    def chunk(self, delta: dict | str, finish_reason: str | None, events: list[TokenEvent]) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        choice["logprobs"] = self._logprobs(events)
        choice["finish_reason"] = finish_reason
        choice.update(self._attribution(events))
        return dict(self._head("chat.completion.chunk" if self.chat else "text_completion"), choices=[choice])

    def usage_chunk(self, fin: FinishEvent) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return dict(self._head(obj), choices=[], usage=_usage(fin))

    def full(self, events: list) -> dict:
        fin: FinishEvent = events[-1]
        toks = [e for e in events if isinstance(e, TokenEvent)]
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": fin.text}
        else:
            choice["text"] = fin.text
        choice["logprobs"] = self._logprobs(toks)
        choice["finish_reason"] = FINISH_REASONS.get(fin.finish_reason, fin.finish_reason)
        choice.update(self._attribution(toks))
        return dict(
            self._head("chat.completion" if self.chat else "text_completion"), choices=[choice], usage=_usage(fin)
        )


def _usage(fin: FinishEvent) -> dict:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }
