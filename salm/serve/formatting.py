"""Engine events -> OpenAI response objects: whole responses, streamed chunks (Server-Sent Events) and usage."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from salm.serve.engine import FinishEvent, TokenEvent

# OpenAI's finish reasons: an EOS token or a stop string is "stop", running out of tokens or context "length".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def sse(obj: dict) -> str:
    """``obj`` as one Server-Sent Event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Formatter:
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
