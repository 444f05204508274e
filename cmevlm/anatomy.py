"""The five anatomical landmarks of Complete Mesocolic Excision (CME) and what is said about them.

These facts feed the synthetic data, the locally trained tokenizer, the offline teacher and the
rubric judge. They are a stand-in written for software testing, summarised from the surgical
literature the paper cites; they are not a clinical source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

LATERALITIES = ("left", "right")

# Phases of a CME procedure as recorded in procedures.csv.
PHASES = (
    "medial_to_lateral_dissection",
    "central_vascular_ligation",
    "mesocolic_mobilisation",
)


@dataclass(frozen=True)
class Structure:
    """One landmark: its id, how people name it, and the facts an expert would state."""

    name: str  # the id used in file names, datasets and configs
    display: str  # how a surgeon writes it
    synonyms: tuple[str, ...]  # other names an answer may use (lower case)
    what: tuple[str, ...]  # what it is (several phrasings)
    significance: tuple[str, ...]  # why it matters in CME
    neighbours: tuple[str, ...]  # what lies next to it
    guidance: tuple[str, ...]  # how to dissect near it
    side_note: dict[str, str] = field(default_factory=dict)  # laterality -> remark


def _load_structures() -> dict[str, Structure]:
    data = yaml.safe_load((Path(__file__).parent / "anatomy.yaml").read_text())
    out = {}
    for d in data["structures"]:
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        out[d["name"]] = Structure(**d)
    return out


# The knowledge base itself is data, in cmevlm/anatomy.yaml.
STRUCTURES: dict[str, Structure] = _load_structures()

STRUCTURE_NAMES = tuple(STRUCTURES)

# DSAD (Dresden Surgical Anatomy Dataset) folder names. Only `pancreas` is one of ours; the
# other DSAD structures are kept under their own names and flagged as not in the CME set.
DSAD_TO_CME = {"pancreas": "pancreas"}
DSAD_STRUCTURES = (
    "abdominal_wall", "colon", "inferior_mesenteric_artery", "intestinal_veins", "liver",
    "pancreas", "small_intestine", "spleen", "stomach", "ureter", "vesicular_glands",
)


def names_for(structure: str) -> tuple[str, ...]:
    """Every lower-case name by which an answer may refer to `structure`."""
    s = STRUCTURES[structure]
    return (s.display.lower(), s.name.replace("_", " "), *s.synonyms)


def corpus_lines() -> list[str]:
    """All domain text, for training a tokenizer that knows the vocabulary of CME."""
    lines = ["complete mesocolic excision", "CME", "left CME", "right CME", *PHASES]
    for s in STRUCTURES.values():
        lines += [s.display, s.name, *s.synonyms, *s.what, *s.significance, *s.neighbours, *s.guidance]
    return lines
