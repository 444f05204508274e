"""The offline teacher: expert answers composed from `cmevlm/anatomy.py`, no network.

It is a stand-in for a real teacher, for demos and tests, and not a clinical source. It answers
from the payload's `facts` (structure, side, phase, region, template; for the judges the
answers and the ground truth): the same things its text says to a cloud LLM, as data, so
nothing here depends on how the prompts are worded. It varies its phrasing per item, so the
answers to different templates do not all read alike.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel

from cmevlm.anatomy import STRUCTURES
from cmevlm.instructions import TEMPLATE_BY_ID, TEMPLATES
from cmevlm.teacher.payload import Payload
from cmevlm.teacher.prompts import phase_words

OPENERS = (
    "The highlighted structure is the {name} in this {side} CME.",
    "This is the {name}, seen during a {side} CME.",
    "The green overlay marks the {name} in a {side} CME.",
)


def _pick(options, key: str, salt: str):
    h = int.from_bytes(hashlib.sha256(f"{salt}|{key}".encode()).digest()[:4], "big")
    return options[h % len(options)]


def compose_answer(structure: str, side: str, phase: str, region: str, template_id: str, key: str) -> str:
    """An expert answer covering the template's aspects, phrased per `key`."""
    s = STRUCTURES[structure]
    template = TEMPLATE_BY_ID.get(template_id, TEMPLATES[0])
    sentences = [_pick(OPENERS, key, "open").format(name=s.display, side=side)]
    for aspect in template.aspects:
        if aspect == "what":
            sentences.append(f"It is {_pick(s.what, key, 'what')}.")
        elif aspect == "significance":
            sentences.append(_cap(_pick(s.significance, key, "sig")) + ".")
        elif aspect == "neighbours":
            sentences.append(_cap(_pick(s.neighbours, key, "nb")) + ".")
        elif aspect == "location":
            sentences.append(f"It lies in the {region} of the view." if region else "It is in the centre of the view.")
            if "neighbours" not in template.aspects:
                sentences.append(_cap(_pick(s.neighbours, key, "nb")) + ".")
        elif aspect == "guidance":
            sentences.append(_cap(_pick(s.guidance, key, "guide")) + ".")
        elif aspect == "phase":
            sentences.append(f"During {phase or 'this phase'}, {_pick(s.significance, key, 'phase')}.")
    return " ".join(sentences)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _structure(facts: dict) -> str:
    if facts.get("structure") not in STRUCTURES:
        raise ValueError(f"offline teacher: no knowledge of structure {facts.get('structure')!r}")
    return facts["structure"]


def respond(payload: Payload, schema: type[BaseModel]) -> str:
    """JSON text answering `payload` in the shape of `schema`."""
    facts = payload.facts
    if schema.__name__ == "TeacherAnswer":
        side = facts.get("side") if facts.get("side") in ("left", "right") else "unspecified"
        answer = compose_answer(_structure(facts), side, phase_words(facts.get("phase") or ""), facts.get("region") or "",
                                facts.get("template_id") or "", key=payload.item_id)
        return json.dumps({"answer": answer})
    if schema.__name__ == "Verdict":
        return json.dumps(judge_verdict(facts))
    if schema.__name__ == "JudgeScore":
        return json.dumps(judge_score(facts))
    raise ValueError(f"offline backend cannot answer schema {schema.__name__}")


def judge_verdict(facts: dict) -> dict:
    """The rubric judge: score the ground truth and A-E; accept the best (earlier letter on a
    tie, the ground truth only if it beats every answer), reject the worst answer (later
    letter on a tie)."""
    from cmevlm.rubric import rubric_score

    structure, side = _structure(facts), facts.get("side", "")
    scores = {k: rubric_score(v, structure, side) for k, v in sorted(facts["answers"].items())}
    best = max(scores, key=lambda k: (scores[k], -ord(k)))
    gt_score = rubric_score(facts["ground_truth"], structure, side) if facts.get("ground_truth") is not None else -1
    accepted = "ground_truth" if gt_score > scores[best] else best
    rejected = min(scores, key=lambda k: (scores[k], -ord(k)))
    if rejected == accepted:  # every answer scored the same
        rejected = max(k for k in scores if k != accepted)
    strict = (gt_score if accepted == "ground_truth" else scores[accepted]) > scores[rejected]
    return {"accepted": accepted, "rejected": rejected, "strict": strict,
            "reason": f"rubric scores {scores}, ground truth {gt_score}: accepted {accepted}, rejected {rejected}"}


def judge_score(facts: dict) -> dict:
    """The rubric grader: accuracy from identification, side and significance; conciseness
    from length and repetition."""
    from cmevlm.rubric import identifies, mentions_significance, repetition_rate, stated_side

    structure, side, answer = _structure(facts), facts.get("side", ""), facts.get("answer", "")
    acc = 3 + (stated_side(answer) == side) + mentions_significance(answer, structure) if identifies(answer, structure) else 1
    n = len(answer.split())
    conc = 5 if 8 <= n <= 60 else 4 if 4 <= n <= 90 else 2
    conc = max(1, conc - int(round(repetition_rate(answer) * 10)))
    return {"accuracy": acc, "conciseness": conc, "reason": f"rubric: accuracy {acc}, conciseness {conc}"}
