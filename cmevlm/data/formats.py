"""The datasets' Parquet schemas, in TRL's conversational formats: what teach, prefer, sample
and the trainers exchange.

SFT rows: `images` (list of {bytes, path}: the Hugging Face `Image` storage layout, so
`datasets` decodes them to PIL) and `messages` (user [image + instruction] / assistant [answer]).
Preference rows: `images`, `prompt` (the user turn), `chosen` and `rejected` (assistant turns).
Both keep `item_id, procedure_id, site, structure, laterality, template_id`.
"""

from __future__ import annotations

import pyarrow as pa

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
CONTENT = pa.struct([("type", pa.string()), ("text", pa.string())])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(CONTENT))])
MESSAGES = pa.list_(MESSAGE)

ITEM_FIELDS = [("item_id", pa.string()), ("procedure_id", pa.string()), ("site", pa.string()), ("structure", pa.string()),
               ("laterality", pa.string()), ("phase", pa.string()), ("template_id", pa.string()), ("needs_review", pa.bool_())]

SFT_SCHEMA = pa.schema([("images", pa.list_(IMAGE)), ("messages", MESSAGES), *ITEM_FIELDS])
PREF_SCHEMA = pa.schema([("images", pa.list_(IMAGE)), ("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES),
                         *ITEM_FIELDS, ("judge_reason", pa.string())])

# The expert's review queues under `<workdir>/review/`: the flagged items as the teacher or the
# judge left them, before any review (the datasets change with the reviews; the queues do not).
_QUEUE_FIELDS = [("item_id", pa.string()), ("structure", pa.string()), ("laterality", pa.string()), ("phase", pa.string()),
                 ("prompt", pa.string()), ("image", pa.binary())]
ANSWER_QUEUE_SCHEMA = pa.schema([*_QUEUE_FIELDS, ("answer", pa.string())])
PREFERENCE_QUEUE_SCHEMA = pa.schema([*_QUEUE_FIELDS, ("chosen", pa.string()), ("rejected", pa.string()), ("judge_reason", pa.string())])


def user_turn(prompt: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": prompt}]}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def image(png: bytes) -> dict:
    return {"bytes": png, "path": None}


def prompt_text(messages: list[dict]) -> str:
    """The instruction of a user turn (the text part)."""
    return next(c["text"] for m in messages if m["role"] == "user" for c in m["content"] if c["type"] == "text")


def answer_text(messages: list[dict]) -> str:
    return next(c["text"] for m in messages if m["role"] == "assistant" for c in m["content"] if c["type"] == "text")
