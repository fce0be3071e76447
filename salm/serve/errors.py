"""Every failure as an OpenAI error object: the exception the routes raise (:class:`APIError`), the handlers
turning FastAPI's own errors into it, and a last-resort middleware for bugs that keeps the connection usable."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from salm.serve.protocol import error_response

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
"""The ``Retry-After`` of a 429 (queue full), in seconds. The queue is full only until one running request
finishes, and with continuous batching a slot frees at the very next decode step after that: a second lets a
client come back soon without hammering the server (the openai client waits exactly this long per retry)."""


class APIError(Exception):
    """A failure answered with ``status`` and an OpenAI error object (``param`` names the field at fault)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = error_response(self.message, self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


async def _api_error(_request: Request, e: APIError) -> JSONResponse:
    return e.response()


async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
    """A body that is not JSON or does not fit the protocol: 400 naming the first field at fault."""
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


async def _http(_request: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_response(str(e.detail), "invalid_request_error"), status_code=e.status_code)


def install_error_handlers(app: FastAPI) -> None:
    """Answer the routes' :class:`APIError`, bad bodies and unknown paths/methods as OpenAI error objects."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)


class InternalErrors:
    """ASGI middleware: an unexpected exception becomes a 500 error object, and the connection stays open.

    Starlette's own last-resort handler re-raises after answering, so the server closes the connection and
    the client's next request on it fails; here the exception is logged and the request simply ends. An
    exception after the response began (mid-stream) still propagates: the server must cut that connection.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            if started:
                raise
            log.exception("internal error")
            response = APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()
            await response(scope, receive, send)
