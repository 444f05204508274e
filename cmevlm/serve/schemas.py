"""Typed requests of the serving endpoint, following the OpenAI chat schema where it applies.

Every field is strict (a string is not a number, `true` is not an integer, `"false"` is not a
boolean) and unknown fields are refused: a wrong request is a 400 that names the field, never a
500. Limits that depend on the deployment (max tokens, images per request, n) are checked
against `serve:` after parsing, in cmevlm.serve.requests.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_SEED = 2**63 - 1  # torch.manual_seed takes any 64-bit value; OpenAI's seed is an integer
MAX_N = 8  # choices per request (each is a generation)
MAX_MESSAGES = 64
MAX_TEXT = 32_000  # characters of one text part


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: StrictStr = Field(description="A base64 data URI (data:image/png;base64,...); remote URLs are refused.")
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr = Field(max_length=MAX_TEXT)


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, Annotated[list[Part], Field(min_length=1, max_length=16)]]
    name: StrictStr | None = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


Number = Union[StrictInt, StrictFloat]


class ChatRequest(_Strict):
    """POST /v1/chat/completions."""

    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(0.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None


class ExplainRequest(_Strict):
    """POST /v1/explain: the raw frame and the structure's mask; the server builds the composite."""

    frame: StrictStr = Field(description="The laparoscopic frame, base64 (or a data URI).")
    mask: StrictStr = Field(description="The structure's binary mask, base64 (or a data URI).")
    question: StrictStr | None = Field(None, max_length=2000)
    structure: StrictStr | None = Field(None, max_length=100, description="Echoed in the response.")
    laterality: Literal["left", "right"] | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)


def error_message(exc) -> str:
    """A pydantic ValidationError as one line naming each field: `messages.0.content: ...`."""
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)
