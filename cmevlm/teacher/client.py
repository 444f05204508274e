"""TeacherClient: the only code that talks to a teacher or judge.

One call, `ask(payload, schema)`, does, in order: look the request up in the content-addressed
cache (a hit sends nothing and costs nothing); run the privacy guard; wait for the shared rate
limiter; send through the backend (the SDKs retry 408/429/5xx with backoff and jitter); write
one audit line; parse and validate the JSON, retrying malformed output up to
`teacher.max_attempts`; store the answer in the cache before returning it. An item that still
fails raises `TeacherFailed` with the last raw text, for the stage to quarantine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, replace

from pydantic import BaseModel, ValidationError

from cmevlm.config import LLMConfig, StorageConfig
from cmevlm.storage import Storage, is_s3, join
from cmevlm.teacher.backends import make_backend, request_limit
from cmevlm.teacher.payload import Payload, PrivacyViolation, StoredMasks, guard

log = logging.getLogger(__name__)


class TeacherFailed(RuntimeError):
    def __init__(self, reason: str, raw: str = ""):
        super().__init__(reason)
        self.reason, self.raw = reason, raw


class BudgetReached(RuntimeError):
    """The request was not sent: it could have passed `max_cost_usd`. Not a quarantine: a rerun
    with a higher cap sends it."""


@dataclass(frozen=True)
class Answer:
    value: BaseModel
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    cached: bool
    requests: int  # requests sent for it in this call (0 when cached)


def cache_key(backend: str, model: str, payload: Payload, schema: type[BaseModel]) -> str:
    """Everything that determines the answer: backend, model, prompts, mask, parameters."""
    ident = {
        "backend": backend, "model": model, "system": payload.system, "text": payload.text,
        "mask": hashlib.sha256(payload.mask).hexdigest() if payload.mask else None,
        "params": payload.params, "schema": schema.__name__,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


class AuditLog:
    """`teacher/audit.jsonl`, written ahead: before a request leaves, a `sent` record (item,
    backend, model, each part's kind, size and sha256: what leaves, never its content), fsynced;
    after it, an `outcome` record with the same request_id (tokens, cost, response hash, or the
    error). A process killed in between leaves a `sent` record without an outcome, so nothing
    that left the site is ever missing from the log. On object storage each record is its own
    object (Storage.append_text); `merge_audit` folds them into the file."""

    def __init__(self, storage: Storage, uri: str):
        self.storage, self.uri = storage, uri

    def sent(self, record: dict) -> str:
        rid = uuid.uuid4().hex
        self._append({"event": "sent", "request_id": rid, **record})
        return rid

    def outcome(self, rid: str, record: dict) -> None:
        self._append({"event": "outcome", "request_id": rid, **record})

    def _append(self, record: dict) -> None:
        self.storage.append_text(self.uri, json.dumps(record, sort_keys=True) + "\n", fsync=True)

    def flush(self) -> None:
        """Nothing is buffered (kept for the pool's end-of-batch call)."""


def merge_audit(storage: Storage, uri: str) -> int:
    """Fold the record objects of object storage into `uri`; returns the number of requests
    with an outcome."""
    parts = storage.list_files(uri + ".d") if is_s3(uri) else []
    text = storage.read_appended(uri)
    if parts:
        storage.write_text(uri, text)
        for p in parts:
            storage.delete(p)
    return sum(json.loads(line).get("event") == "outcome" for line in text.splitlines() if line.strip())


def input_tokens(payload: Payload) -> int:
    """A request's input tokens before it is sent: ~4 characters a token, 258 for a mask."""
    return len(payload.system + payload.text) // 4 + 258 * (payload.mask is not None)


def cache_entry(cache_uri: str, key: str) -> str:
    """Where the cached answer of `key` lives."""
    return join(cache_uri, key[:2], key + ".json")


class TeacherClient:
    def __init__(self, cfg: LLMConfig, workdir: str, storage: StorageConfig | None = None, wait=None, backend=None,
                 cache_dir: str = "teacher/cache", audit_file: str = "teacher/audit.jsonl", role: str = "teacher", budget=None,
                 stored_mask=None):
        self.cfg, self.role = cfg, role
        self.storage = Storage(storage)
        # The guard's only source for what a mask must be: the item's mask in the run's storage.
        self.stored_mask = stored_mask or StoredMasks(self.storage, join(workdir, "frames", "shards"))
        self.backend = backend or make_backend(cfg)
        self.cache_uri = join(workdir, cache_dir)
        self.audit = AuditLog(self.storage, join(workdir, audit_file))
        self.wait = wait or (lambda tokens: None)
        self.budget = budget  # a limiter.Budget (or its Ray proxy); None = no cap

    def _cost(self, tin: int, tout: int, batch: bool = False, thoughts: int = 0) -> float:
        """USD of one reply: thinking tokens are billed at the output price."""
        if self.backend.name == "offline":
            return 0.0
        discount = 0.5 if batch else 1.0  # the Batch API's price
        return discount * (tin * self.cfg.price_input_per_m + (tout + thoughts) * self.cfg.price_output_per_m) / 1e6

    def most_cost(self, payload: Payload, batch: bool = False) -> float:
        """The largest a request can cost: its input and every token its limit allows."""
        return self._cost(input_tokens(payload), request_limit(self.cfg, payload.params.get("max_output_tokens", self.cfg.max_output_tokens)), batch)

    def cached(self, key: str) -> dict | None:
        uri = cache_entry(self.cache_uri, key)
        return self.storage.read_json(uri) if self.storage.exists(uri) else None

    def _from_cache(self, key: str, schema: type[BaseModel]) -> Answer | None:
        hit = self.cached(key)
        if hit is None:
            return None
        return Answer(schema.model_validate_json(hit["text"]), hit["text"], hit["input_tokens"], hit["output_tokens"], hit["cost_usd"], True, 0)

    def _record(self, payload: Payload, attempt: int, **extra) -> dict:
        return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "item_id": payload.item_id, "role": self.role,
                "backend": self.backend.name, "model": self.cfg.model, "attempt": attempt,
                "parts": [p.describe() for p in payload.parts], **extra}

    def _accept(self, payload: Payload, schema: type[BaseModel], key: str, reply, record: dict, requests: int, rid: str) -> Answer | str:
        """Audit one reply; cache and return its Answer, or return why it is malformed."""
        cost = self._cost(reply.input_tokens, reply.output_tokens, batch="batch_job" in record, thoughts=reply.thoughts_tokens)
        self.audit.outcome(rid, {**record, "response_sha256": hashlib.sha256(reply.text.encode()).hexdigest(),
                                 "input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens,
                                 "thoughts_tokens": reply.thoughts_tokens, "finish": reply.finish, "cost_usd": round(cost, 8)})
        if reply.finish.startswith("blocked:"):
            return reply.finish
        if reply.finish == "length" and not reply.text.strip():
            return "length"
        try:
            value = schema.model_validate_json(_strip_fences(reply.text))
        except ValidationError as e:
            return f"malformed output: {e.errors()[0]['msg'] if e.errors() else e}"
        entry = {"key": key, "item_id": payload.item_id, "text": value.model_dump_json(), "input_tokens": reply.input_tokens,
                 "output_tokens": reply.output_tokens, "cost_usd": cost, "time": record["time"]}
        self.storage.write_json(cache_entry(self.cache_uri, key), entry)
        return Answer(value, entry["text"], reply.input_tokens, reply.output_tokens + reply.thoughts_tokens, cost, False, requests)

    def ask(self, payload: Payload, schema: type[BaseModel], key: str | None = None, lengthened: bool = False) -> Answer:
        """One guarded, audited, cached answer. `key`/`lengthened`: a batch reply asked again
        keeps its original cache key and its one doubled-limit retry."""
        key = key or cache_key(self.backend.name, self.cfg.model, payload, schema)
        hit = self._from_cache(key, schema)
        if hit is not None:
            return hit
        payload = guard(payload, self.cfg.mask_size, self.stored_mask)  # what may leave, re-encoded; PrivacyViolation: nothing is sent
        raw, last_error = "", ""
        for attempt in range(1, self.cfg.max_attempts + 1):
            reserved = 0.0  # a single request goes while the bill so far is under the cap
            if self.budget is not None and not self.budget.reserve(reserved):
                raise BudgetReached(f"{self.role}.max_cost_usd would be passed by this request")
            self.wait(len(payload.text) // 4 + 258 * (payload.mask is not None) + self.cfg.max_output_tokens)
            got, raw, billed = self._attempt(payload, schema, key, attempt)
            if self.budget is not None:
                self.budget.settle(reserved, billed)
            if isinstance(got, Answer):
                return got
            last_error = got
            if got.startswith("blocked:"):  # the same prompt would be blocked again: quarantined at once
                raise TeacherFailed(f"blocked by the model ({got[8:]}): not retried", raw)
            if got == "length" and lengthened:  # twice the room was not enough either: the same would happen again
                raise TeacherFailed("ran out of output tokens with twice the limit: not retried", raw)
            if got == "length":  # thinking or the answer ran out of tokens: once, with twice the room
                lengthened = True
                limit = payload.params.get("max_output_tokens", self.cfg.max_output_tokens)
                payload = replace(payload, params={**payload.params, "max_output_tokens": 2 * limit})
                continue
            self._backoff(attempt)
        raise TeacherFailed(f"teacher failed after {self.cfg.max_attempts} attempts: {last_error}", raw)

    def _attempt(self, payload: Payload, schema: type[BaseModel], key: str, attempt: int) -> tuple[Answer | str, str, float]:
        """One request, audited ahead: (the Answer or why not, the raw text, the USD billed)."""
        t0 = time.time()
        record = self._record(payload, attempt)
        rid = self.audit.sent(record)  # on disk before a byte leaves
        try:
            reply = self.backend.send(payload, schema)
        except Exception as e:  # transport failures the SDK's own retries did not cure
            error = f"{type(e).__name__}: {e}"[:500]
            self.audit.outcome(rid, {**record, "error": error, "seconds": round(time.time() - t0, 3)})
            return error, "", 0.0
        got = self._accept(payload, schema, key, reply, {**record, "seconds": round(time.time() - t0, 3)}, attempt, rid)
        return got, reply.text, self._cost(reply.input_tokens, reply.output_tokens, thoughts=reply.thoughts_tokens)

    def ask_batch(self, payloads: list[Payload], schema: type[BaseModel], jobs_uri: str) -> list:
        """Answers for many payloads through the backend's Batch API: one Answer, TeacherFailed
        or PrivacyViolation per payload. The job's name is stored under `jobs_uri` before
        waiting, so a rerun after a crash collects the job it already paid for instead of
        submitting it again. Malformed replies fall back to `ask` (normal requests)."""
        results: list = [None] * len(payloads)
        todo = []
        for i, p in enumerate(payloads):
            key = cache_key(self.backend.name, self.cfg.model, p, schema)
            hit = self._from_cache(key, schema)
            if hit is not None:
                results[i] = hit
                continue
            try:
                p = guard(p, self.cfg.mask_size, self.stored_mask)
            except PrivacyViolation as e:
                results[i] = e
                continue
            todo.append((i, p, key))
        if not todo:
            return results
        chunk = hashlib.sha256("".join(k for _, _, k in todo).encode()).hexdigest()[:20]
        record_uri = join(jobs_uri, chunk + ".json")
        if self.storage.exists(record_uri):
            job = self.storage.read_json(record_uri)["job"]
            log.info("batch job %s was submitted before; collecting it", job)
            rids = self.storage.read_json(record_uri).get("request_ids") or [uuid.uuid4().hex for _ in todo]
        else:  # every payload is audited as sent before the job is submitted
            reserved = sum(self.most_cost(p, batch=True) for _, p, _ in todo)
            if self.budget is not None and not self.budget.reserve(reserved):
                for i, _, _ in todo:
                    results[i] = BudgetReached(f"{self.role}.max_cost_usd would be passed by this batch")
                return results
            rids = [self.audit.sent(self._record(p, 1, batch=chunk)) for _, p, _ in todo]
            job = self.backend.submit_batch([p for _, p, _ in todo], schema, f"cmevlm-{chunk}")
            self.storage.write_json(record_uri, {"job": job, "items": [p.item_id for _, p, _ in todo], "request_ids": rids})
            if self.budget is not None:
                self.budget.settle(reserved, reserved)  # a batch is counted at its most (its bill comes hours later)
        replies = self.backend.collect_batch(job, self.cfg.batch_poll_s)
        for (i, p, key), reply, rid in zip(todo, replies, rids):
            results[i] = self._collected(p, schema, key, reply, job, rid)
        return results

    def _collected(self, p: Payload, schema, key: str, reply, job: str, rid: str):
        """One batch reply: its Answer; a block quarantined; anything else asked again as a
        normal request (twice the room when it ran out of tokens)."""
        got = self._accept(p, schema, key, reply, self._record(p, 1, batch_job=job), 1, rid) if reply is not None else "batch request failed"
        if isinstance(got, Answer):
            return got
        if got.startswith("blocked:"):
            return TeacherFailed(f"blocked by the model ({got[8:]}): not retried", reply.text if reply else "")
        if got == "length":
            limit = p.params.get("max_output_tokens", self.cfg.max_output_tokens)
            p = replace(p, params={**p.params, "max_output_tokens": 2 * limit})
        try:
            return self.ask(p, schema, key=key, lengthened=got == "length")
        except (TeacherFailed, PrivacyViolation, BudgetReached) as e:
            return e

    def _backoff(self, attempt: int) -> None:
        if attempt < self.cfg.max_attempts:
            delay = self.cfg.backoff_s * 2 ** (attempt - 1)
            time.sleep(delay * (0.5 + random.random()))


def _strip_fences(text: str) -> str:
    """Models sometimes wrap JSON in ``` fences; the content is still the answer."""
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else t
        t = t.rsplit("```", 1)[0]
    return t.strip()
