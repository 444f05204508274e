"""Rubric measures of an answer, without any LLM: does it name the highlighted structure, state
the right side, say why it matters in CME, repeat itself. The offline judge and the evaluation
stage both use them. Pure functions on text.
"""

from __future__ import annotations

import re

from cmevlm.anatomy import STRUCTURES, names_for

_WORD = re.compile(r"[a-z']+")
_STOP = {"the", "a", "an", "of", "and", "in", "to", "it", "is", "its", "this", "that", "on", "for", "with", "by", "be", "as", "at", "or", "so"}


def mentioned_structures(text: str) -> list[str]:
    """The five structures in the order the text first names them (synonyms included)."""
    low = text.lower()
    hits = []
    for s in STRUCTURES:
        pos = [low.find(n) for n in names_for(s) if n in low]
        if pos:
            hits.append((min(pos), s))
    return [s for _, s in sorted(hits)]


def identifies(text: str, structure: str) -> bool:
    """The answer names the highlighted structure, and no other of the five comes first (the
    one an answer names first is the one it calls highlighted)."""
    m = mentioned_structures(text)
    return bool(m) and m[0] == structure


def stated_side(text: str) -> str | None:
    """'left' or 'right' as the answer states the side of the CME, else None."""
    m = re.search(r"\b(left|right)\b(?:[- ]sided)?\s+(?:cme|colectomy|hemicolectomy|side)", text.lower())
    if m:
        return m.group(1)
    m = re.search(r"\b(left|right)\b", text.lower())
    return m.group(1) if m else None


def laterality_error(text: str, laterality: str) -> bool:
    """The answer states a side and it is the wrong one."""
    side = stated_side(text)
    return side is not None and laterality in ("left", "right") and side != laterality


def _content(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 2}


def mentions_significance(text: str, structure: str) -> bool:
    """Shares at least three content words with one of the structure's CME-significance facts."""
    words = _content(text)
    return any(len(words & _content(fact)) >= 3 for fact in STRUCTURES[structure].significance + STRUCTURES[structure].guidance)


def repetition_rate(text: str) -> float:
    """Fraction of word trigrams that occur more than once."""
    w = _WORD.findall(text.lower())
    grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def rubric_score(text: str, structure: str, laterality: str) -> float:
    """A 0-5 accuracy score: identification 2, side 1, significance 1, concise and not
    repetitive 1."""
    score = 2.0 * identifies(text, structure)
    side = stated_side(text)
    score += 1.0 if side == laterality else 0.0
    score += 1.0 * mentions_significance(text, structure) if structure in STRUCTURES else 0.0
    n = len(_WORD.findall(text))
    score += 1.0 if 8 <= n <= 90 and repetition_rate(text) < 0.1 else 0.0
    return score
