"""Startup kits: NVIDIA FLARE's provisioning, from the run config's `federation` section.

`nvflare provision` writes one kit per participant: the coordinator's (server certificate and
key, gRPC endpoint), each site's (client certificate and key), and the admin's (to submit the
job), all signed by one root CA; every connection is gRPC with mutual TLS. Kits are files; on
Kubernetes each becomes a Secret (`secret_manifest`) mounted where `federation.kit` points, so
no key is ever in a values file or an image.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import yaml

from cmevlm.config import RunConfig
from cmevlm.errors import ConfigError, MissingInput
from cmevlm.storage import join

ADMIN_ORG = "consortium"
# Secure aggregation's keys (FLARE's HEBuilder, its defaults): one CKKS context for the
# consortium; each site's kit holds it with the secret key (client_context.tenseal), the
# coordinator's without (server_context.tenseal): it can add ciphertexts, never read them.
HE_BUILDER = {"path": "nvflare.lighter.impl.he.HEBuilder",
              "args": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40, "scheme": "CKKS"}}
HE_CONTEXT = {"server": "server_context.tenseal", "client": "client_context.tenseal"}


def admin_name(cfg: RunConfig) -> str:
    return f"admin@{cfg.federation.name}.local"


def org_of(site: str) -> str:
    """A site's organisation in its certificate (FLARE allows letters, digits and _ there)."""
    return "".join(ch if ch.isalnum() else "_" for ch in site)


def kits_dir(cfg: RunConfig) -> Path:
    f = cfg.federation
    return Path(f.kits if Path(f.kits).is_absolute() else join(cfg.workdir, f.kits))


def kit_of(cfg: RunConfig, participant: str) -> Path:
    """A participant's kit: federation.kit for this participant, else <kits>/<participant>."""
    f = cfg.federation
    if f.kit and participant in (f.site, f.server_host):
        return Path(f.kit)
    return kits_dir(cfg) / participant


def project(cfg: RunConfig) -> dict:
    """The provisioning project: the coordinator, every site, one admin; gRPC with mutual TLS."""
    f = cfg.federation
    if not f.sites:
        raise ConfigError("federation.sites is empty: name every site of the consortium")
    return {
        "api_version": 3, "name": f.name, "description": "cmevlm consortium",
        "participants": [{"name": f.server_host, "type": "server", "org": ADMIN_ORG, "fed_learn_port": f.port},
                         *({"name": s, "type": "client", "org": org_of(s)} for s in f.sites),
                         {"name": admin_name(cfg), "type": "admin", "org": ADMIN_ORG, "role": "project_admin"}],
        "builders": [{"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
                     {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config", "scheme": "grpc"}},
                     *([HE_BUILDER] if f.secure_aggregation else []),
                     {"path": "nvflare.lighter.impl.cert.CertBuilder"},
                     {"path": "nvflare.lighter.impl.signature.SignatureBuilder"}],
    }


def provision(cfg: RunConfig) -> Path:
    """Write every participant's kit under <kits>/ (a no-op when they exist); returns the folder."""
    out = kits_dir(cfg)
    names = [cfg.federation.server_host, *cfg.federation.sites, admin_name(cfg)]
    if all((out / n / "startup").is_dir() for n in names):
        if cfg.federation.secure_aggregation and not (out / cfg.federation.server_host / "startup" / HE_CONTEXT["server"]).exists():
            raise ConfigError(f"federation.secure_aggregation is on but the kits in {out} hold no encryption keys: provision them "
                              "again with it on (delete the folder first)")
        return out
    work = out.parent / (out.name + ".provision")
    work.mkdir(parents=True, exist_ok=True)
    (work / "project.yml").write_text(yaml.safe_dump(project(cfg), sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "nvflare.cli", "provision", "-p", str(work / "project.yml"), "-w", str(work / "ws")],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise ConfigError(f"nvflare provision failed: {run.stdout[-2000:]}{run.stderr[-2000:]}")
    prod = sorted((work / "ws" / cfg.federation.name).glob("prod_*"))[-1]
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        if not (out / n).exists():
            (prod / n).rename(out / n)
    return out


def require_kit(path: Path, what: str) -> Path:
    if not (path / "startup").is_dir():
        raise MissingInput(f"{what}: no startup kit at {path} (provision with `cmevlm federate --provision`, or mount its Secret there)")
    return path


def secret_manifest(kit: Path, name: str, namespace: str | None = None) -> dict:
    """A Kubernetes Secret holding a kit's startup/ files (the chart mounts it as the kit)."""
    files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in sorted((kit / "startup").iterdir()) if p.is_file()}
    meta = {"name": name, "labels": {"app.kubernetes.io/part-of": "cmevlm", "cmevlm/federation-kit": kit.name}}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta, "data": files}


def write_secrets(cfg: RunConfig, out: str) -> str:
    """One Secret manifest per kit (cmevlm-kit-<participant>) into `out`; returns the folder."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for kit in sorted(p for p in kits_dir(cfg).iterdir() if (p / "startup").is_dir()):
        name = "cmevlm-kit-" + kit.name.replace("@", "-at-").replace(".", "-").replace("_", "-").lower()
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(secret_manifest(kit, name), sort_keys=False))
    return str(folder)
