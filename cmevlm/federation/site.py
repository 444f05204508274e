"""`cmevlm site`: one hospital of the consortium.

It runs the site's own ingest and teach stages (skipped when complete: frames and masks never
leave, the teacher sees only text and binary masks, as in a single-site run), then NVIDIA
FLARE's client from the site's startup kit, which connects to the coordinator over gRPC with
mutual TLS and runs the consortium's job (cmevlm.federation.site_app) in this site's own
process and Ray cluster. It stays up for the next job (a Deployment on Kubernetes); `--once`
stops it when this site has kept the consortium's last model (after DPO when
federation.dpo_rounds, else after SFT).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cmevlm.config import RunConfig
from cmevlm.errors import ConfigError
from cmevlm.federation import kits, processes
from cmevlm.federation.coordinator import local_dir
from cmevlm.storage import Storage, join

log = logging.getLogger(__name__)


def prepare(cfg: RunConfig) -> None:
    """The site's ingest and teach, as today (each skipped when complete)."""
    from cmevlm import pipeline

    pipeline.run(cfg, start="ingest", stop="teach", echo=lambda line: log.info("site %s: %s", cfg.federation.site, line))


def start(cfg: RunConfig):
    """FLARE's client of this site, from its kit; returns the process."""
    f = cfg.federation
    if not f.site:
        raise ConfigError("federation.site is not set: name this site (one of the consortium's federation.sites)")
    kit = kits.require_kit(Path(f.kit).resolve() if f.kit else kits.kit_of(cfg, f.site), f"site {f.site}")
    work = local_dir(cfg, "site")
    return processes.start_site(kit, work / "client", f.site, kits.org_of(f.site), cfg.model_dump_json(), work / "client.log")


def kept_since(cfg: RunConfig, t0: float) -> bool:
    """Whether this site has kept the consortium's last model (DPO's with federation.dpo_rounds,
    else SFT's) written after `t0`."""
    from cmevlm.federation.state import OUTPUT, last_phase

    m = Storage(cfg.storage).read_manifest(join(cfg.workdir, OUTPUT[last_phase(cfg)]))
    return bool(m) and m.get("created_unix", 0) >= t0


def run(cfg: RunConfig, once: bool = False, poll_s: float = 2.0) -> int:
    prepare(cfg)
    t0 = time.time()
    proc = start(cfg)
    try:
        while proc.poll() is None:
            if once and kept_since(cfg, t0):
                return 0
            time.sleep(poll_s)
        return proc.returncode or 0
    finally:
        processes.stop(proc)
