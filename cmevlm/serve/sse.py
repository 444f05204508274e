"""Server-sent events in the OpenAI streaming shape, fed by the tokens of a running batch.

For each choice: a role chunk, then a content chunk per piece as the model generates it, then
a chunk with its finish_reason; with `stream_options.include_usage`, a last chunk with the
usage and no choices (with `continuous_usage_stats`, every chunk also carries the usage so
far, as vLLM's server does); then `data: [DONE]`. With stop strings, the last characters that
could begin one are held back until they cannot, so no part of a stop string is ever sent. If
the generation fails, an error event takes the place of the remaining chunks (the status line
was sent already).
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable

from cmevlm.model.streaming import cut_at_stop


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Held:
    """One choice's text not yet sent: everything but what could still begin a stop string."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop, self.keep, self.pending, self.ended = stop, max((len(x) for x in stop), default=1) - 1, "", False

    def add(self, piece: str) -> str:
        if self.ended:
            return ""
        self.pending += piece
        text, self.ended = cut_at_stop(self.pending, self.stop)
        if self.ended:
            self.pending = ""
            return text
        cut = len(self.pending) - self.keep
        out, self.pending = self.pending[:max(cut, 0)], self.pending[max(cut, 0):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.ended else self.pending), ""
        return out


async def sse_chunks(rid: str, created: int, model: str, n: int, queue: asyncio.Queue, task: asyncio.Future,
                     include_usage: bool, on_first: Callable[[], None], stop: tuple[str, ...] = (), continuous: bool = False,
                     prompt_tokens: int = 0):
    """Forward (choice, piece) items from `queue` (piece None: that choice ended) until every
    choice ended, then the finish chunks from `task`'s results."""
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    held, tokens = [_Held(stop) for _ in range(n)], 0  # tokens: pieces received (one per generated token)

    def chunk(i: int, delta: dict, finish=None) -> str:
        body = {**base, "choices": [{"index": i, "delta": delta, "finish_reason": finish}]}
        if continuous:
            body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
        return _event(body)

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    open_choices, first = set(range(n)), True
    while open_choices:
        i, piece = await queue.get()
        if first and piece is not None:
            on_first()
            first = False
        text = held[i].add(piece) if piece is not None else held[i].flush()
        if piece is None:
            open_choices.discard(i)
        else:
            tokens += 1
        if text:
            yield chunk(i, {"content": text})
    results = await task
    failed = next((r for r in results if isinstance(r, Exception)), None)
    if failed is not None:
        yield _event({"error": {"message": str(failed), "type": "server_error", "param": None, "code": None}})
        return
    for i, r in enumerate(results):
        yield chunk(i, {}, r[3])
    if include_usage:
        prompt, completion = results[0][2], sum(r[1] for r in results)
        yield _event({**base, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                        "total_tokens": prompt + completion}})
    yield "data: [DONE]\n\n"
