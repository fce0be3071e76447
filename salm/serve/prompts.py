"""Request text -> prompt token ids: the chat template (the tokenizer's, or saLM's plain one) and tokenizing.

These run on the server's tokenizer thread (:meth:`salm.serve.state.ServerState.off_loop`), never on the
event loop: a prompt of a million characters takes seconds to tokenize.
"""

from __future__ import annotations

from typing import Any

from salm.serve.errors import APIError
from salm.serve.protocol import ChatMessage

# saLM's own template for tokenizers without a chat template: the Question/Answer prompt the heads are
# trained on (salm.data.build_prompt) for user turns; earlier answers follow their question; a system
# message comes first, on its own.
PLAIN_USER, PLAIN_ASSISTANT = "Question: {content}\nAnswer:\n", "{content}\n\n"


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


def completion_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A completion request's prompt as token ids (the tokenizer adds its special tokens, as ``generate``)."""
    return tokenizer(_utf8(prompt, "prompt"))["input_ids"]


def chat_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """A chat request's messages as token ids, rendered by :func:`render_chat`."""
    try:
        text, templated = render_chat(tokenizer, messages)
    except ValueError as e:
        raise APIError(400, str(e), "invalid_request_error", "messages") from e
    return tokenizer(_utf8(text, "messages"), add_special_tokens=not templated)["input_ids"]


def _utf8(text: str, param: str) -> str:
    """``text`` if it is valid Unicode; JSON can carry lone surrogates (``"\\ud800"``) the tokenizer rejects."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400, f"{param} holds an unpaired surrogate at position {e.start}", "invalid_request_error", param
        ) from None
    return text
