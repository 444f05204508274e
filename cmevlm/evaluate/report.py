"""eval/report.html (self-contained: plots and images embedded) and eval/report.md."""

from __future__ import annotations

import base64
import io

from cmevlm.config import RunConfig, dump_config
from cmevlm.evaluate.metrics import format_p
from cmevlm.storage import Storage, join

COLUMNS = (("bleu4", "BLEU-4"), ("bertscore_f1", "BERTScore F1"), ("judge", "Judge (1-5)"))


def _fmt(ms: dict | None, digits=3) -> str:
    """mean ± std, with the 95 % bootstrap interval of the mean when there is one."""
    if not ms or ms.get("mean") is None:
        return "-"
    text = f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"
    if ms.get("ci95"):
        lo, hi = ms["ci95"]
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text


ORDER = ("base", "sft", "dpo")


def model_order(models) -> list[str]:
    """base, sft, dpo first (the paper's order), then any others by name."""
    return sorted(models, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def table_rows(metrics: dict) -> list[list[str]]:
    """The Table-1 layout: one row per model."""
    rows = []
    for m in model_order(metrics["models"]):
        s = metrics["models"][m]
        rows.append([m, str(s["n"]), *[_fmt(s[k], 2 if k == "judge" else 3) for k, _ in COLUMNS],
                     f"{s['structure_accuracy']:.2f}", f"{s['laterality_error_rate']:.2f}"])
    return rows


HEADER = ["model", "n", *[f"{h} (95% CI)" for _, h in COLUMNS], "structure accuracy", "laterality errors"]


def tests_text(metrics: dict) -> str:
    """The Wilcoxon line: p to 3 significant digits, `< 0.001`, or why it was not computed."""
    t, why = metrics["tests"], metrics.get("tests_not_computed", {})
    p = {k: format_p(t.get(k), why.get(k)) for k in ("base_vs_sft_judge_p", "sft_vs_dpo_judge_p")}
    return (f"Wilcoxon signed-rank test on the judge composite: base vs SFT p = {p['base_vs_sft_judge_p']}, "
            f"SFT vs DPO p = {p['sft_vs_dpo_judge_p']}.")


def left_out_text(metrics: dict) -> str | None:
    """Models missing from this report, and answers the judge left unscored (blocked or failed)."""
    gone, unscored = metrics.get("left_out") or {}, metrics.get("judge_failed") or {}
    lines = ["Left out (missing when this report was written): " + ", ".join(f"{n} ({u})" for n, u in gone.items())] if gone else []
    if any(unscored.values()):
        lines.append(f"Unscored by the judge: {unscored.get('blocked', 0)} blocked by the model (not retried), "
                     f"{unscored.get('failed', 0)} failed; they are left out of the judge columns.")
    return " ".join(lines) or None


def decoding_text(metrics: dict) -> str:
    """Every decoding setting the answers were generated with, one mode a line."""
    keys = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
    return "\n".join(f"{mode}: " + ", ".join(f"{k}={s.get(k)}" for k in keys)
                     for mode, s in (metrics.get("decoding") or {}).items())


def _plain(table: list[list[str]]) -> str:
    rows = [HEADER, *table]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def summary_text(metrics: dict) -> str:
    """Plain-text Table 1 (greedy decoding) for terminals."""
    return _plain(table_rows(metrics))


def sampled(metrics: dict) -> list[dict]:
    """Table 1 and the tests once per sampling mode (`evaluate.sampling`): [{mode, table, tests}]."""
    return [{"mode": mode, "table": table_rows(part), "tests": tests_text(part)}
            for mode, part in (metrics.get("sampled") or {}).items()]


def sampled_text(metrics: dict) -> str:
    """The sampled-mode tables for terminals ("" when only greedy decoding was evaluated)."""
    return "\n\n".join(f"under sampling ({s['mode']}):\n{_plain(s['table'])}\n{s['tests']}" for s in sampled(metrics))


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
    """report.md and report.html; plots and examples show the greedy answers, the sampled
    modes get their own Table 1 and tests."""
    out = join(cfg.workdir, "eval")
    rows = [r for r in rows if r.get("mode", "greedy") == "greedy"]
    st.write_text(join(out, "report.md"), markdown(metrics))
    st.write_text(join(out, "report.html"), render_html(cfg, metrics, rows, items))


def markdown(metrics: dict) -> str:
    lines = [f"# cmevlm evaluation ({metrics['n_test']} test items)", "", "Greedy decoding:", "", "| " + " | ".join(HEADER) + " |",
             "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(metrics)]
    models = model_order(metrics["models"])
    lines += ["", "## Judge composite by structure", "", "| structure | " + " | ".join(models) + " |",
              "|---|" + "---|" * len(models)]
    for s, per in metrics["per_structure"].items():
        lines.append(f"| {s} | " + " | ".join(_fmt(per[m]["judge"], 2) for m in models) + " |")
    lines += ["", tests_text(metrics)]
    for s in sampled(metrics):
        lines += ["", f"## Under sampling ({s['mode']})", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in s["table"]] + ["", s["tests"]]
    if left_out_text(metrics):
        lines += ["", left_out_text(metrics)]
    if metrics.get("decoding"):
        lines += ["", "## Decoding settings", "", "```", decoding_text(metrics), "```"]
    if metrics.get("expert"):
        lines += ["", "## Expert", "", "| model | score | preferred |", "|---|---|---|"]
        lines += [f"| {m} | {_fmt(v['score'], 2)} | {v['preferred']} |" for m, v in metrics["expert"].items()]
    return "\n".join(lines) + "\n"


def render_html(cfg: RunConfig, metrics: dict, rows: list[dict], items: dict[str, dict]) -> str:
    from cmevlm.evaluate.templating import render

    examples = []
    for item_id in list(items)[: cfg.evaluate.report_examples]:
        it, mine = items[item_id], [r for r in rows if r["item_id"] == item_id]
        examples.append({
            "image": base64.b64encode(it["images"][0]["bytes"]).decode(), "structure": it["structure"].replace("_", " "),
            "laterality": it["laterality"], "prompt": mine[0]["prompt"], "ground_truth": mine[0]["ground_truth"],
            "answers": [{"model": r["model"], "judge": r["judge"] if r["judge"] is not None else "-", "answer": r["answer"]} for r in mine]})
    expert = [{"model": m, "score": _fmt(v["score"], 2), "preferred": v["preferred"]} for m, v in (metrics.get("expert") or {}).items()]
    return render("report.html", m=metrics, header=HEADER, table=table_rows(metrics), pics=plots(metrics, rows),
                  expert=expert, examples=examples, config=dump_config(cfg), tests=tests_text(metrics), left_out=left_out_text(metrics),
                  sampled=sampled(metrics), decoding=decoding_text(metrics))
