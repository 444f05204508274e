"""eval/report.html (self-contained: plots and images embedded) and eval/report.md."""

from __future__ import annotations

import base64
import html
import io

from cmevlm.config import RunConfig, dump_config
from cmevlm.storage import Storage, join

COLUMNS = (("bleu4", "BLEU-4"), ("bertscore_f1", "BERTScore F1"), ("judge", "Judge (1-5)"))


def _fmt(ms: dict | None, digits=3) -> str:
    if not ms or ms.get("mean") is None:
        return "-"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


ORDER = ("base", "sft", "dpo")


def model_order(models) -> list[str]:
    """base, sft, dpo first (the paper's order), then any others by name."""
    return sorted(models, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def table_rows(metrics: dict) -> list[list[str]]:
    """The Table-1 layout: one row per model."""
    rows = []
    for m in model_order(metrics["models"]):
        s = metrics["models"][m]
        rows.append([m, *[_fmt(s[k], 2 if k == "judge" else 3) for k, _ in COLUMNS],
                     f"{s['structure_accuracy']:.2f}", f"{s['laterality_error_rate']:.2f}"])
    return rows


HEADER = ["model", *[h for _, h in COLUMNS], "structure accuracy", "laterality errors"]


def summary_text(metrics: dict) -> str:
    """Plain-text Table 1 for terminals."""
    rows = [HEADER, *table_rows(metrics)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def plots(metrics: dict, rows: list[dict]) -> dict[str, str]:
    """Base64 PNGs: judge score by structure, and score distributions per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = model_order(metrics["models"])
    structures = list(metrics["per_structure"])
    out = {}
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        vals = [(metrics["per_structure"][s][m]["judge"]["mean"] or 0) for s in structures]
        ax.bar(np.arange(len(structures)) + i * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(structures)) + width * (len(models) - 1) / 2, [s.replace("_", " ") for s in structures], fontsize=8)
    ax.set_ylabel("judge composite (1-5)")
    ax.set_ylim(0, 5)
    ax.legend()
    ax.set_title("Judge score by structure")
    fig.tight_layout()
    out["per_structure"] = _png(fig)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, (key, label) in zip(axes, COLUMNS):
        for m in models:
            ax.hist([r[key] for r in rows if r["model"] == m and r[key] is not None], bins=10, alpha=0.5, label=m)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out["distributions"] = _png(fig)
    plt.close(fig)
    return out


def write(cfg: RunConfig, st: Storage, metrics: dict, rows: list[dict], items: dict[str, dict]) -> None:
    out = join(cfg.workdir, "eval")
    st.write_text(join(out, "report.md"), markdown(metrics))
    st.write_text(join(out, "report.html"), render_html(cfg, metrics, rows, items))


def markdown(metrics: dict) -> str:
    lines = [f"# cmevlm evaluation ({metrics['n_test']} test items)", "", "| " + " | ".join(HEADER) + " |",
             "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(metrics)]
    models = model_order(metrics["models"])
    lines += ["", "## Judge composite by structure", "", "| structure | " + " | ".join(models) + " |",
              "|---|" + "---|" * len(models)]
    for s, per in metrics["per_structure"].items():
        lines.append(f"| {s} | " + " | ".join(_fmt(per[m]["judge"], 2) for m in models) + " |")
    t = metrics["tests"]
    lines += ["", f"Wilcoxon signed-rank on the judge composite: base vs SFT p = {t['base_vs_sft_judge_p']}, "
              f"SFT vs DPO p = {t['sft_vs_dpo_judge_p']}."]
    if metrics.get("expert"):
        lines += ["", "## Expert", "", "| model | score | preferred |", "|---|---|---|"]
        lines += [f"| {m} | {_fmt(v['score'], 2)} | {v['preferred']} |" for m, v in metrics["expert"].items()]
    return "\n".join(lines) + "\n"


def render_html(cfg: RunConfig, metrics: dict, rows: list[dict], items: dict[str, dict]) -> str:
    e = html.escape
    pics = plots(metrics, rows)
    table = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table_rows(metrics))
    examples = []
    for item_id in list(items)[: cfg.evaluate.report_examples]:
        it = items[item_id]
        img = base64.b64encode(it["images"][0]["bytes"]).decode()
        answers = "".join(f"<dt>{e(r['model'])} <small>(judge {r['judge'] if r['judge'] is not None else '-'})</small></dt><dd>{e(r['answer'])}</dd>"
                          for r in rows if r["item_id"] == item_id)
        gt = next(r["ground_truth"] for r in rows if r["item_id"] == item_id)
        examples.append(f"<div class='ex'><img src='data:image/png;base64,{img}' alt='composite'><div><p><b>{e(it['structure'].replace('_', ' '))}</b>, "
                        f"{e(it['laterality'])} CME — <i>{e(next(r['prompt'] for r in rows if r['item_id'] == item_id))}</i></p>"
                        f"<dl><dt>ground truth</dt><dd>{e(gt)}</dd>{answers}</dl></div></div>")
    expert = ""
    if metrics.get("expert"):
        expert = "<h2>Expert evaluation</h2><table><tr><th>model</th><th>score</th><th>preferred</th></tr>" + "".join(
            f"<tr><td>{e(m)}</td><td>{_fmt(v['score'], 2)}</td><td>{v['preferred']}</td></tr>" for m, v in metrics["expert"].items()) + "</table>"
    t = metrics["tests"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cmevlm evaluation</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.ex{{display:flex;gap:1em;margin:1em 0;border-top:1px solid #eee;padding-top:1em}}
.ex img{{width:224px;height:224px;image-rendering:pixelated}}dt{{font-weight:600;margin-top:.4em}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style>
</head><body>
<h1>cmevlm evaluation</h1>
<p>{metrics['n_test']} held-out test items; judge: {e(metrics['judge']['backend'])} / {e(metrics['judge']['model'])},
composite = {metrics['judge']['weights'][0]} × accuracy + {metrics['judge']['weights'][1]} × conciseness.</p>
<h2>Table 1</h2>
<table><tr>{''.join(f'<th>{e(h)}</th>' for h in HEADER)}</tr>{table}</table>
<p>Wilcoxon signed-rank test on the judge composite: base vs SFT p = {t['base_vs_sft_judge_p']}, SFT vs DPO p = {t['sft_vs_dpo_judge_p']}.</p>
<h2>By structure</h2><img alt="judge score by structure" src="data:image/png;base64,{pics['per_structure']}">
<h2>Score distributions</h2><img alt="score distributions" src="data:image/png;base64,{pics['distributions']}">
{expert}
<h2>Examples</h2>{''.join(examples)}
<h2>Config used</h2><pre>{e(dump_config(cfg))}</pre>
</body></html>
"""
