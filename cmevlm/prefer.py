"""Prefer: five sampled answers + ground truth -> the DPO dataset `preferences/` (paper, Step 2).

    cmevlm prefer --config configs/demo.yaml [--set judge.backend=gemini ...]
    python jobs/run.py prefer --config /etc/cmevlm/run.yaml

The judge receives the structure, the side, the instruction, the ground-truth answer and the
five answers, as text only (no image, no mask), through the same TeacherClient as the teacher
(payload builder and guard, audit, limiter, cache). It returns `{accepted, rejected, reason}`
with A-E or `ground_truth` (accepted only); invalid verdicts are retried, then quarantined
with the raw text. Each judged item becomes one TRL preference row; the expert's
`preferences/reviews.jsonl` (accept | swap | reject) is applied when the dataset is assembled;
the flagged pairs, as the judge left them, go to the expert's queue `review/preferences.parquet`.
"""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa

from cmevlm.assembly import apply_reviews, is_current, reviews_sha256, write_quarantine, write_shards
from cmevlm.config import RunConfig
from cmevlm.data.formats import PREF_SCHEMA, PREFERENCE_QUEUE_SCHEMA, answer_text, assistant_turn, prompt_text
from cmevlm.errors import MissingInput
from cmevlm.reviews import FILES, needs_review, read_reviews
from cmevlm.storage import Storage, join, stage_uri
from cmevlm.teacher import pool
from cmevlm.teacher.backends import Verdict
from cmevlm.teacher.client import merge_audit
from cmevlm.teacher.prompts import JUDGE_SYSTEM_PROMPT, LETTERS, judge_prompt

log = logging.getLogger(__name__)

ITEM_KEYS = ("item_id", "procedure_id", "site", "structure", "laterality", "phase", "template_id")


def judge_request(gt_row: dict, answers: list[str], cfg: RunConfig) -> dict:
    text = judge_prompt(gt_row["structure"], gt_row["laterality"], prompt_text(gt_row["messages"]),
                        answer_text(gt_row["messages"]), answers)
    facts = {"structure": gt_row["structure"], "side": gt_row["laterality"], "ground_truth": answer_text(gt_row["messages"]),
             "answers": dict(zip(LETTERS, answers))}
    return pool.request(gt_row["item_id"], JUDGE_SYSTEM_PROMPT, text, None, facts,
                        temperature=cfg.judge.temperature, max_output_tokens=cfg.judge.max_output_tokens)


def preference_row(gt_row: dict, answers: list[str], verdict: dict, flagged: bool) -> dict:
    pick = {**dict(zip(LETTERS, answers)), "ground_truth": answer_text(gt_row["messages"])}
    return {
        "images": gt_row["images"], "prompt": [gt_row["messages"][0]],
        "chosen": [assistant_turn(pick[verdict["accepted"]])], "rejected": [assistant_turn(pick[verdict["rejected"]])],
        **{k: gt_row[k] for k in ITEM_KEYS}, "needs_review": flagged,
        "judge_reason": f"accepted {verdict['accepted']}, rejected {verdict['rejected']}: {verdict['reason']}",
    }


def queue_row(row: dict) -> dict:
    """A flagged pair in the expert's preference queue, as the judge left it."""
    return {**{k: row[k] for k in ("item_id", "structure", "laterality", "phase", "judge_reason")}, "prompt": prompt_text(row["prompt"]),
            "image": row["images"][0]["bytes"], "chosen": answer_text(row["chosen"]), "rejected": answer_text(row["rejected"])}


def read_pool(st: Storage, cfg: RunConfig) -> tuple[dict, dict, list[str]]:
    """The five sampled answers and the ground-truth row (from the pool the sampler read) per item."""
    sampled = {r["item_id"]: [a["text"] for a in r["answers"]] for r in st.read_parquet(join(cfg.workdir, "samples", "parts")).to_pylist()}
    gt = {r["item_id"]: r for r in st.read_parquet(stage_uri(cfg, cfg.sample.pool)).to_pylist() if r["item_id"] in sampled}
    return sampled, gt, sorted(gt)


def integrity(answers: list[str], ground_truth: str, verdict: dict) -> tuple[dict | None, str | None]:
    """The verdict to write a pair from, or why no pair: a pair needs the judge to prefer
    strictly, and its chosen and rejected texts to differ. When all five answers are the same
    text, only the ground truth, if different and preferred, can stand against them."""
    pick = {**dict(zip(LETTERS, answers)), "ground_truth": ground_truth}
    if len({a.strip() for a in answers}) == 1:
        if verdict["accepted"] == "ground_truth" and verdict.get("strict", True) and ground_truth.strip() != answers[0].strip():
            return verdict, None
        return None, "all five answers are the same text and the judge does not prefer a different ground truth"
    if pick[verdict["accepted"]].strip() == pick[verdict["rejected"]].strip():
        return None, f"tie: accepted {verdict['accepted']} and rejected {verdict['rejected']} are the same text"
    if not verdict.get("strict", True):
        return None, f"tie: the judge finds {verdict['accepted']} no better than {verdict['rejected']}"
    return verdict, None


def judged(cfg: RunConfig, ids: list[str], results: list[dict], sampled: dict, gt: dict) -> tuple[list[tuple[str, dict]], list[dict], int]:
    """(item_id, preference row) per verdict that makes a pair, quarantine entries for the rest
    (failed requests, ties, all-identical answers), and how often the judge accepted the
    ground truth."""
    rows, quarantine, ground_truth = [], [], 0
    for item_id, r in zip(ids, results):
        if r["error"]:
            quarantine.append({"item_id": item_id, "reason": r["error"], "raw": r["raw"]})
            continue
        verdict, why = integrity(sampled[item_id], answer_text(gt[item_id]["messages"]), json.loads(r["value"]))
        if why:
            quarantine.append({"item_id": item_id, "reason": why, "raw": r["value"]})
            continue
        ground_truth += verdict["accepted"] == "ground_truth"
        flagged = needs_review(item_id, cfg.prefer.review_fraction, cfg.seed + 1)
        rows.append((item_id, preference_row(gt[item_id], sampled[item_id], verdict, flagged)))
    return rows, quarantine, ground_truth


def swap(row: dict, rev: dict) -> dict:
    """The expert's swap exchanges chosen and rejected; accept keeps the pair."""
    return {**row, "chosen": row["rejected"], "rejected": row["chosen"]} if rev["decision"] == "swap" else row


def estimate(cfg: RunConfig) -> dict:
    """What judging every sampled item would cost, without sending anything (`cmevlm prefer --estimate`)."""
    sampled, gt, ids = read_pool(Storage(cfg.storage), cfg)
    return pool.estimate(cfg, "judge", [judge_request(gt[i], sampled[i], cfg) for i in ids], Verdict)


def run(cfg: RunConfig, force: bool = False) -> dict:
    st = Storage(cfg.storage)
    out, samples = join(cfg.workdir, "preferences"), join(cfg.workdir, "samples")
    reviews_uri = join(cfg.workdir, FILES["preferences"][0])  # the expert's file: kept when the stage is rebuilt
    reviews_sha = reviews_sha256(st, reviews_uri)
    if is_current(st, out, force, reviews_sha):
        log.info("prefer: %s is complete, skipped", out)
        return {**st.read_manifest(out), "skipped": True}
    if not st.is_complete(samples):
        raise MissingInput(f"prefer needs the sample stage's answers at {samples} (run `cmevlm sample`)")
    for f in st.list_files(join(out, "parts")) + [join(out, "manifest.json")]:
        st.delete(f)
    t0 = time.time()
    sampled, gt, ids = read_pool(st, cfg)
    results = pool.ask_all(cfg, "judge", [judge_request(gt[i], sampled[i], cfg) for i in ids], Verdict)
    merge_audit(st, join(cfg.workdir, "teacher", "audit.jsonl"))
    pool.stop_at_budget(cfg, "judge", results)
    pairs, quarantine, ground_truth = judged(cfg, ids, results, sampled, gt)
    queue = [queue_row(row) for _, row in pairs if row["needs_review"]]
    rows, counts = apply_reviews(pairs, read_reviews(st, reviews_uri, FILES["preferences"][1]), swap)
    parts = write_shards(st, join(out, "parts"), rows, PREF_SCHEMA)
    st.write_parquet(join(cfg.workdir, "review", "preferences.parquet"), pa.Table.from_pylist(queue, schema=PREFERENCE_QUEUE_SCHEMA))
    write_quarantine(st, cfg.workdir, "prefer", quarantine)
    manifest = st.write_manifest(
        out, parts, stage="prefer", backend=cfg.judge.backend, model=cfg.judge.model, pairs=len(rows), quarantined=len(quarantine),
        ties=sum(q["reason"].startswith(("tie", "all five")) for q in quarantine),
        blocked=sum(q["reason"].startswith("blocked") for q in quarantine),
        needs_review=sum(r["needs_review"] for r in rows), reviewed=sum(counts.values()), swapped=counts["swap"],
        rejected=counts["reject"], accepted_ground_truth=ground_truth, reviews_sha256=reviews_sha,
        requests_sent=sum(r["requests"] for r in results), cached=sum(r["cached"] for r in results),
        cost_usd=round(sum(r["cost_usd"] for r in results), 6), seconds=round(time.time() - t0, 2),
    )
    log.info("prefer: %d pairs, %d quarantined, ground truth accepted %d times -> %s", len(rows), len(quarantine), ground_truth, out)
    return manifest
