"""Many teacher/judge requests at once: a Ray Data actor pool of TeacherClients sharing one
rate limiter, or the Gemini Batch API from the driver. Used by teach, prefer and evaluate.

A request is a plain dict `{item_id, system, text, mask (bytes | None), params}`; each actor
rebuilds it with the one payload builder (so the guard sees exactly what will be sent).
A result is `{item_id, value (JSON text | None), error, raw, input_tokens, output_tokens,
cost_usd, cached, requests}`; an error is for the stage to quarantine. With `max_cost_usd`,
the requests that were not sent because they could pass it come back marked, and
`stop_at_budget` ends the stage with what it answered kept (and cached) and a message.
"""

from __future__ import annotations

import json

import pyarrow as pa

from cmevlm.config import LLMConfig, RunConfig
from cmevlm.errors import CmevlmError, ConfigError
from cmevlm.storage import Storage, join
from cmevlm.teacher.client import BudgetReached, TeacherClient, TeacherFailed
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


BUDGET = "budget: "  # the error of a request that was not sent for the cost cap


class BudgetExceeded(CmevlmError):
    """The stage stopped at its LLM's max_cost_usd; what was paid for is kept."""


def result_row(item_id: str, outcome) -> dict:
    """An Answer, TeacherFailed, PrivacyViolation or BudgetReached -> one result row."""
    out = {"item_id": item_id, "value": None, "error": None, "raw": None, "input_tokens": 0,
           "output_tokens": 0, "cost_usd": 0.0, "cached": False, "requests": 0}
    if isinstance(outcome, BudgetReached):
        out.update(error=BUDGET + str(outcome))
    elif isinstance(outcome, PrivacyViolation):
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
    except (TeacherFailed, PrivacyViolation, BudgetReached) as e:
        outcome = e
    return result_row(req["item_id"], outcome)


class PoolWorker:
    """Callable class for `map_batches`: one TeacherClient per actor."""

    def __init__(self, cfg_json: str, section: str, schema, limiter=None, budget=None):
        from cmevlm.teacher.limiter import RayBudget, ray_waiter

        cfg = RunConfig.model_validate_json(cfg_json)
        self.schema = schema
        self.client = TeacherClient(getattr(cfg, section), cfg.workdir, cfg.storage, wait=ray_waiter(limiter) if limiter else None,
                                    role=section, budget=RayBudget(budget) if budget else None)

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
    from cmevlm.teacher.limiter import Budget, RateLimiter

    ray = connect(cfg.ray)
    limiter = None  # the offline backend has no quota to respect
    if tcfg.backend != "offline":
        limiter = ray.remote(num_cpus=0)(RateLimiter).remote(tcfg.rpm, tcfg.tpm)
    budget = None
    if tcfg.max_cost_usd is not None:
        budget = ray.remote(num_cpus=0)(Budget).remote(tcfg.max_cost_usd, audited_cost(cfg, section))
    blocks = max(1, min(len(requests) // tcfg.batch_size, 1000))
    rows = ray.data.from_items(requests, override_num_blocks=blocks).map_batches(
        PoolWorker,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "section": section, "schema": schema, "limiter": limiter,
                               "budget": budget},
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
    from cmevlm.teacher.limiter import Budget

    role = "teacher" if tcfg is cfg.teacher else "judge"
    budget = Budget(tcfg.max_cost_usd, audited_cost(cfg, role)) if tcfg.max_cost_usd else None
    client = TeacherClient(tcfg, cfg.workdir, cfg.storage, role=role, budget=budget)
    results, n = [], tcfg.batch_max_requests
    for i in range(0, len(requests), n):
        chunk = requests[i:i + n]
        outcomes = client.ask_batch([_payload(r, tcfg) for r in chunk], schema, join(cfg.workdir, "teacher", "batches"))
        results += [result_row(r["item_id"], o) for r, o in zip(chunk, outcomes)]
        client.audit.flush()
    return results


def audited_cost(cfg: RunConfig, role: str) -> float:
    """USD the audit log shows this role (teacher or judge) spent so far, every run included."""
    from cmevlm.teacher.client import merge_audit

    uri = join(cfg.workdir, "teacher", "audit.jsonl")
    st = Storage(cfg.storage)
    merge_audit(st, uri)
    records = (json.loads(x) for x in st.read_appended(uri).splitlines() if x.strip())
    return sum(r.get("cost_usd", 0.0) for r in records if r.get("event") == "outcome" and r.get("role", "teacher") == role)


def stop_at_budget(cfg: RunConfig, section: str, results: list[dict]) -> None:
    """Raise BudgetExceeded (a message, exit 2) when requests were held back by the cap."""
    held = [r for r in results if (r["error"] or "").startswith(BUDGET)]
    if held:
        cap = getattr(cfg, section).max_cost_usd
        raise BudgetExceeded(f"{section}.max_cost_usd=${cap:g} reached: {len(results) - len(held)} of {len(results)} requests "
                             f"answered, ${audited_cost(cfg, section):.4f} spent in all (audited). Everything paid for is kept "
                             f"and cached: rerun with a higher {section}.max_cost_usd to continue; nothing is paid twice.")


def estimate(cfg: RunConfig, section: str, requests: list[dict], schema) -> dict:
    """What sending `requests` would cost, before anything is sent: requests not in the cache,
    their input tokens (from the prompts: ~4 characters a token, 258 a mask), output tokens (the
    mean of the cached answers, else max_output_tokens) and thinking tokens (thinking_budget, or
    the default allowance), priced with the section's prices."""
    from cmevlm.config import DEFAULT_THINKING_ALLOWANCE
    from cmevlm.teacher.client import cache_entry, cache_key, input_tokens

    tcfg: LLMConfig = getattr(cfg, section)
    st = Storage(cfg.storage)
    cache, outputs, todo = join(cfg.workdir, "teacher", "cache"), [], []
    for r in requests:
        p = _payload(r, tcfg)
        key = cache_key(tcfg.backend, tcfg.model, p, schema)
        hit = cache_entry(cache, key)
        if st.exists(hit):
            outputs.append(st.read_json(hit)["output_tokens"])
        else:
            todo.append(p)
    out_each = sum(outputs) / len(outputs) if outputs else tcfg.max_output_tokens
    think_each = 0 if tcfg.backend == "offline" else tcfg.thinking_budget if tcfg.thinking_budget is not None else DEFAULT_THINKING_ALLOWANCE
    tin = sum(input_tokens(p) for p in todo)
    tout, tthink = round(out_each * len(todo)), think_each * len(todo)
    price = 0.0 if tcfg.backend == "offline" else (0.5 if tcfg.batch else 1.0) * (tin * tcfg.price_input_per_m + (tout + tthink) * tcfg.price_output_per_m) / 1e6
    return {"section": section, "backend": tcfg.backend, "model": tcfg.model, "requests": len(todo), "cached": len(outputs),
            "input_tokens": tin, "output_tokens": tout, "thinking_tokens": tthink, "cost_usd": round(price, 4),
            "output_basis": f"mean of {len(outputs)} cached answers" if outputs else "max_output_tokens (no cached answer yet)"}


def estimate_text(e: dict) -> str:
    return (f"{e['section']} ({e['backend']}/{e['model']}): {e['requests']} requests to send ({e['cached']} cached), "
            f"~{e['input_tokens']:,} input + {e['output_tokens']:,} output + {e['thinking_tokens']:,} thinking tokens, "
            f"~${e['cost_usd']:.4f} (output from the {e['output_basis']}; nothing was sent)")
