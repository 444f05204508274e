"""Teach: `frames/` -> the SFT dataset `sft/train`, `sft/test`, written by a teacher that never
sees a frame (paper, Section 2.2).

    cmevlm teach --config configs/demo.yaml [--set teacher.backend=gemini ...]
    python jobs/teach.py --config /etc/cmevlm/run.yaml

Each item gets an instruction template (seeded, spread evenly). The teacher gets the template,
a text context (structure, side, phase, mask geometry) and, with `teacher.send_mask`, the binary
mask: never the frame or the composite. A Ray Data actor pool sends the requests through one
TeacherClient per actor (cache, guard, audit, retries) and one rate limiter shared by all
actors. Answers are cached as they arrive, so a crashed or killed run resumes without paying
twice. The driver then assembles TRL conversational rows (`images` = [composite], `messages` =
user [image + instruction] / assistant [answer]) and applies the expert's
`teacher/reviews.jsonl` (accept | edit | reject).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter

import pyarrow as pa

from cmevlm.config import RunConfig
from cmevlm.data.composite import Geometry
from cmevlm.data.formats import SFT_SCHEMA, assistant_turn, image, user_turn
from cmevlm.storage import Storage, join
from cmevlm.teacher.backends import TeacherAnswer
from cmevlm.teacher.client import TeacherClient, TeacherFailed, merge_audit
from cmevlm.teacher.payload import PrivacyViolation, build_payload
from cmevlm.teacher.prompts import SYSTEM_PROMPT, TEMPLATE_BY_ID, assign_template, teacher_prompt

log = logging.getLogger(__name__)

# What the teacher stage reads of `frames/`: metadata and the mask. Never `composite`.
TEACH_COLUMNS = ["item_id", "procedure_id", "site", "laterality", "phase", "structure", "in_cme_set", "frame_id",
                 "split", "mask", "area_fraction", "bbox", "centroid", "region"]

RESULT_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("answer", pa.string()), ("error", pa.string()), ("raw", pa.string()),
    ("input_tokens", pa.int64()), ("output_tokens", pa.int64()), ("cost_usd", pa.float64()),
    ("cached", pa.bool_()), ("requests", pa.int64()),
])


# ---------------------------------------------------------------------------------------------
# Plain pieces


def needs_review(item_id: str, fraction: float, seed: int) -> bool:
    """A deterministic `fraction` of items is flagged for the expert."""
    h = int.from_bytes(hashlib.sha256(f"review|{seed}|{item_id}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def teacher_payload(item: dict, cfg: RunConfig):
    """The request for one item: text context + instruction, and the mask when configured."""
    template = TEMPLATE_BY_ID[item["template_id"]]
    geo = Geometry(item["area_fraction"], tuple(item["bbox"]), tuple(item["centroid"]), item["region"])
    text = teacher_prompt(item, template, geo.describe(), cfg.teacher.send_mask)
    params = {"temperature": cfg.teacher.temperature, "max_output_tokens": cfg.teacher.max_output_tokens}
    return build_payload(item["item_id"], SYSTEM_PROMPT, text, item["mask"] if cfg.teacher.send_mask else None, cfg.teacher.mask_size, params)


def result_row(item_id: str, outcome) -> dict:
    """An Answer, TeacherFailed or PrivacyViolation -> one result row (an error is quarantined)."""
    out = {"item_id": item_id, "answer": None, "error": None, "raw": None, "input_tokens": 0,
           "output_tokens": 0, "cost_usd": 0.0, "cached": False, "requests": 0}
    if isinstance(outcome, PrivacyViolation):
        out.update(error=f"privacy guard: {outcome}")
    elif isinstance(outcome, TeacherFailed):
        out.update(error=outcome.reason, raw=outcome.raw[:4000])
    elif not outcome.value.answer.strip():
        out.update(error="teacher returned an empty answer", raw=outcome.text[:4000])
    else:
        out.update(answer=outcome.value.answer.strip(), input_tokens=outcome.input_tokens, output_tokens=outcome.output_tokens,
                   cost_usd=outcome.cost_usd, cached=outcome.cached, requests=outcome.requests)
    return out


def ask_teacher(client: TeacherClient, item: dict, cfg: RunConfig) -> dict:
    """One item -> one result row."""
    try:
        outcome = client.ask(teacher_payload(item, cfg), TeacherAnswer)
    except (TeacherFailed, PrivacyViolation) as e:
        outcome = e
    return result_row(item["item_id"], outcome)


def sft_row(item: dict, composite: bytes, answer: str) -> dict:
    """A TRL conversational SFT row: the student sees the composite and the instruction only."""
    prompt = TEMPLATE_BY_ID[item["template_id"]].text
    return {
        "images": [image(composite)],
        "messages": [user_turn(prompt), assistant_turn(answer)],
        **{k: item[k] for k in ("item_id", "procedure_id", "site", "structure", "laterality", "phase", "template_id", "needs_review")},
    }


def read_reviews(storage: Storage, uri: str) -> dict[str, dict]:
    """`reviews.jsonl` -> {item_id: the last review of it}; bad lines are errors."""
    if not storage.exists(uri):
        return {}
    reviews = {}
    for n, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("decision") not in ("accept", "edit", "reject") or not r.get("item_id"):
            raise ValueError(f"{uri}:{n}: a review needs item_id and decision accept|edit|reject")
        if r["decision"] == "edit" and not (r.get("text") or "").strip():
            raise ValueError(f"{uri}:{n}: an edit needs text")
        reviews[r["item_id"]] = r
    return reviews


class TeachWorker:
    """Callable class for `map_batches`: one TeacherClient per actor."""

    def __init__(self, cfg_json: str, limiter=None):
        from cmevlm.teacher.limiter import ray_waiter

        self.cfg = RunConfig.model_validate_json(cfg_json)
        self.client = TeacherClient(self.cfg.teacher, self.cfg.workdir, self.cfg.storage, wait=ray_waiter(limiter) if limiter else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [ask_teacher(self.client, item, self.cfg) for item in batch.to_pylist()]
        self.client.audit.flush()
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


# ---------------------------------------------------------------------------------------------
# The stage


def run(cfg: RunConfig, force: bool = False) -> dict:
    st = Storage(cfg.storage)
    frames, out, tdir = join(cfg.workdir, "frames"), join(cfg.workdir, "sft"), join(cfg.workdir, "teacher")
    reviews_uri = join(tdir, "reviews.jsonl")
    reviews_sha = hashlib.sha256(st.read_bytes(reviews_uri)).hexdigest() if st.exists(reviews_uri) else None
    if st.is_complete(out) and not force and st.read_manifest(out).get("reviews_sha256") == reviews_sha:
        m = st.read_manifest(out)
        log.info("teach: %s is complete (%d train, %d test), skipped", out, m["train"], m["test"])
        return {**m, "skipped": True}
    if not st.is_complete(frames):
        raise FileNotFoundError(f"teach needs a complete ingest stage at {frames} (run `cmevlm ingest`)")
    st.delete(out)
    t0 = time.time()

    # ---- items: metadata and masks only; the composite is not read until assembly
    table = st.read_parquet(join(frames, "shards"), columns=TEACH_COLUMNS)
    items = [r for r in table.to_pylist() if r["in_cme_set"]]
    skipped_non_cme = table.num_rows - len(items)
    for it in items:
        it["template_id"] = assign_template(it["item_id"], cfg.seed).template_id
        it["needs_review"] = needs_review(it["item_id"], cfg.teacher.review_fraction, cfg.seed)
    log.info("teach: %d items (%d outside the CME set left out), backend %s/%s", len(items), skipped_non_cme, cfg.teacher.backend, cfg.teacher.model)

    # ---- ask the teacher: an actor pool, one shared limiter
    if cfg.teacher.batch:
        results = _ask_batched(cfg, items)
    else:
        results = _ask_all(cfg, items) if items else []
    merge_audit(st, join(tdir, "audit.jsonl"))

    # ---- assemble the dataset on the driver
    by_id = {r["item_id"]: r for r in results}
    reviews = read_reviews(st, reviews_uri)
    composites = st.read_parquet(join(frames, "shards"), columns=["item_id", "composite"])
    comp = dict(zip(composites.column("item_id").to_pylist(), composites.column("composite").to_pylist()))
    rows = {"train": [], "test": []}
    quarantine, review_counts = [], Counter()
    for it in items:
        r = by_id[it["item_id"]]
        if r["error"]:
            quarantine.append({"item_id": it["item_id"], "reason": r["error"], "raw": r["raw"]})
            continue
        answer, rev = r["answer"], reviews.get(it["item_id"])
        if rev:
            review_counts[rev["decision"]] += 1
            if rev["decision"] == "reject":
                continue
            if rev["decision"] == "edit":
                answer = rev["text"].strip()
        rows[it["split"]].append(sft_row(it, comp[it["item_id"]], answer))
    for split, rs in rows.items():
        for i in range(0, max(len(rs), 1), cfg.ingest.rows_per_shard):
            st.write_parquet(join(out, split, f"part-{i // cfg.ingest.rows_per_shard:05d}.parquet"),
                             pa.Table.from_pylist(rs[i:i + cfg.ingest.rows_per_shard], schema=SFT_SCHEMA))
    st.write_text(join(tdir, "quarantine.jsonl"), "".join(json.dumps(q, sort_keys=True) + "\n" for q in quarantine))

    sent = sum(r["requests"] for r in results)
    manifest = st.write_manifest(
        out, stage="teach", backend=cfg.teacher.backend, model=cfg.teacher.model,
        train=len(rows["train"]), test=len(rows["test"]), quarantined=len(quarantine),
        needs_review=sum(it["needs_review"] for it in items), reviewed=sum(review_counts.values()),
        edited=review_counts["edit"], rejected=review_counts["reject"], reviews_sha256=reviews_sha,
        requests_sent=sent, cached=sum(r["cached"] for r in results),
        input_tokens=sum(r["input_tokens"] for r in results), output_tokens=sum(r["output_tokens"] for r in results),
        cost_usd=round(sum(r["cost_usd"] for r in results), 6),
        templates=dict(Counter(it["template_id"] for it in items)), seconds=round(time.time() - t0, 2),
    )
    log.info("teach: %d train, %d test, %d quarantined; %d requests sent, %d cached; cost $%.4f",
             manifest["train"], manifest["test"], manifest["quarantined"], sent, manifest["cached"], manifest["cost_usd"])
    return manifest


def _ask_batched(cfg: RunConfig, items: list[dict]) -> list[dict]:
    """The Gemini Batch API from the driver: jobs of `teacher.batch_max_requests` items."""
    if cfg.teacher.backend != "gemini":
        raise ValueError("teacher.batch needs teacher.backend=gemini")
    client = TeacherClient(cfg.teacher, cfg.workdir, cfg.storage)
    results = []
    n = cfg.teacher.batch_max_requests
    for i in range(0, len(items), n):
        chunk = items[i:i + n]
        outcomes = client.ask_batch([teacher_payload(it, cfg) for it in chunk], TeacherAnswer, join(cfg.workdir, "teacher", "batches"))
        results += [result_row(it["item_id"], o) for it, o in zip(chunk, outcomes)]
        client.audit.flush()
        log.info("teach: batch %d/%d done", i // n + 1, -(-len(items) // n))
    return results


def _ask_all(cfg: RunConfig, items: list[dict]) -> list[dict]:
    from cmevlm.cluster import connect
    from cmevlm.teacher.limiter import RateLimiter

    ray = connect(cfg.ray)
    limiter = None  # the offline teacher has no quota to respect
    if cfg.teacher.backend != "offline":
        limiter = ray.remote(num_cpus=0)(RateLimiter).remote(cfg.teacher.rpm, cfg.teacher.tpm)
    blocks = max(1, min(len(items) // cfg.teacher.batch_size, 1000))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        TeachWorker,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "limiter": limiter},
        batch_size=cfg.teacher.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(cfg.teacher.concurrency, blocks)),
        num_cpus=cfg.teacher.num_cpus_per_actor,
    )
    return ds.take_all()
