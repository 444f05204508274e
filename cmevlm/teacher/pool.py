"""Many teacher/judge requests at once: a Ray Data actor pool of TeacherClients sharing one
rate limiter, or the Gemini Batch API from the driver. Used by teach, prefer and evaluate.

A request is a plain dict `{item_id, system, text, mask (bytes | None), params}`; each actor
rebuilds it with the one payload builder (so the guard sees exactly what will be sent).
A result is `{item_id, value (JSON text | None), error, raw, input_tokens, output_tokens,
cost_usd, cached, requests}`; an error is for the stage to quarantine.
"""

from __future__ import annotations

import json

import pyarrow as pa

from cmevlm.config import LLMConfig, RunConfig
from cmevlm.errors import ConfigError
from cmevlm.storage import join
from cmevlm.teacher.client import TeacherClient, TeacherFailed
from cmevlm.teacher.payload import PrivacyViolation, build_payload

RESULT_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("value", pa.string()), ("error", pa.string()), ("raw", pa.string()),
    ("input_tokens", pa.int64()), ("output_tokens", pa.int64()), ("cost_usd", pa.float64()),
    ("cached", pa.bool_()), ("requests", pa.int64()),
])


def request(item_id: str, system: str, text: str, mask: bytes | None = None, facts: dict | None = None, **params) -> dict:
    """One request as a row for Ray Data; `facts` (what the text says, as data, for the offline
    backend) travel as JSON so every row has the same columns."""
    return {"item_id": item_id, "system": system, "text": text, "mask": mask, "params": params, "facts": json.dumps(facts or {})}


def _payload(req: dict, tcfg: LLMConfig):
    return build_payload(req["item_id"], req["system"], req["text"], req["mask"], tcfg.mask_size, req["params"],
                         json.loads(req.get("facts") or "{}"))


def result_row(item_id: str, outcome) -> dict:
    """An Answer, TeacherFailed or PrivacyViolation -> one result row."""
    out = {"item_id": item_id, "value": None, "error": None, "raw": None, "input_tokens": 0,
           "output_tokens": 0, "cost_usd": 0.0, "cached": False, "requests": 0}
    if isinstance(outcome, PrivacyViolation):
        out.update(error=f"privacy guard: {outcome}")
    elif isinstance(outcome, TeacherFailed):
        out.update(error=outcome.reason, raw=outcome.raw[:4000])
    else:
        out.update(value=outcome.text, input_tokens=outcome.input_tokens, output_tokens=outcome.output_tokens,
                   cost_usd=outcome.cost_usd, cached=outcome.cached, requests=outcome.requests)
    return out


def ask_one(client: TeacherClient, req: dict, schema) -> dict:
    try:
        outcome = client.ask(_payload(req, client.cfg), schema)
    except (TeacherFailed, PrivacyViolation) as e:
        outcome = e
    return result_row(req["item_id"], outcome)


class PoolWorker:
    """Callable class for `map_batches`: one TeacherClient per actor."""

    def __init__(self, cfg_json: str, section: str, schema, limiter=None):
        from cmevlm.teacher.limiter import ray_waiter

        cfg = RunConfig.model_validate_json(cfg_json)
        self.schema = schema
        self.client = TeacherClient(getattr(cfg, section), cfg.workdir, cfg.storage, wait=ray_waiter(limiter) if limiter else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [ask_one(self.client, req, self.schema) for req in batch.to_pylist()]
        self.client.audit.flush()
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def ask_all(cfg: RunConfig, section: str, requests: list[dict], schema) -> list[dict]:
    """Every request answered (or failed), in the order given. `section` names the config
    section of the LLM (`teacher` or `judge`)."""
    if not requests:
        return []
    tcfg: LLMConfig = getattr(cfg, section)
    if tcfg.batch:
        return _ask_batched(cfg, tcfg, requests, schema)
    from cmevlm.cluster import connect
    from cmevlm.teacher.limiter import RateLimiter

    ray = connect(cfg.ray)
    limiter = None  # the offline backend has no quota to respect
    if tcfg.backend != "offline":
        limiter = ray.remote(num_cpus=0)(RateLimiter).remote(tcfg.rpm, tcfg.tpm)
    blocks = max(1, min(len(requests) // tcfg.batch_size, 1000))
    rows = ray.data.from_items(requests, override_num_blocks=blocks).map_batches(
        PoolWorker,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "section": section, "schema": schema, "limiter": limiter},
        batch_size=tcfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(tcfg.concurrency, blocks)),
        num_cpus=tcfg.num_cpus_per_actor,
    ).take_all()
    by_id = {r["item_id"]: r for r in rows}
    return [by_id[r["item_id"]] for r in requests]


def _ask_batched(cfg: RunConfig, tcfg: LLMConfig, requests: list[dict], schema) -> list[dict]:
    """The Gemini Batch API from the driver: jobs of `batch_max_requests` requests."""
    if tcfg.backend != "gemini":
        raise ConfigError("batch mode needs backend=gemini")
    client = TeacherClient(tcfg, cfg.workdir, cfg.storage)
    results, n = [], tcfg.batch_max_requests
    for i in range(0, len(requests), n):
        chunk = requests[i:i + n]
        outcomes = client.ask_batch([_payload(r, tcfg) for r in chunk], schema, join(cfg.workdir, "teacher", "batches"))
        results += [result_row(r["item_id"], o) for r, o in zip(chunk, outcomes)]
        client.audit.flush()
    return results
