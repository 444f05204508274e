"""Validation against the KubeRay CRDs (`../shared/crds`): each CRD is parsed and its schema
checked once per test session; checking them again for every object took ~6 s each."""

from __future__ import annotations

import functools
from pathlib import Path

import jsonschema
import pytest
import yaml

CRDS = Path(__file__).resolve().parent.parent.parent / "shared" / "crds"


@functools.cache
def _validator(kind: str) -> jsonschema.protocols.Validator | None:
    f = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not f.exists():
        return None
    crd = yaml.load(f.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate_crd(obj: dict) -> None:
    """Raise jsonschema.ValidationError unless `obj` (a ray.io kind) fits its CRD's v1 schema."""
    validator = _validator(obj["kind"])
    if validator is None:
        pytest.skip(f"KubeRay CRDs not found at {CRDS}: CRD validation skipped")
    validator.validate(obj)
