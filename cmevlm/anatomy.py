"""The five anatomical landmarks of Complete Mesocolic Excision (CME) and what is said about them.

These facts feed the synthetic data, the locally trained tokenizer, the offline teacher and the
rubric judge. They are a stand-in written for software testing, summarised from the surgical
literature the paper cites; they are not a clinical source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


STRUCTURES: dict[str, Structure] = {
    s.name: s
    for s in (
        Structure(
            name="preparation_plane",
            display="preparation plane",
            synonyms=("embryological plane", "mesocolic plane", "dissection plane", "toldt's fascia plane"),
            what=(
                "the avascular embryological plane between the mesocolic fascia and the retroperitoneum",
                "the bloodless areolar layer that separates the mesocolon from Toldt's fascia",
            ),
            significance=(
                "staying in this plane keeps the mesocolic envelope intact, which is the core oncological goal of CME",
                "dissection along it removes the mesocolon with its lymph nodes in one intact package",
            ),
            neighbours=(
                "the mesocolic fascia lies on one side and Toldt's fascia over the retroperitoneum on the other",
                "it runs over the retroperitoneal structures such as the ureter and gonadal vessels",
            ),
            guidance=(
                "follow the light areolar tissue with gentle traction and sharp dissection",
                "keep the mesocolic fascia intact and avoid breaching into the retroperitoneum",
            ),
        ),
        Structure(
            name="angels_hair",
            display="angel's hair",
            synonyms=("angel hair", "angels hair", "areolar strands", "fine areolar tissue"),
            what=(
                "the fine white areolar strands that appear when the correct embryological plane is opened",
                "loose cobweb-like connective tissue fibres bridging the mesocolon and the retroperitoneum",
            ),
            significance=(
                "its appearance confirms that the dissection is in the correct bloodless plane",
                "seeing it tells the surgeon the mesocolic envelope is being preserved",
            ),
            neighbours=(
                "it bridges the mesocolic fascia and Toldt's fascia",
                "it lies within the preparation plane itself",
            ),
            guidance=(
                "divide the strands close to the retroperitoneal side under tension",
                "keep the strands under gentle traction so the plane opens without bleeding",
            ),
        ),
        Structure(
            name="inferior_mesenteric_vein",
            display="inferior mesenteric vein",
            synonyms=("imv", "inferior mesenteric v"),
            what=(
                "the vein draining the left colon that runs upward lateral to the duodenojejunal flexure",
                "a dark bluish vessel ascending towards the splenic vein at the inferior border of the pancreas",
            ),
            significance=(
                "high ligation of this vein at the inferior border of the pancreas is part of central vascular ligation",
                "it is a key landmark for mobilising the splenic flexure and the left mesocolon",
            ),
            neighbours=(
                "it lies lateral to the duodenojejunal flexure and below the pancreas",
                "the inferior border of the pancreas and the duodenojejunal flexure are close by",
            ),
            guidance=(
                "identify it before ligation and divide it at the inferior border of the pancreas",
                "avoid tearing it during traction because bleeding obscures the plane",
            ),
        ),
        Structure(
            name="duodenum",
            display="duodenum",
            synonyms=("duodenal", "duodenal loop", "duodenal wall"),
            what=(
                "the C-shaped first part of the small bowel lying in the retroperitoneum",
                "the retroperitoneal duodenal loop exposed beneath the mesocolon",
            ),
            significance=(
                "it must be identified and protected when the mesocolon is lifted off the retroperitoneum",
                "injury to it is a serious complication, so it marks a zone of careful dissection",
            ),
            neighbours=(
                "the head of the pancreas lies within its curve",
                "it lies beneath the transverse mesocolon next to the pancreatic head",
            ),
            guidance=(
                "lift the mesocolon gently off its surface and avoid thermal injury",
                "use blunt dissection close to it and keep energy devices away",
            ),
        ),
        Structure(
            name="pancreas",
            display="pancreas",
            synonyms=("pancreatic", "pancreatic head", "pancreatic body", "pancreatic tail"),
            what=(
                "the yellowish lobulated gland lying in the retroperitoneum",
                "the retroperitoneal gland whose lower border guides central vascular ligation",
            ),
            significance=(
                "its border marks the upper limit of mesocolic dissection and the level of central ligation",
                "exposing it safely defines the root of the mesocolon during CME",
            ),
            neighbours=(
                "the duodenum curves around its head and the mesenteric vessels run at its lower border",
                "the inferior mesenteric vein and the splenic vein run close to its lower border",
            ),
            guidance=(
                "stay on its surface without entering the gland to avoid bleeding and leaks",
                "dissect along its lower border and protect its capsule",
            ),
        ),
    )
}

STRUCTURE_NAMES = tuple(STRUCTURES)

# DSAD (Dresden Surgical Anatomy Dataset) folder names. Only `pancreas` is one of ours; the
# other DSAD structures are kept under their own names and flagged as not in the CME set.
DSAD_TO_CME = {"pancreas": "pancreas"}
DSAD_STRUCTURES = (
    "abdominal_wall", "colon", "inferior_mesenteric_artery", "intestinal_veins", "liver",
    "pancreas", "small_intestine", "spleen", "stomach", "ureter", "vesicular_glands",
)


def is_cme_structure(name: str) -> bool:
    return name in STRUCTURES


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
