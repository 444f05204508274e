"""Server-sent events in the OpenAI streaming shape, fed by the tokens of a running batch.

For each choice: a role chunk, then a content chunk per piece as the model generates it, then
a chunk with its finish_reason; with `stream_options.include_usage`, a last chunk with the
usage and no choices; then `data: [DONE]`. If the generation fails, an error event takes the
place of the remaining chunks (the status line was sent already).
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def sse_chunks(rid: str, created: int, model: str, n: int, queue: asyncio.Queue, task: asyncio.Future,
                     include_usage: bool, on_first: Callable[[], None], max_tokens: int):
    """Forward (choice, piece) items from `queue` (piece None: that choice ended) until every
    choice ended, then the finish chunks from `task`'s results."""
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    for i in range(n):
        yield _event({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    open_choices, first = set(range(n)), True
    while open_choices:
        i, piece = await queue.get()
        if piece is None:
            open_choices.discard(i)
            continue
        if first:
            on_first()
            first = False
        yield _event({**base, "choices": [{"index": i, "delta": {"content": piece}, "finish_reason": None}]})
    results = await task
    failed = next((r for r in results if isinstance(r, Exception)), None)
    if failed is not None:
        yield _event({"error": {"message": str(failed), "type": "server_error", "code": 500}})
        return
    for i, (_, tokens, _) in enumerate(results):
        yield _event({**base, "choices": [{"index": i, "delta": {}, "finish_reason": "length" if tokens >= max_tokens else "stop"}]})
    if include_usage:
        prompt, completion = results[0][2], sum(r[1] for r in results)
        yield _event({**base, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                        "total_tokens": prompt + completion}})
    yield "data: [DONE]\n\n"
