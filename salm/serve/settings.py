"""The HTTP layer's settings (light: the CLI reads the defaults without loading FastAPI or torch)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
"""The default cap on a request body. The largest honest request is a prompt that fills the context: a
128k-token context is ~0.5 MB of English text, a few times that as JSON-escaped non-ASCII; 4 MiB holds it, and
bounds what any client (an unauthenticated one included) can make the server buffer and parse."""


@dataclass(frozen=True)
class ServeSettings:
    """The ensemble's model id, the API key ``/v1/*`` requires (None: open) and the largest request body
    accepted, in bytes (the engine's limits are the engine's own)."""

    model_name: str = "salm"
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name is empty")
        if self.api_key == "":
            raise ValueError("api_key is empty (None leaves the server open)")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
