"""The expert sheet: `evaluate.expert_n` random test items, the models' answers blinded as
A/B/C in a shuffled order per item, for a surgeon to score (1-5 each) and to mark the
preferred answers (several allowed). The key (letter -> model) stays in eval/expert_key.json
and never appears on the sheet.
"""

from __future__ import annotations

import base64
import csv
import io
import random
import string

from cmevlm.config import RunConfig
from cmevlm.errors import BadFile, MissingInput
from cmevlm.evaluate.metrics import mean_std
from cmevlm.reviews import FILES, read_reviews
from cmevlm.storage import Storage, join, stage_uri

SHEET = "eval/expert_sheet.csv"  # under the workdir: what the surgeon (or `cmevlm review`) scores


def read_sheet(st: Storage, uri: str) -> list[dict]:
    """The rows of an exported (or filled) sheet CSV."""
    return list(csv.DictReader(io.StringIO(st.read_text(uri))))


def export_sheet(cfg: RunConfig) -> dict:
    st = Storage(cfg.storage)
    out = join(cfg.workdir, "eval")
    rows = [r for r in st.read_parquet(join(out, "answers.parquet")).to_pylist() if r.get("mode", "greedy") == "greedy"]
    models = sorted({r["model"] for r in rows})
    answers = {(r["model"], r["item_id"]): r for r in rows}
    item_ids = sorted({r["item_id"] for r in rows})
    rng = random.Random(cfg.seed)
    chosen = sorted(rng.sample(item_ids, min(cfg.evaluate.expert_n, len(item_ids))))
    letters = string.ascii_uppercase[: len(models)]
    images = {r["item_id"]: r for r in st.read_parquet(stage_uri(cfg, cfg.evaluate.data)).to_pylist() if r["item_id"] in set(chosen)}
    key, lines = {}, []
    for item_id in chosen:
        order = models[:]
        rng.shuffle(order)
        key[item_id] = dict(zip(letters, order))
        first = answers[(order[0], item_id)]
        lines.append({"item_id": item_id, "structure": first["structure"], "laterality": first["laterality"], "prompt": first["prompt"],
                      **{f"answer_{L}": answers[(m, item_id)]["answer"] for L, m in zip(letters, order)},
                      **{f"score_{L}": "" for L in letters}, "preferred": ""})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(lines[0]))
    w.writeheader()
    w.writerows(lines)
    st.write_text(join(cfg.workdir, SHEET), buf.getvalue())
    st.write_json(join(out, "expert_key.json"), {"models": models, "letters": letters, "key": key})
    st.write_text(join(out, "expert_sheet.html"), _html(lines, letters, images))
    return {"items": len(lines), "letters": letters}


def _html(lines, letters, images) -> str:
    from cmevlm.evaluate.templating import render

    sections = [{"item_id": line["item_id"], "prompt": line["prompt"],
                 "image": base64.b64encode(images[line["item_id"]]["images"][0]["bytes"]).decode(),
                 "answers": [{"letter": L, "text": line[f"answer_{L}"]} for L in letters]} for line in lines]
    return render("expert_sheet.html", sections=sections, letters=letters)


class SheetError(BadFile):
    pass


def sheet_lines(st: Storage, path: str, letters: str) -> list[dict]:
    """A filled sheet as rows of the exported CSV: the CSV itself, or the review app's
    `eval/expert_reviews.jsonl` (the last decision per item)."""
    if not st.exists(path):
        raise MissingInput(f"no expert sheet at {path}")
    if path.endswith(".jsonl"):
        reviews = read_reviews(st, path, FILES["expert"][1])
        return [{"item_id": r["item_id"], **{f"score_{L}": str(r["scores"].get(L, "")) for L in letters},
                 "preferred": ";".join(r["preferred"])} for r in reviews.values()]
    return read_sheet(st, path)


def import_sheet(cfg: RunConfig, path: str) -> dict:
    """Validate a filled sheet (CSV or the review app's JSONL) and merge
    `{model: {score: {mean, std}, preferred}}` into eval/metrics.json (and the report)."""
    from cmevlm.evaluate import report

    st = Storage(cfg.storage)
    out = join(cfg.workdir, "eval")
    k = st.read_json(join(out, "expert_key.json"))
    letters, key = k["letters"], k["key"]
    scores = {m: [] for m in k["models"]}
    preferred = {m: 0 for m in k["models"]}
    for n, line in enumerate(sheet_lines(st, path, letters), 2):
        item = line.get("item_id")
        if item not in key:
            raise SheetError(f"{path}:{n}: item {item!r} is not on the exported sheet")
        for L in letters:
            raw = (line.get(f"score_{L}") or "").strip()
            if raw:
                if raw not in {"1", "2", "3", "4", "5"}:
                    raise SheetError(f"{path}:{n}: score_{L} must be 1-5, got {raw!r}")
                scores[key[item][L]].append(int(raw))
        for p in [x.strip().upper() for x in (line.get("preferred") or "").replace(",", ";").split(";") if x.strip()]:
            if p not in letters:
                raise SheetError(f"{path}:{n}: preferred {p!r} is not one of {letters}")
            preferred[key[item][p]] += 1
    expert = {m: {"score": mean_std(scores[m]), "preferred": preferred[m], "n": len(scores[m])} for m in k["models"]}
    metrics = st.read_json(join(out, "metrics.json"))
    metrics["expert"] = expert
    st.write_json(join(out, "metrics.json"), metrics)
    st.write_text(join(out, "report.md"), report.markdown(metrics))
    # the HTML report needs the answers again
    rows = [r for r in st.read_parquet(join(out, "answers.parquet")).to_pylist() if r.get("mode", "greedy") == "greedy"]
    items = {r["item_id"]: r for r in st.read_parquet(stage_uri(cfg, cfg.evaluate.data)).to_pylist() if r["item_id"] in {x["item_id"] for x in rows}}
    st.write_text(join(out, "report.html"), report.render_html(cfg, metrics, rows, items))
    return expert
