"""The review queues of a run: what the expert sees and where each decision goes. Plain reads
from the workdir (local or s3://); the web app only renders them.

An item is addressed by its position in its queue (1-based), so URLs and logs carry no case
identifiers; a decision carries the item_id, and the app refuses one whose position no longer
holds that item (the queue was rebuilt).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from cmevlm.config import RunConfig
from cmevlm.evaluate.expert import SHEET, read_sheet
from cmevlm.reviews import FILES, ReviewLog
from cmevlm.storage import Storage, join, stage_uri

TITLES = {"answers": "Answers", "preferences": "Preferences", "expert": "Expert evaluation"}
# What writes each queue, for the page shown while it is empty.
SOURCES = {
    "answers": "review/answers.parquet: written by `cmevlm teach` (items flagged needs_review; `--force` on an older run)",
    "preferences": "review/preferences.parquet: written by `cmevlm prefer` (pairs flagged needs_review; `--force` on an older run)",
    "expert": f"{SHEET}: written by `cmevlm evaluate --export-expert-sheet` (the demo writes it)",
}


@dataclass
class Queue:
    name: str
    items: list[dict]                      # item fields, without the image
    image: Callable[[int], bytes]          # position (0-based) -> PNG bytes
    log: ReviewLog
    letters: str = ""                      # expert: the blinded answers' letters
    missing: str | None = None             # why the queue is empty
    title: str = field(init=False)

    def __post_init__(self):
        self.title = TITLES[self.name]

    def state(self) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        """(latest decision per item_id, full history per item_id), read fresh from the file
        so that every tab and every app instance sees every decision."""
        history: dict[str, list[dict]] = {}
        for r in self.log.history():
            history.setdefault(r["item_id"], []).append(r)
        return {k: v[-1] for k, v in history.items()}, history

    def progress(self, latest: dict[str, dict]) -> tuple[int, int]:
        return sum(it["item_id"] in latest for it in self.items), len(self.items)

    def first_undecided(self, latest: dict[str, dict]) -> int | None:
        """1-based position of the first item without a decision, None when all are decided."""
        return next((n for n, it in enumerate(self.items, 1) if it["item_id"] not in latest), None)

    def counts(self, latest: dict[str, dict]) -> Counter:
        """Decisions in force (the last per item of this queue)."""
        ids = {it["item_id"] for it in self.items}
        return Counter(r["decision"] for i, r in latest.items() if i in ids)


def _parquet_queue(st: Storage, cfg: RunConfig, name: str, uri: str) -> Queue:
    reviews = ReviewLog(st, join(cfg.workdir, FILES[name][0]), FILES[name][1])
    if not st.exists(uri):
        return Queue(name, [], lambda i: b"", reviews, missing=SOURCES[name])
    table = st.read_parquet(uri)
    images = table.column("image")  # kept as Arrow memory; one PNG is turned into bytes per request
    return Queue(name, table.drop_columns(["image"]).to_pylist(), lambda i: images[i].as_py(), reviews)


def _expert_queue(st: Storage, cfg: RunConfig) -> Queue:
    reviews = ReviewLog(st, join(cfg.workdir, FILES["expert"][0]), FILES["expert"][1])
    sheet_uri = join(cfg.workdir, SHEET)
    if not st.exists(sheet_uri):
        return Queue("expert", [], lambda i: b"", reviews, missing=SOURCES["expert"])
    # The sheet holds the blinded answers only; eval/expert_key.json is never read here.
    rows = read_sheet(st, sheet_uri)
    letters = "".join(k.removeprefix("answer_") for k in rows[0] if k.startswith("answer_")) if rows else ""
    items = [{"item_id": r["item_id"], "structure": r["structure"], "laterality": r["laterality"], "prompt": r["prompt"],
              "answers": {L: r[f"answer_{L}"] for L in letters}} for r in rows]
    wanted = {it["item_id"] for it in items}
    data = st.read_parquet(stage_uri(cfg, cfg.evaluate.data), columns=["item_id", "images"]).to_pylist()
    png = {r["item_id"]: r["images"][0]["bytes"] for r in data if r["item_id"] in wanted}
    return Queue("expert", items, lambda i: png.get(items[i]["item_id"], b""), reviews, letters=letters)


def load_queues(cfg: RunConfig) -> dict[str, Queue]:
    st = Storage(cfg.storage)
    return {
        "answers": _parquet_queue(st, cfg, "answers", join(cfg.workdir, "review", "answers.parquet")),
        "preferences": _parquet_queue(st, cfg, "preferences", join(cfg.workdir, "review", "preferences.parquet")),
        "expert": _expert_queue(st, cfg),
    }
