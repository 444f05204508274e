"""What the teacher and the judges are told (paper, Section 2.2).

The teacher (a cloud LLM) never sees the image: it gets a system prompt, the student's
instruction (cmevlm/instructions.py), and a text context built from the item's metadata and
mask geometry (plus, optionally, the binary mask). The judges get text only.
"""

from __future__ import annotations

from cmevlm.anatomy import STRUCTURES
from cmevlm.instructions import Template


SYSTEM_PROMPT = (
    "You are an expert colorectal surgeon specialised in Complete Mesocolic Excision (CME), writing "
    "reference answers for a surgical vision-language model. The model will see a laparoscopic frame "
    "with one anatomical structure highlighted by a green overlay; you will not see the frame, only the "
    "facts below and, when attached, the binary mask of the structure (white = structure). Write the "
    "answer the model should give. Start by naming the highlighted structure and the side of the CME "
    "(left or right). Be concise (2-4 sentences), factual and specific to CME; no hedging, no filler, "
    "no disclaimers. Answer in JSON: {\"answer\": \"...\"}."
)


def phase_words(phase: str) -> str:
    return phase.replace("_", " ") if phase and phase != "unknown" else "an unspecified phase"


def teacher_context(item: dict, geometry_text: str, send_mask: bool) -> str:
    """The text the teacher reads about one item: metadata and where the mask lies."""
    s = STRUCTURES.get(item["structure"])
    name = s.display if s else item["structure"].replace("_", " ")
    side = item["laterality"] if item["laterality"] in ("left", "right") else "unspecified"
    lines = [
        "Procedure: Complete Mesocolic Excision (CME), laparoscopic.",
        f"Side: {side} CME.",
        f"Surgical phase: {phase_words(item['phase'])}.",
        f"Highlighted structure: {name}.",
        f"Mask geometry: {geometry_text}",
    ]
    if send_mask:
        lines.append("The attached image is the binary mask of the highlighted structure (white = structure).")
    return "\n".join(lines)


def teacher_prompt(item: dict, template: Template, geometry_text: str, send_mask: bool) -> str:
    """The whole user turn sent to the teacher for one item."""
    return (
        f"{teacher_context(item, geometry_text, send_mask)}\n\n"
        f"Instruction the model receives with the frame: \"{template.text}\"\n"
        "Write the model's expert answer to that instruction."
    )


# ---------------------------------------------------------------------------------------------
# The judge of the preference stage (paper, Step 2): text only, never an image.

LETTERS = ("A", "B", "C", "D", "E")

JUDGE_SYSTEM_PROMPT = (
    "You are an expert colorectal surgeon specialised in Complete Mesocolic Excision (CME), judging "
    "answers that a surgical vision-language model gave about a laparoscopic frame in which one structure "
    "is highlighted. You do not see the frame; you get the facts, the expert ground-truth answer and five "
    "model answers A-E. Judge clinical accuracy (the right structure, the right side, correct CME "
    "significance) first and relevance and concision second. Answer in JSON: {\"accepted\": one of A-E, or "
    "\"ground_truth\" when every model answer is worse than it; \"rejected\": the worst of A-E; "
    "\"strict\": true when accepted is really better than rejected, false when they are equally good; "
    "\"reason\": one sentence}. accepted and rejected must differ."
)


def judge_prompt(structure: str, laterality: str, instruction: str, ground_truth: str, answers: list[str]) -> str:
    s = STRUCTURES.get(structure)
    name = s.display if s else structure.replace("_", " ")
    lines = [
        f"Highlighted structure: {name}.",
        f"Side: {laterality} CME.",
        f"Instruction: \"{instruction}\"",
        f"Ground truth: \"{ground_truth}\"",
        *[f"Answer {letter}: \"{text}\"" for letter, text in zip(LETTERS, answers)],
        "Name the accepted and the rejected answer.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The judge of the evaluation stage: one answer against the ground truth, text only.

SCORE_SYSTEM_PROMPT = (
    "You are an expert colorectal surgeon specialised in Complete Mesocolic Excision (CME), grading one answer "
    "of a surgical vision-language model about a laparoscopic frame with one structure highlighted. You do not "
    "see the frame. Compare the answer with the expert ground truth. Score clinical/factual accuracy 1-5 (the right "
    "structure, its position and side, its significance in CME; 1 = wrong structure) and conciseness 1-5 (5 = "
    "short, no repetition or filler). Answer in JSON: {\"accuracy\": int, \"conciseness\": int, \"reason\": one sentence}."
)


def score_prompt(structure: str, laterality: str, instruction: str, ground_truth: str, answer: str) -> str:
    s = STRUCTURES.get(structure)
    name = s.display if s else structure.replace("_", " ")
    return "\n".join([
        f"Highlighted structure: {name}.",
        f"Side: {laterality} CME.",
        f"Instruction: \"{instruction}\"",
        f"Ground truth: \"{ground_truth}\"",
        f"Answer: \"{answer}\"",
        "Score the answer.",
    ])
