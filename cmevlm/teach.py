"""Teach: `frames/` -> the SFT dataset `sft/train`, `sft/test`, written by a teacher that never
sees a frame (paper, Section 2.2).

    cmevlm teach --config configs/demo.yaml [--set teacher.backend=gemini ...]
    python jobs/run.py teach --config /etc/cmevlm/run.yaml

Each item gets an instruction template (seeded, spread evenly). The teacher gets the template,
a text context (structure, side, phase, mask geometry) and, with `teacher.send_mask`, the binary
mask: never the frame or the composite. A Ray Data actor pool sends the requests through one
TeacherClient per actor (cache, guard, audit, retries) and one rate limiter shared by all
actors. Answers are cached as they arrive, so a crashed or killed run resumes without paying
twice. The driver then assembles TRL conversational rows (`images` = [composite], `messages` =
user [image + instruction] / assistant [answer]) and applies the expert's
`teacher/reviews.jsonl` (accept | edit | reject). The flagged items, as the teacher wrote them,
go to the expert's queue `review/answers.parquet` (`cmevlm review` shows it).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

import pyarrow as pa

from cmevlm.assembly import apply_reviews, is_current, reviews_sha256, write_quarantine, write_shards
from cmevlm.config import RunConfig
from cmevlm.data.composite import Geometry
from cmevlm.data.formats import ANSWER_QUEUE_SCHEMA, SFT_SCHEMA, assistant_turn, image, user_turn
from cmevlm.errors import MissingInput
from cmevlm.instructions import TEMPLATE_BY_ID, assign_template
from cmevlm.reviews import FILES, needs_review, read_reviews
from cmevlm.storage import Storage, join
from cmevlm.teacher import pool
from cmevlm.teacher.backends import TeacherAnswer
from cmevlm.teacher.client import merge_audit
from cmevlm.teacher.prompts import SYSTEM_PROMPT, teacher_prompt

log = logging.getLogger(__name__)

# What the teacher stage reads of `frames/`: metadata and the mask. Never `composite`.
TEACH_COLUMNS = ["item_id", "procedure_id", "site", "laterality", "phase", "structure", "in_cme_set", "frame_id",
                 "split", "mask", "area_fraction", "bbox", "centroid", "region"]

# ---------------------------------------------------------------------------------------------
# Plain pieces


def teacher_request(item: dict, cfg: RunConfig) -> dict:
    """The request for one item: text context + instruction, and the mask when configured."""
    template = TEMPLATE_BY_ID[item["template_id"]]
    geo = Geometry(item["area_fraction"], tuple(item["bbox"]), tuple(item["centroid"]), item["region"])
    text = teacher_prompt(item, template, geo.describe(), cfg.teacher.send_mask)
    facts = {"structure": item["structure"], "side": item["laterality"], "phase": item["phase"], "region": geo.region,
             "template_id": item["template_id"]}
    return pool.request(item["item_id"], SYSTEM_PROMPT, text, item["mask"] if cfg.teacher.send_mask else None, facts,
                        temperature=cfg.teacher.temperature, max_output_tokens=cfg.teacher.max_output_tokens)


def sft_row(item: dict, composite: bytes, answer: str) -> dict:
    """A TRL conversational SFT row: the student sees the composite and the instruction only."""
    prompt = TEMPLATE_BY_ID[item["template_id"]].text
    return {
        "images": [image(composite)],
        "messages": [user_turn(prompt), assistant_turn(answer)],
        **{k: item[k] for k in ("item_id", "procedure_id", "site", "structure", "laterality", "phase", "template_id", "needs_review")},
    }


def queue_row(item: dict, composite: bytes, answer: str) -> dict:
    """A flagged item in the expert's answer queue, as the teacher wrote it."""
    return {"item_id": item["item_id"], "structure": item["structure"], "laterality": item["laterality"], "phase": item["phase"],
            "prompt": TEMPLATE_BY_ID[item["template_id"]].text, "image": composite, "answer": answer}


# ---------------------------------------------------------------------------------------------
# The stage


def read_items(st: Storage, frames: str, cfg: RunConfig) -> list[dict]:
    """Metadata and masks of the CME-set items (never the composite), each with its template
    and review flag."""
    table = st.read_parquet(join(frames, "shards"), columns=TEACH_COLUMNS)
    items = [r for r in table.to_pylist() if r["in_cme_set"]]
    for it in items:
        it["template_id"] = assign_template(it["item_id"], cfg.seed).template_id
        it["needs_review"] = needs_review(it["item_id"], cfg.teacher.review_fraction, cfg.seed)
    log.info("teach: %d items (%d outside the CME set left out), backend %s/%s", len(items), table.num_rows - len(items),
             cfg.teacher.backend, cfg.teacher.model)
    return items


def answered(items: list[dict], results: list[dict]) -> tuple[list[tuple[dict, str]], list[dict]]:
    """(item, answer) pairs, and quarantine entries for the failed or empty answers."""
    by_id = {r["item_id"]: r for r in results}
    good, quarantine = [], []
    for it in items:
        r = by_id[it["item_id"]]
        answer = json.loads(r["value"])["answer"].strip() if r["value"] else ""
        if r["error"] or not answer:
            quarantine.append({"item_id": it["item_id"], "reason": r["error"] or "teacher returned an empty answer", "raw": r["raw"]})
        else:
            good.append((it, answer))
    return good, quarantine


def assemble(st: Storage, frames: str, good: list[tuple[dict, str]], reviews: dict) -> tuple[dict, list[dict], Counter]:
    """SFT rows per split after the expert's reviews, and the flagged items' queue rows (as the
    teacher wrote them)."""
    composites = st.read_parquet(join(frames, "shards"), columns=["item_id", "composite"])
    comp = dict(zip(composites.column("item_id").to_pylist(), composites.column("composite").to_pylist()))
    queue = [queue_row(it, comp[it["item_id"]], answer) for it, answer in good if it["needs_review"]]

    def edit(row: dict, rev: dict) -> dict:
        return {**row, "messages": [row["messages"][0], assistant_turn(rev["text"].strip())]} if rev["decision"] == "edit" else row

    kept, counts = apply_reviews(((it["item_id"], sft_row(it, comp[it["item_id"]], a)) for it, a in good), reviews, edit)
    split = {it["item_id"]: it["split"] for it, _ in good}
    return {s: [r for r in kept if split[r["item_id"]] == s] for s in ("train", "test")}, queue, counts


def estimate(cfg: RunConfig) -> dict:
    """What teaching every item would cost, without sending anything (`cmevlm teach --estimate`)."""
    items = read_items(Storage(cfg.storage), join(cfg.workdir, "frames"), cfg)
    return pool.estimate(cfg, "teacher", [teacher_request(it, cfg) for it in items], TeacherAnswer)


def run(cfg: RunConfig, force: bool = False) -> dict:
    st = Storage(cfg.storage)
    frames, out = join(cfg.workdir, "frames"), join(cfg.workdir, "sft")
    reviews_uri = join(cfg.workdir, FILES["answers"][0])  # the expert's file (`cmevlm review` writes it)
    reviews_sha = reviews_sha256(st, reviews_uri)
    if is_current(st, out, force, reviews_sha):
        m = st.read_manifest(out)
        log.info("teach: %s is complete (%d train, %d test), skipped", out, m["train"], m["test"])
        return {**m, "skipped": True}
    if not st.is_complete(frames):
        raise MissingInput(f"teach needs a complete ingest stage at {frames} (run `cmevlm ingest`)")
    st.delete(out)
    t0 = time.time()
    items = read_items(st, frames, cfg)
    results = pool.ask_all(cfg, "teacher", [teacher_request(it, cfg) for it in items], TeacherAnswer)
    merge_audit(st, join(cfg.workdir, "teacher", "audit.jsonl"))
    pool.stop_at_budget(cfg, "teacher", results)
    good, quarantine = answered(items, results)
    rows, queue, counts = assemble(st, frames, good, read_reviews(st, reviews_uri))
    for split, rs in rows.items():
        write_shards(st, join(out, split), rs, SFT_SCHEMA)
    st.write_parquet(join(cfg.workdir, "review", "answers.parquet"), pa.Table.from_pylist(queue, schema=ANSWER_QUEUE_SCHEMA))
    write_quarantine(st, cfg.workdir, "teach", quarantine)
    sent = sum(r["requests"] for r in results)
    manifest = st.write_manifest(
        out, stage="teach", backend=cfg.teacher.backend, model=cfg.teacher.model,
        train=len(rows["train"]), test=len(rows["test"]), quarantined=len(quarantine),
        blocked=sum(q["reason"].startswith("blocked") for q in quarantine),
        needs_review=sum(it["needs_review"] for it in items), reviewed=sum(counts.values()),
        edited=counts["edit"], rejected=counts["reject"], reviews_sha256=reviews_sha,
        requests_sent=sent, cached=sum(r["cached"] for r in results),
        input_tokens=sum(r["input_tokens"] for r in results), output_tokens=sum(r["output_tokens"] for r in results),
        cost_usd=round(sum(r["cost_usd"] for r in results), 6),
        templates=dict(Counter(it["template_id"] for it in items)), seconds=round(time.time() - t0, 2),
    )
    log.info("teach: %d train, %d test, %d quarantined; %d requests sent, %d cached; cost $%.4f",
             manifest["train"], manifest["test"], manifest["quarantined"], sent, manifest["cached"], manifest["cost_usd"])
    return manifest
