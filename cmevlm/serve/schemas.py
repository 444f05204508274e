"""Typed requests of the serving endpoint, following the OpenAI chat schema where it applies.

Every known field is strict (a string is not a number, `true` is not an integer, `"false"` is
not a boolean): a wrong request is a 400 that names the field, never a 500. Unknown fields are
ignored and logged once by name, as vLLM's OpenAI server does (clients send fields of newer API
versions). Limits that depend on the deployment (max tokens, images per request, n, the text
length) are checked against `serve:` after parsing, in cmevlm.serve.requests.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

MAX_SEED = 2**63 - 1  # torch.manual_seed takes any 64-bit value; OpenAI's seed is an integer
MAX_N = 8  # choices per request (each is a generation)
MAX_MESSAGES = 64
MAX_TEXT = 32_000  # characters of one text part


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Open(BaseModel):
    """A request object of OpenAI's schema: known fields strict, unknown ones kept aside
    (`model_extra`) to be logged and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)


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


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: Union[StrictStr, Annotated[list[Part], Field(min_length=1, max_length=16)], None]
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _content_only_empty_for_assistant(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: only an assistant message may have null content, not a {self.role} one")
        return self


class StreamOptions(_Open):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # usage in every chunk (vLLM's extension; guidellm sends it)


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]


Number = Union[StrictInt, StrictFloat]
Stop = Union[StrictStr, Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=256)]], Field(max_length=4)], None]


class Sampling(_Open):
    """What a chat and a legacy completion request share. Sampling defaults (None here) come
    from the served model's generation_config.json, else OpenAI's
    (cmevlm.serve.requests.generation_params)."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1, description="-1 or 0: no top-k filter (vLLM's extension).")
    min_p: Number | None = Field(None, ge=0, le=1)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    stop: Stop = None
    ignore_eos: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None


class ChatRequest(Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list | None = None
    tool_choice: Union[StrictStr, dict, None] = None
    store: StrictBool | None = None


class CompletionRequest(Sampling):
    """POST /v1/completions: OpenAI's legacy text completion, the prompt as it is (no chat
    template, no image)."""

    prompt: StrictStr = Field(min_length=1)  # an empty prompt leaves nothing to continue from
    max_tokens: StrictInt | None = Field(16, ge=1)  # OpenAI's legacy default
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=5)


class ExplainRequest(_Strict):
    """POST /v1/explain: the raw frame and the structure's mask; the server builds the composite."""

    frame: StrictStr = Field(description="The laparoscopic frame, base64 (or a data URI).")
    mask: StrictStr = Field(description="The structure's binary mask, base64 (or a data URI).")
    question: StrictStr | None = Field(None, max_length=2000)
    structure: StrictStr | None = Field(None, max_length=100, description="Echoed in the response.")
    laterality: Literal["left", "right"] | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)


def unknown_fields(req: BaseModel, prefix: str = "") -> list[str]:
    """The dotted names of the fields a request carried that this server does not know."""
    names = [prefix + k for k in (req.model_extra or {})]
    for k, v in req:
        for item in (v if isinstance(v, list) else [v]):
            if isinstance(item, _Open):
                names += unknown_fields(item, f"{prefix}{k}.")
    return sorted(set(names))


def error_message(exc) -> str:
    """A pydantic ValidationError as one line naming each field: `messages.0.content: ...`."""
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)
