"""What the student is asked: the instruction templates (paper, Section 2.2).

The student (the local VLM) sees the composite image and one of these instructions, in
training (teach assigns one per item), in evaluation, and when served (`/v1/explain` asks the
first unless the request brings its own question). The teacher is given the same instruction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    template_id: str
    text: str  # what the student is asked
    aspects: tuple[str, ...]  # what a good answer covers, in order (used by the offline teacher)


TEMPLATES: tuple[Template, ...] = (
    Template("identify_significance", "Identify the highlighted anatomical structure and explain its significance for Complete Mesocolic Excision.", ("what", "significance")),
    Template("what_and_why", "What is the structure highlighted in green, and why does it matter during CME?", ("what", "significance")),
    Template("location_neighbours", "Where is the highlighted structure and what lies next to it?", ("location", "neighbours")),
    Template("dissection_caution", "What should the surgeon watch for while dissecting near the highlighted structure?", ("guidance", "significance")),
    Template("plane_guidance", "How does the highlighted structure guide the plane of dissection in this operation?", ("significance", "guidance")),
    Template("name_landmark", "Name the anatomical landmark marked by the green overlay.", ("what",)),
    Template("phase_role", "During this phase of the operation, what role does the highlighted structure play?", ("phase", "significance")),
    Template("teach_trainee", "Describe the highlighted structure as an expert surgeon would to a trainee.", ("what", "location", "guidance")),
)
TEMPLATE_BY_ID = {t.template_id: t for t in TEMPLATES}

def assign_template(item_id: str, seed: int) -> Template:
    """A template for an item: deterministic per (item, seed) and spread evenly over items."""
    h = int.from_bytes(hashlib.sha256(f"{seed}|{item_id}".encode()).digest()[:8], "big")
    return TEMPLATES[h % len(TEMPLATES)]
