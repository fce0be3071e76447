"""The door of ``/v1/*``: the API key is checked from the headers before a byte of the body is read, and
the body is read under a size cap before anything parses it.

FastAPI reads and parses a route's body before the route's dependencies run, so a key check written as a
dependency would let an unauthenticated client make the server buffer and parse any body it sends. This
middleware runs first: a missing or wrong key is a 401 at once, a ``Content-Length`` over the cap is a 413
without reading the body, and a chunked body is cut off with a 413 as soon as it passes the cap. A body
that fits is handed on to the routes unchanged.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from salm.serve.errors import APIError
from salm.serve.settings import ServeSettings

GUARDED = "/v1/"  # the API; the playground page and /health stay open


class RequestGuard:
    """ASGI middleware: the API key, then the body size (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            self._check_key(headers)
            self._check_length(headers)
            body = await self._read_body(receive)
        except APIError as e:
            return await e.response()(scope, receive, send)
        if body is None:  # the client left while sending its body
            return
        replayed = False

        async def replay() -> Message:
            """The buffered body first, then the server's own messages (a disconnect)."""
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_key(self, headers: Headers) -> None:
        key = self.settings.api_key
        if key is None:
            return
        auth = headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                "invalid_request_error",
                code="invalid_api_key",
            )

    def _too_large(self, size: int | None) -> APIError:
        """413 for a body of ``size`` bytes (None: a chunked body, cut off at the cap)."""
        cap = self.settings.max_body_bytes
        return APIError(
            413,
            f"the request body is {f'{size} bytes, ' if size is not None else ''}over this server's limit of "
            f"{cap} bytes (salm serve --max_body_bytes)",
            "invalid_request_error",
            code="request_too_large",
            # the rest of the body is never read: the connection cannot carry another request
            headers={"Connection": "close"},
        )

    def _check_length(self, headers: Headers) -> None:
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            raise self._too_large(int(length))

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None when the client disconnected; a 413 once it passes the cap."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                raise self._too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
