"""Validation against the KubeRay CRDs in tests/crds: the RayCluster, RayJob and RayService
CustomResourceDefinitions of KubeRay v1.7.0 (ray-project/kuberay,
`ray-operator/config/crd/bases/`), unchanged but gzipped, Apache License 2.0. Each CRD is parsed
and its schema checked once per test session; checking them again for every object took ~6 s
each."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parent / "crds"


@functools.cache
def _validator(kind: str) -> jsonschema.protocols.Validator:
    f = CRDS / f"ray.io_{kind.lower()}s.yaml.gz"
    crd = yaml.load(gzip.decompress(f.read_bytes()).decode(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate_crd(obj: dict) -> None:
    """Raise jsonschema.ValidationError unless `obj` (a ray.io kind) fits its CRD's v1 schema."""
    _validator(obj["kind"]).validate(obj)
