"""Streaming: one prompt's tokens as they are made, for CLIs, notebooks and anything that shows text as it grows.

:func:`stream` runs :func:`salm.generation.generate` on a worker thread that feeds a bounded queue; the
caller iterates over the tokens. Leaving the loop early cancels the worker at its next token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from salm.generation import FROM_CONFIG, DecodeConfig, TokenDecision, generate


class _Cancelled(Exception):
    """Raised inside the streaming worker when the consumer stopped iterating."""


def stream(
    model,
    prompt: str,
    *,
    config: DecodeConfig | None = None,
    max_new_tokens: int = FROM_CONFIG,
    temperature: float = FROM_CONFIG,
    top_p: float = FROM_CONFIG,
    top_k: int = FROM_CONFIG,
    routing: str = FROM_CONFIG,
    stop: str | Sequence[str] | None = FROM_CONFIG,
    seed: int | None = FROM_CONFIG,
    truncate: str | None = FROM_CONFIG,
    cache_implementation: str = FROM_CONFIG,
    compile: bool = FROM_CONFIG,
    use_cache: bool = True,
) -> Iterator[TokenDecision]:
    """Iterate over the tokens of one prompt as they are generated (for CLIs and notebooks).

    The settings are :func:`generate`'s (``config``, each given one overriding it). Decoding runs on a
    daemon worker thread feeding a bounded queue, so the caller sees each token as soon as it exists; an
    exception in the worker is re-raised here. Leaving the loop early (``break``, or closing the iterator)
    cancels the worker at its next token.
    """
    kwargs = dict(
        config=config, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        routing=routing, stop=stop, seed=seed, truncate=truncate, cache_implementation=cache_implementation,
        compile=compile, use_cache=use_cache,
    )  # fmt: skip
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=64)
    sentinel = object()
    error: list[BaseException] = []
    cancel = threading.Event()

    def put(item: object) -> bool:
        """Queue ``item`` unless the consumer has gone; False when it has."""
        while not cancel.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def push(_row: int, decision: TokenDecision) -> None:
        if not put(decision):
            raise _Cancelled

    def work() -> None:
        try:
            generate(model, prompt, streamer=push, **kwargs)
        except _Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised on the consumer's thread
            error.append(e)
        finally:
            put(sentinel)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                break
            yield item
    finally:
        cancel.set()
        th.join()
    if error:
        raise error[0]
