"""Teacher/judge backends. Each turns a guarded `Payload` into a `Reply` (raw text + tokens).

Only `cmevlm.teacher.client.TeacherClient` calls them, after the privacy guard has passed.
Backends ask for JSON matching a pydantic schema; the client parses and validates.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from cmevlm.config import LLMConfig
from cmevlm.errors import ConfigError
from cmevlm.teacher.payload import Payload

RETRY_CODES = [408, 429, 500, 502, 503, 504]


# A reply's end, as every backend reports it: "stop" (done), "length" (the token limit was hit;
# thinking may have spent it), or "blocked:<REASON>" (a safety, recitation or prompt block:
# the same prompt would be blocked again, so it is never retried).
BLOCKS = {"SAFETY", "RECITATION", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY", "LANGUAGE"}


@dataclass(frozen=True)
class Reply:
    text: str
    input_tokens: int
    output_tokens: int
    thoughts_tokens: int = 0  # billed as output
    finish: str = "stop"


def request_limit(cfg: LLMConfig, answer_tokens: int) -> int:
    """The request's max_output_tokens: the answer's own limit plus what thinking may use."""
    from cmevlm.config import DEFAULT_THINKING_ALLOWANCE

    return answer_tokens + (cfg.thinking_budget if cfg.thinking_budget is not None else DEFAULT_THINKING_ALLOWANCE)


class TeacherAnswer(BaseModel):
    """What the teacher returns for one item."""

    answer: str


class Verdict(BaseModel):
    """The judge's pick among five answers (A-E) and the ground truth: ground truth may be
    accepted, never rejected; accepted and rejected differ."""

    accepted: Literal["A", "B", "C", "D", "E", "ground_truth"]
    rejected: Literal["A", "B", "C", "D", "E"]
    strict: bool = Field(True, description="False when the accepted answer is no better than the rejected one (a tie).")
    reason: str

    @model_validator(mode="after")
    def _differ(self):
        if self.accepted == self.rejected:
            raise ValueError("accepted and rejected must differ")
        return self


class JudgeScore(BaseModel):
    """The evaluation judge's scores of one answer against the ground truth (1-5 each)."""

    accuracy: int = Field(ge=1, le=5, description="Clinical/factual accuracy: identification, position, CME significance.")
    conciseness: int = Field(ge=1, le=5)
    reason: str


class GeminiBackend:
    """Gemini through the google-genai SDK, structured JSON output, SDK retries on 408/429/5xx."""

    name = "gemini"

    def __init__(self, cfg: LLMConfig):
        from google import genai
        from google.genai import types

        key = os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        if not key:
            raise ConfigError("teacher.backend=gemini needs GEMINI_API_KEY in the environment")
        self.cfg, self.types = cfg, types
        http = types.HttpOptions(
            base_url=cfg.base_url,
            api_version=cfg.api_version,
            timeout=int(cfg.timeout_s * 1000),  # milliseconds
            retry_options=types.HttpRetryOptions(
                attempts=cfg.http_attempts, initial_delay=cfg.backoff_s, max_delay=30.0, exp_base=2.0, jitter=0.5,
                http_status_codes=RETRY_CODES,
            ),
        )
        self.client = genai.Client(api_key=key, http_options=http)

    def _contents(self, payload: Payload):
        t = self.types
        parts = [
            t.Part.from_text(text=p.text) if p.kind == "text" else t.Part.from_bytes(data=p.data, mime_type="image/png")
            for p in payload.parts
        ]
        return [t.Content(role="user", parts=parts)]

    def _config(self, payload: Payload, schema: type[BaseModel]):
        t = self.types
        thinking = t.ThinkingConfig(thinking_budget=self.cfg.thinking_budget) if self.cfg.thinking_budget is not None else None
        return t.GenerateContentConfig(
            system_instruction=payload.system,
            temperature=payload.params.get("temperature", self.cfg.temperature),
            max_output_tokens=request_limit(self.cfg, payload.params.get("max_output_tokens", self.cfg.max_output_tokens)),
            thinking_config=thinking,
            safety_settings=[t.SafetySetting(category=c, threshold=v) for c, v in self.cfg.safety_settings.items()],
            response_mime_type="application/json",
            response_schema=schema,
        )

    @staticmethod
    def _reply(resp) -> Reply:
        u = resp.usage_metadata
        block = getattr(getattr(resp, "prompt_feedback", None), "block_reason", None)
        cand = resp.candidates[0] if resp.candidates else None
        reason = getattr(getattr(cand, "finish_reason", None), "name", None) or "STOP"
        finish = f"blocked:{block.name}" if block else f"blocked:{reason}" if reason in BLOCKS else "length" if reason == "MAX_TOKENS" else "stop"
        try:
            text = resp.text or ""
        except ValueError:  # no text part (a block)
            text = ""
        return Reply(text, (u.prompt_token_count or 0) if u else 0, (u.candidates_token_count or 0) if u else 0,
                     (u.thoughts_token_count or 0) if u else 0, finish)

    def send(self, payload: Payload, schema: type[BaseModel]) -> Reply:
        resp = self.client.models.generate_content(
            model=self.cfg.model, contents=self._contents(payload), config=self._config(payload, schema))
        return self._reply(resp)

    # -- Batch API (half price; a job may take hours) -------------------------------------------

    def submit_batch(self, payloads: list[Payload], schema: type[BaseModel], name: str) -> str:
        """Create one batch job of inline requests; returns the job's name."""
        t = self.types
        src = [t.InlinedRequest(model=self.cfg.model, contents=self._contents(p), config=self._config(p, schema),
                                metadata={"item_id": p.item_id}) for p in payloads]
        job = self.client.batches.create(model=self.cfg.model, src=src, config=t.CreateBatchJobConfig(display_name=name))
        return job.name

    def collect_batch(self, job_name: str, poll_s: float) -> list[Reply | None]:
        """Wait for a job; one Reply per request in submission order (None where it failed)."""
        import time

        done = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}
        job = self.client.batches.get(name=job_name)
        while job.state is None or job.state.name not in done:
            time.sleep(poll_s)
            job = self.client.batches.get(name=job_name)
        if job.state.name != "JOB_STATE_SUCCEEDED":
            raise RuntimeError(f"batch job {job_name} ended {job.state.name}")
        return [self._reply(r.response) if r.response is not None and not r.error else None for r in job.dest.inlined_responses]


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint (vLLM, TGI, Ollama) through the openai SDK."""

    name = "openai"

    def __init__(self, cfg: LLMConfig):
        from openai import OpenAI

        self.cfg = cfg
        self.client = OpenAI(
            api_key=os.environ.get("OPENAI_API_KEY", "not-needed"), base_url=cfg.base_url,
            timeout=cfg.timeout_s, max_retries=cfg.http_attempts - 1,
        )

    def send(self, payload: Payload, schema: type[BaseModel]) -> Reply:
        content = []
        for p in payload.parts:
            if p.kind == "text":
                content.append({"type": "text", "text": p.text})
            else:
                url = "data:image/png;base64," + base64.b64encode(p.data).decode()
                content.append({"type": "image_url", "image_url": {"url": url}})
        resp = self.client.chat.completions.create(
            model=self.cfg.model,
            messages=[{"role": "system", "content": payload.system}, {"role": "user", "content": content}],
            temperature=payload.params.get("temperature", self.cfg.temperature),
            max_tokens=payload.params.get("max_output_tokens", self.cfg.max_output_tokens),
            response_format={"type": "json_object"},
        )
        u, choice = resp.usage, resp.choices[0]
        finish = {"length": "length", "content_filter": "blocked:CONTENT_FILTER"}.get(choice.finish_reason or "stop", "stop")
        return Reply(choice.message.content or "", u.prompt_tokens if u else 0, u.completion_tokens if u else 0, 0, finish)


class OfflineBackend:
    """The deterministic knowledge-base teacher and rubric judge: no network. It answers from
    the payload's facts (cmevlm/teacher/offline.py) and `cmevlm/anatomy.yaml`."""

    name = "offline"

    def __init__(self, cfg: LLMConfig):
        self.cfg = cfg

    def send(self, payload: Payload, schema: type[BaseModel]) -> Reply:
        from cmevlm.teacher import offline

        text = offline.respond(payload, schema)
        return Reply(text, len(payload.text.split()), len(text.split()))


def make_backend(cfg: LLMConfig):
    return {"gemini": GeminiBackend, "openai": OpenAIBackend, "offline": OfflineBackend}[cfg.backend](cfg)
