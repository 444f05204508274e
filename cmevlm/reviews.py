"""The expert's review files: one append-only JSON-lines file per queue, read by the stages.

    teacher/reviews.jsonl       {item_id, reviewer, decision: accept|edit|reject, text (edit), ts}
    preferences/reviews.jsonl   {item_id, reviewer, decision: accept|swap|reject, ts}
    eval/expert_reviews.jsonl   {item_id, reviewer, decision: score, scores: {A: 1-5, ...}, preferred: [A, ...], ts}

`teach` and `prefer` apply the first two when they assemble their datasets; `cmevlm evaluate
--import-expert-sheet eval/expert_reviews.jsonl` aggregates the third. A decision is one appended
line, never a rewrite: the last line for an item wins and the earlier ones are its history.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from cmevlm.errors import BadFile
from cmevlm.storage import Storage

# queue -> (reviews file under the workdir, the decisions it allows)
FILES = {
    "answers": ("teacher/reviews.jsonl", ("accept", "edit", "reject")),
    "preferences": ("preferences/reviews.jsonl", ("accept", "swap", "reject")),
    "expert": ("eval/expert_reviews.jsonl", ("score",)),
}
SCORES = (1, 2, 3, 4, 5)
log = logging.getLogger(__name__)


def needs_review(item_id: str, fraction: float, seed: int) -> bool:
    """A deterministic `fraction` of items is flagged for the expert (teach: seed; prefer: seed + 1)."""
    h = int.from_bytes(hashlib.sha256(f"review|{seed}|{item_id}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def check(r: dict, decisions: tuple[str, ...]) -> None:
    """Raise ValueError when a review is not one the stages can apply."""
    if not isinstance(r, dict) or not r.get("item_id") or r.get("decision") not in decisions:
        raise ValueError(f"a review needs item_id and decision {'|'.join(decisions)}")
    if r["decision"] == "edit" and not (r.get("text") or "").strip():
        raise ValueError("an edit needs text")
    if r["decision"] == "score":
        scores, preferred = r.get("scores"), r.get("preferred")
        if not isinstance(scores, dict) or not scores or any(v not in SCORES for v in scores.values()):
            raise ValueError("a score needs scores {letter: 1-5} for the answers")
        if not isinstance(preferred, list) or not preferred or any(p not in scores for p in preferred):
            raise ValueError("a score needs one or more preferred answers among the scored letters")


def read_history(storage: Storage, uri: str, decisions: tuple[str, ...], warnings: list[str] | None = None) -> list[dict]:
    """Every review in `uri`, oldest first. A line that is not JSON is a write cut short (a
    crash, a full disk): the next append starts on a new line (Storage.append_text), so a torn
    line is a line of its own, wherever it is; it is skipped with a warning, appended to
    `warnings` and logged. A JSON line that is not a valid review is an error naming its line."""
    text = storage.read_appended(uri)
    lines = text.splitlines()
    history = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            msg = f"{uri}:{n}: a torn line ({len(line)} bytes) was skipped: {e}"
            log.warning("%s", msg)
            if warnings is not None:
                warnings.append(msg)
            continue
        try:
            check(r, decisions)
        except ValueError as e:
            raise BadFile(f"{uri}:{n}: {e}") from None
        history.append(r)
    return history


def read_reviews(storage: Storage, uri: str, decisions: tuple[str, ...] = FILES["answers"][1]) -> dict[str, dict]:
    """{item_id: the last review of it}."""
    return {r["item_id"]: r for r in read_history(storage, uri, decisions)}


class ReviewLog:
    """The one writer of a reviews file: each decision is checked, stamped and appended as one
    fsync'd line (O_APPEND on local disk; on object storage a part object of its own), so
    writers in other threads or processes, e.g. two browser tabs or two app instances, never
    lose each other's lines, and a failed write raises instead of leaving a torn line."""

    def __init__(self, storage: Storage, uri: str, decisions: tuple[str, ...]):
        self.storage, self.uri, self.decisions = storage, uri, decisions
        self.warnings: list[str] = []  # what the last read skipped (the review app shows it)

    def append(self, review: dict) -> dict:
        if not (review.get("reviewer") or "").strip():
            raise ValueError("a review needs the reviewer's name")
        check(review, self.decisions)
        review = {**review, "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.storage.append_text(self.uri, json.dumps(review, sort_keys=True) + "\n", fsync=True)  # whole, or an error
        return review

    def history(self) -> list[dict]:
        self.warnings = []
        return read_history(self.storage, self.uri, self.decisions, self.warnings)
