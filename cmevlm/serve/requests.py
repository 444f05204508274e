"""Request checks of the serving endpoint: plain functions, no Ray, no HTTP.

Each raises `BadRequest(status, message)` for input a client must fix; the app answers it
with that status. The order is cheapest first: the body's size while it streams, its JSON and
types (cmevlm.serve.schemas), then counts (images per request, tokens), and only then any
decoding: an image's size is read from its header before its pixels, and a request is refused
before it can cost the replica memory or time. Images come only as base64 data (data URIs in
the OpenAI format): the server fetches nothing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import os
import time

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError

from cmevlm.config import RunConfig
from cmevlm.data.composite import fit_image
from cmevlm.errors import ConfigError
from cmevlm.serve.schemas import ChatRequest, CompletionRequest, ExplainRequest, Sampling, error_message

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
KEYS_ENV = "CMEVLM_API_KEYS"


class BadRequest(Exception):
    """A client error, answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# ---------------------------------------------------------------------------------------------
# Who may call


MIN_KEY_CHARS = 16


def serving_keys(cfg: RunConfig) -> list[str]:
    """serve.api_keys, else CMEVLM_API_KEYS (comma-separated, from a Secret on a cluster);
    a key shorter than MIN_KEY_CHARS refuses to start (it could be guessed)."""
    keys = cfg.serve.api_keys or [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    short = [k for k in keys if len(k) < MIN_KEY_CHARS]
    if short:
        raise ConfigError(f"{len(short)} API key(s) shorter than {MIN_KEY_CHARS} characters: use long random keys "
                          "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return keys


def check_bind(cfg: RunConfig) -> None:
    """A non-loopback bind without keys would serve patient images to anyone who can connect."""
    keys = serving_keys(cfg)  # also refuses short keys, before anything starts
    if cfg.serve.host not in LOOPBACK and not keys:
        raise ConfigError(f"serve.host={cfg.serve.host} accepts connections from other machines: set API keys "
                          f"(serve.api_keys or {KEYS_ENV}) or bind 127.0.0.1")


def check_key(header: str | None, keys: list[str]) -> None:
    """401 unless the bearer token is one of `keys` (constant-time comparison with each)."""
    if not keys:
        return
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""  # the scheme is case-insensitive (RFC 7235)
    ok = False
    for k in keys:  # every key compared, so the time does not tell which one nearly matched
        ok |= hmac.compare_digest(token.encode(), k.encode())
    if not ok:
        raise BadRequest(401, "missing or invalid API key (Authorization: Bearer <key>)")


# ---------------------------------------------------------------------------------------------
# The body


async def read_body(request, limit: int) -> bytes:
    """The request body, counted as it streams (chunked too): past `limit` (or a declared
    Content-Length past it) nothing more is kept and the answer is a 413. Before answering, up
    to 8 x `limit` more bytes are read and dropped (stopping at the first half-second without
    data), so that a client that writes its whole body before reading (most HTTP libraries)
    reads the 413 instead of a reset connection; memory stays bounded by `limit` either way."""
    declared = request.headers.get("content-length")
    too_big = declared is not None and (not declared.isdigit() or int(declared) > limit)
    stream, chunks, n = request.stream(), [], 0
    while not too_big:
        try:
            chunk = await stream.__anext__()
        except StopAsyncIteration:
            return b"".join(chunks)
        n += len(chunk)
        too_big = n > limit
        chunks.append(chunk)
    chunks.clear()
    await _drain(stream, 8 * limit)
    raise BadRequest(413, f"request body exceeds {limit} bytes" if declared is None else f"request body of {declared} bytes exceeds {limit}")


async def _drain(stream, most: int, idle_s: float = 0.5, total_s: float = 5.0) -> None:
    import asyncio

    from starlette.requests import ClientDisconnect

    end, dropped = time.monotonic() + total_s, 0
    try:
        while dropped < most and time.monotonic() < end:
            dropped += len(await asyncio.wait_for(stream.__anext__(), timeout=idle_s))
    except (StopAsyncIteration, asyncio.TimeoutError, ClientDisconnect):
        pass


def parse(model: type[BaseModel], raw: bytes):
    """The typed request, or 400 naming the fields (invalid JSON, non-UTF-8 and absurd nesting
    included: pydantic's parser refuses them without recursing in Python)."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise BadRequest(400, f"body is not valid JSON: {e.errors()[0]['msg']}") from None
        loc = e.errors()[0]["loc"] if e.errors() else ()
        raise BadRequest(400, error_message(e), param=".".join(str(x) for x in loc) or None) from None


GREEDY_BELOW = 1e-5  # a temperature below it decodes greedily (as vLLM's _SAMPLING_EPS)
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


def sampling_defaults(generation_config: dict | None) -> dict:
    """A request's sampling defaults: the served model's generation_config.json where it sets
    them (vLLM does the same), else OpenAI's; greedy when the file says do_sample: false."""
    g = generation_config or {}
    out = {k: g.get(k, v) for k, v in OPENAI_DEFAULTS.items()}
    if g.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def not_supported(req: Sampling) -> None:
    """What this server refuses rather than ignores: a client relying on it would be misled."""
    if getattr(req, "tools", None) or getattr(req, "tool_choice", None) not in (None, "none"):
        raise BadRequest(400, "tools and tool_choice are not supported: this model is not trained to call tools", param="tools")
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type != "text":
        raise BadRequest(400, f"response_format {fmt.type} is not supported by this server", param="response_format")
    if getattr(req, "logprobs", None) or getattr(req, "top_logprobs", None):
        raise BadRequest(400, "logprobs are not supported by this server", param="logprobs")
    if getattr(req, "echo", False):
        raise BadRequest(400, "echo is not supported by this server", param="echo")
    if isinstance(req, CompletionRequest) and req.stream:
        raise BadRequest(400, "stream is not supported on /v1/completions: use /v1/chat/completions", param="stream")


def generation_params(req: Sampling | ExplainRequest, cfg: RunConfig, defaults: dict | None = None) -> dict:
    s = cfg.serve
    max_tokens = req.max_tokens or getattr(req, "max_completion_tokens", None) or min(s.default_max_tokens, s.max_tokens_cap)
    if max_tokens > s.max_tokens_cap:
        raise BadRequest(400, f"max_tokens {max_tokens} exceeds the cap of {s.max_tokens_cap}", param="max_tokens")
    if not isinstance(req, Sampling):
        return {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "n": 1, "seed": None,
                "stop": (), "penalties": (0.0, 0.0), "ignore_eos": False, "stream": False, "include_usage": False, "continuous_usage": False}
    not_supported(req)
    d = {**OPENAI_DEFAULTS, **(defaults or {})}
    temperature = float(d["temperature"] if req.temperature is None else req.temperature)
    so = req.stream_options
    return {"max_tokens": max_tokens, "temperature": 0.0 if temperature < GREEDY_BELOW else temperature,
            "top_p": float(d["top_p"] if req.top_p is None else req.top_p), "top_k": max(0, d["top_k"] if req.top_k is None else req.top_k),
            "min_p": float(d["min_p"] if req.min_p is None else req.min_p), "n": req.n, "seed": req.seed,
            "stop": tuple([req.stop] if isinstance(req.stop, str) else req.stop or ()),
            "penalties": (float(req.frequency_penalty), float(req.presence_penalty)), "ignore_eos": req.ignore_eos,
            "stream": req.stream, "include_usage": bool(so and (so.include_usage or so.continuous_usage_stats)),
            "continuous_usage": bool(so and so.continuous_usage_stats)}


MAX_CHARS_PER_TOKEN = 16  # no real text averages more characters per token (Qwen2's merges are shorter)


def check_text_size(req: ChatRequest, cfg: RunConfig) -> None:
    """The text of a request, bounded in characters before anything is tokenized: more than
    serve.max_model_len x MAX_CHARS_PER_TOKEN characters cannot fit the context (a 10 MB system
    string is a 400 at once, not 40 s of tokenizer)."""
    chars = sum(len(m.content) if isinstance(m.content, str) else sum(len(getattr(p, "text", "")) for p in m.content or [])
                for m in req.messages)
    most = cfg.serve.max_model_len * MAX_CHARS_PER_TOKEN
    if chars > most:
        raise BadRequest(400, f"the messages hold {chars} characters: more than serve.max_model_len {cfg.serve.max_model_len} "
                              f"tokens can hold ({most})", param="messages")


def check_prompt_size(prompt: str, cfg: RunConfig) -> None:
    """/v1/completions' prompt, bounded in characters as check_text_size bounds a chat."""
    most = cfg.serve.max_model_len * MAX_CHARS_PER_TOKEN
    if len(prompt) > most:
        raise BadRequest(400, f"the prompt holds {len(prompt)} characters: more than serve.max_model_len "
                              f"{cfg.serve.max_model_len} tokens can hold ({most})", param="prompt")


def check_length(prompt_tokens: int, max_tokens: int, cfg: RunConfig) -> None:
    """The prompt and the answer must fit the model's context (as vLLM's max_model_len)."""
    if prompt_tokens + max_tokens > cfg.serve.max_model_len:
        raise BadRequest(400, f"the prompt has {prompt_tokens} tokens: with max_tokens {max_tokens} it exceeds "
                              f"serve.max_model_len {cfg.serve.max_model_len}")


# ---------------------------------------------------------------------------------------------
# Images


def decode_b64_image(data: str, max_pixels: int, what: str = "image") -> Image.Image:
    """base64 (or a data: URI) -> PIL image, checked against the pixel limit before decoding."""
    if data.startswith(("http://", "https://")):
        raise BadRequest(400, f"{what}: remote image URLs are refused; send the image as a base64 data URI")
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if ";base64" not in head:
            raise BadRequest(400, f"{what}: data URI must be base64")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, f"{what}: invalid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size
        if w * h > max_pixels:
            raise BadRequest(400, f"{what}: {w}x{h} exceeds the limit of {max_pixels} pixels")
        img.load()
    except BadRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRequest(400, f"{what}: not a readable image ({type(e).__name__})") from None
    return img


def chat_conversation(req: ChatRequest, cfg: RunConfig, geometry: tuple[int, str]) -> tuple[list[dict], list[Image.Image]]:
    """The conversation for the chat template and its images in order, decoded only once their
    number is known to be within serve.max_images_per_request, each brought to the square the
    model was trained on (`geometry`: side, pad|crop), so its image tokens are what the plan
    sized whatever the frame's size (serve.max_image_pixels only bounds decoding)."""
    parts = [p for m in req.messages if isinstance(m.content, list) for p in m.content]
    check_text_size(req, cfg)
    n_images = sum(p.type == "image_url" for p in parts)
    if n_images > cfg.serve.max_images_per_request:
        raise BadRequest(400, f"{n_images} images in one request; serve.max_images_per_request is {cfg.serve.max_images_per_request}")
    conv, images = [], []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if not isinstance(m.content, list):
            conv.append({"role": role, "content": [{"type": "text", "text": m.content or ""}]})
            continue
        content = []
        for j, part in enumerate(m.content):
            if part.type == "text":
                content.append({"type": "text", "text": part.text})
            else:
                img = decode_b64_image(part.image_url.url, cfg.serve.max_image_pixels, f"messages.{i}.content.{j}")
                images.append(fit_image(img, *geometry))
                content.append({"type": "image"})
        conv.append({"role": role, "content": content})
    return conv, images


def explain_inputs(req: ExplainRequest, cfg: RunConfig, geometry: tuple[int, str]) -> tuple[list[dict], Image.Image]:
    """/v1/explain: frame + mask -> the composite the model was trained on (its side and resize
    mode: `geometry`), and the question."""
    from cmevlm.data.composite import BadInput, build_composite, decode_mask
    from cmevlm.instructions import TEMPLATES

    frame = np.asarray(decode_b64_image(req.frame, cfg.serve.max_image_pixels, "frame").convert("RGB"))
    mask_img = decode_b64_image(req.mask, cfg.serve.max_image_pixels, "mask")
    buf = io.BytesIO()
    mask_img.convert("L").save(buf, format="PNG")  # any mode (CMYK, RGBA, 16-bit) as one channel
    try:
        mask = decode_mask(buf.getvalue(), frame.shape[:2], binarize_multivalue=True)
    except BadInput as e:
        raise BadRequest(400, f"mask: {e}") from None
    d = cfg.data
    comp, _ = build_composite(frame, mask, geometry[0], geometry[1], d.overlay_color, d.overlay_alpha)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": req.question or TEMPLATES[0].text}]}]
    return conv, Image.fromarray(comp)
