"""The consortium report: <workdir>/consortium/report.json and report.html.

`federated` is what each site measured of the consortium's last model (after DPO when its job
ran) on its own test set (the distribution round), `federated_sft` the same after the SFT job;
`local` every local-only model on every site's test set; `rounds` what
the coordinator received per round and site (bytes, examples, loss); `image_bytes_in_messages`
the scan of every message the sites kept (federation.capture_messages) for their image bytes.
`targets` says whether the demo's targets are met.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from cmevlm.config import RunConfig
from cmevlm.storage import Storage, join

FEDERATED_MIN_ACCURACY = 0.8
LOCAL_MIN_LATERALITY_ERROR = 0.3
DEMO_MAX_SECONDS = 15 * 60


def final_phase(rounds: list[dict]) -> str:
    """The phase whose model the sites keep last: dpo when its job ran, else sft."""
    return "dpo" if any(r.get("phase") == "dpo" for r in rounds) else "sft"


def federated_scores(rounds: list[dict], phase: str | None = None) -> dict:
    """{site: {structure_accuracy, laterality_error, n}} from a phase's distribution round
    (default: the last phase)."""
    phase = phase or final_phase(rounds)
    out = {}
    for r in rounds:
        m = r.get("metrics") or {}
        if m.get("phase") == "distribute" and r.get("phase", "sft") == phase:
            out[r["site"]] = {k: m[k] for k in ("structure_accuracy", "laterality_error", "n") if k in m}
    return out


def bytes_per_round(rounds: list[dict]) -> int:
    """Bytes all sites sent in one training round (the largest such round)."""
    per: dict = {}
    for r in rounds:
        if (r.get("metrics") or {}).get("phase") == "train":
            key = (r.get("phase", "sft"), r["round"])
            per[key] = per.get(key, 0) + r["bytes"]
    return max(per.values(), default=0)


def targets(report: dict) -> dict:
    fed = report["federated"]
    local = report["local"]
    worse = {m: max((s["laterality_error"] for t, s in by_site.items() if t != m), default=0.0) for m, by_site in local.items()}
    checks = {
        "federated_structure_accuracy_ge_0.8_on_every_site": bool(fed) and all(v["structure_accuracy"] >= FEDERATED_MIN_ACCURACY for v in fed.values()),
        "every_local_model_laterality_error_ge_0.3_on_an_unseen_site": bool(worse) and all(v >= LOCAL_MIN_LATERALITY_ERROR for v in worse.values()),
        "no_image_bytes_in_messages": report["image_bytes_in_messages"] == 0 and report["messages_scanned"] > 0,
    }
    if "total" in report.get("timings_s", {}):
        checks["demo_within_15_minutes"] = report["timings_s"]["total"] <= DEMO_MAX_SECONDS
    return checks


def write(coord: RunConfig, sites: list[RunConfig], fed: dict, local: dict, timings: dict, pretrained: dict | None = None) -> dict:
    from cmevlm.federation.scan import scan_sites

    scan = scan_sites(sites)
    report = {"engine": fed["engine"], "federated": federated_scores(fed["rounds"]), "phases": fed.get("phases", ["sft"]),
              "federated_sft": federated_scores(fed["rounds"], "sft"), "local": local, "pretrained": pretrained or {},
              "rounds": [{k: r.get(k) for k in ("phase", "round", "site", "bytes", "examples", "sha256", "data_kind")} | {"metrics": r.get("metrics")}
                         | {k: r[k] for k in ("event", "rejected", "refused", "capped", "clipped") if k in r}  # why a site was bounded
                         for r in fed["rounds"]],
              "bytes_per_round": bytes_per_round(fed["rounds"]), "image_bytes_in_messages": scan["image_bytes_found"],
              "messages_scanned": scan["messages"], "scan": scan, "trainable": coord.federation.trainable,
              "timings_s": timings}
    report["targets"] = targets(report)
    st = Storage(coord.storage)
    out = join(coord.workdir, "consortium")
    st.write_json(join(out, "report.json"), report)
    st.write_text(join(out, "report.html"), render_html(report))
    return report


def federated_rows(report: dict) -> list[tuple[str, str]]:
    """(row name, report key) of the consortium's models: after SFT, and after DPO when it ran."""
    if "dpo" in report.get("phases", []):
        return [("federated SFT", "federated_sft"), ("federated DPO", "federated")]
    return [("federated", "federated")]


def _cell(s: dict | None) -> str:
    if not s:
        return "<td>-</td>"
    bad = s["laterality_error"] >= LOCAL_MIN_LATERALITY_ERROR or s["structure_accuracy"] < FEDERATED_MIN_ACCURACY
    return f"<td class='{'bad' if bad else 'ok'}'>{s['structure_accuracy']:.2f} / {s['laterality_error']:.2f}</td>"


def render_html(report: dict) -> str:
    sites = sorted({t for by in report["local"].values() for t in by} | set(report["federated"]))
    head = "".join(f"<th>{html.escape(s)} test</th>" for s in sites)
    rows = [f"<tr><th>{html.escape(name)}</th>{''.join(_cell(report[key].get(s)) for s in sites)}</tr>" for name, key in federated_rows(report)]
    rows += [f"<tr><th>local {html.escape(m)}</th>{''.join(_cell(by.get(s)) for s in sites)}</tr>" for m, by in sorted(report["local"].items())]
    if report.get("pretrained"):
        rows.append(f"<tr><th>start (public pretraining)</th>{''.join(_cell(report['pretrained'].get(s)) for s in sites)}</tr>")
    checks = "".join(f"<li>{'met' if ok else 'NOT met'}: {html.escape(k)}</li>" for k, ok in report["targets"].items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>cmevlm consortium report</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.3em .8em;border:1px solid #ccc}}.bad{{background:#fdd}}.ok{{background:#dfd}}</style>
</head><body><h1>Consortium report ({html.escape(report['engine'])})</h1>
<p>Each cell: structure accuracy / laterality error rate on that site's test set (greedy).</p>
<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>
<p>Averaged: {html.escape(report['trainable'])}; bytes sent per training round (all sites): {report['bytes_per_round']:,};
messages scanned: {report['messages_scanned']}, image bytes found in them: {report['image_bytes_in_messages']}.</p>
<ul>{checks}</ul>
<pre>{html.escape(json.dumps(report['timings_s'], indent=1))}</pre></body></html>
"""


def table_text(report: dict) -> str:
    """The cross-site table for the terminal: structure accuracy / laterality errors."""
    sites = sorted({t for by in report["local"].values() for t in by} | set(report["federated"]))
    lines = [f"{'model':<16}" + "".join(f"{s + ' test':>16}" for s in sites)]

    def cell(s):
        return f"{s['structure_accuracy']:.2f} / {s['laterality_error']:.2f}" if s else "-"

    lines += [f"{name:<16}" + "".join(f"{cell(report[key].get(s)):>16}" for s in sites) for name, key in federated_rows(report)]
    lines += [f"{'local ' + m:<16}" + "".join(f"{cell(by.get(s)):>16}" for s in sites) for m, by in sorted(report["local"].items())]
    if report.get("pretrained"):
        lines.append(f"{'start (public)':<16}" + "".join(f"{cell(report['pretrained'].get(s)):>16}" for s in sites))
    return ("Cross-site table (structure accuracy / laterality error rate, greedy):\n" + "\n".join(lines)
            + f"\nbytes per round: {report['bytes_per_round']:,}; image bytes in {report['messages_scanned']} messages: "
            f"{report['image_bytes_in_messages']}")
