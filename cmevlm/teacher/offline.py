"""The offline teacher: expert answers composed from `cmevlm/anatomy.py`, no network.

It is a stand-in for a real teacher, for demos and tests, and not a clinical source. It reads
only the payload text (the same text a cloud LLM gets) and varies its phrasing per item, so the
answers to different templates do not all read alike.
"""

from __future__ import annotations

import hashlib
import json
import re

from pydantic import BaseModel

from cmevlm.anatomy import STRUCTURES
from cmevlm.teacher.payload import Payload
from cmevlm.teacher.prompts import TEMPLATES

OPENERS = (
    "The highlighted structure is the {name} in this {side} CME.",
    "This is the {name}, seen during a {side} CME.",
    "The green overlay marks the {name} in a {side} CME.",
)


def _field(text: str, label: str) -> str:
    m = re.search(rf"^{re.escape(label)}:\s*(.+?)\.?$", text, re.M)
    return m.group(1).strip() if m else ""


def _pick(options, key: str, salt: str):
    h = int.from_bytes(hashlib.sha256(f"{salt}|{key}".encode()).digest()[:4], "big")
    return options[h % len(options)]


def compose_answer(structure: str, side: str, phase: str, region: str, template_text: str, key: str) -> str:
    """An expert answer covering the template's aspects, phrased per `key`."""
    s = STRUCTURES[structure]
    template = next((t for t in TEMPLATES if t.text == template_text), TEMPLATES[0])
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


def _structure_from(text: str) -> str:
    name = _field(text, "Highlighted structure").lower()
    for s in STRUCTURES.values():
        if name in (s.display.lower(), s.name):
            return s.name
    raise ValueError(f"offline teacher: no knowledge of structure {name!r}")


def respond(payload: Payload, schema: type[BaseModel]) -> str:
    """JSON text answering `payload` in the shape of `schema`."""
    text = payload.text
    if schema.__name__ == "TeacherAnswer":
        side = _field(text, "Side").replace(" CME", "") or "unspecified"
        region = re.search(r"centred in the (.+?) part", text)
        instruction = re.search(r'Instruction the model receives with the frame: "(.+?)"', text)
        answer = compose_answer(
            _structure_from(text), side, _field(text, "Surgical phase"), region.group(1) if region else "",
            instruction.group(1) if instruction else "", key=payload.item_id,
        )
        return json.dumps({"answer": answer})
    if schema.__name__ == "Verdict":
        return json.dumps(judge_verdict(text))
    if schema.__name__ == "JudgeScore":
        return json.dumps(judge_score(text))
    raise ValueError(f"offline backend cannot answer schema {schema.__name__}")


def judge_verdict(text: str) -> dict:
    """The rubric judge: score the ground truth and A-E; accept the best (earlier letter on a
    tie, the ground truth only if it beats every answer), reject the worst answer (later
    letter on a tie)."""
    from cmevlm.rubric import rubric_score

    structure = _structure_from(text)
    side = _field(text, "Side").replace(" CME", "")
    answers = dict(re.findall(r'^Answer ([A-E]): "(.*)"$', text, re.M))
    gt = re.search(r'^Ground truth: "(.*)"$', text, re.M)
    scores = {k: rubric_score(v, structure, side) for k, v in sorted(answers.items())}
    best = max(scores, key=lambda k: (scores[k], -ord(k)))
    gt_score = rubric_score(gt.group(1), structure, side) if gt else -1
    accepted = "ground_truth" if gt_score > scores[best] else best
    rejected = min(scores, key=lambda k: (scores[k], -ord(k)))
    if rejected == accepted:  # every answer scored the same
        rejected = max(k for k in scores if k != accepted)
    return {"accepted": accepted, "rejected": rejected,
            "reason": f"rubric scores {scores}, ground truth {gt_score}: accepted {accepted}, rejected {rejected}"}


def judge_score(text: str) -> dict:
    """The rubric grader: accuracy from identification, side and significance; conciseness
    from length and repetition."""
    from cmevlm.rubric import identifies, laterality_error, mentions_significance, repetition_rate, stated_side

    structure = _structure_from(text)
    side = _field(text, "Side").replace(" CME", "")
    m = re.search(r'^Answer: "(.*)"$', text, re.M)
    answer = m.group(1) if m else ""
    acc = 1
    if identifies(answer, structure):
        acc = 3 + (stated_side(answer) == side) + mentions_significance(answer, structure)
    elif laterality_error(answer, side):
        acc = 1
    n = len(answer.split())
    conc = 5 if 8 <= n <= 60 else 4 if 4 <= n <= 90 else 2
    conc = max(1, conc - int(round(repetition_rate(answer) * 10)))
    return {"accuracy": acc, "conciseness": conc, "reason": f"rubric: accuracy {acc}, conciseness {conc}"}
