"""`cmevlm demo --consortium`: three synthetic hospitals that see different data, each alone and
together.

    site-a  left CME only, all five structures, grey instruments
    site-b  right CME only, all five structures, grey instruments
    site-c  right CME only, three structures (no preparation plane, no angel's hair), dark instruments

Each site gets its own workdir, synthetic source and ingest + teach (as `cmevlm site` runs them).
Then a local-only model per site (its SFT alone, as many steps as it trains in the consortium),
and the federated model: the coordinator and the three sites as separate NVIDIA FLARE
processes over gRPC with mutual TLS, `federation.rounds` rounds of FedAvg of SFT, then
`federation.dpo_rounds` of DPO on each site's own preferences. Every local model is
evaluated on every site's test set; the federated one by each site on its own (the
distribution round). <workdir>/consortium/report.json and report.html hold the cross-site
table, the rounds, the bytes per round and the scan of every message for image bytes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cmevlm.config import FederationConfig, RunConfig, Source
from cmevlm.data.synth import SiteStyle

log = logging.getLogger(__name__)

SITES = (
    SiteStyle("site-a", ("left",)),
    SiteStyle("site-b", ("right",)),
    SiteStyle("site-c", ("right",), ("inferior_mesenteric_vein", "duodenum", "pancreas"), (70, 62, 58)),
)
# A real consortium starts from a pretrained Qwen2.5-VL; the tiny base has random weights. The
# demo first gives it a short public pretraining on a fourth synthetic set (both sides, every
# structure, grey instruments: what public data would show) so that it plays that part, then
# every site fine-tunes from it. Measured while choosing (2 cores): from random weights,
# centralised training on all three sites' data needs ~300 steps of 32 (~9,600 examples) for
# 0.87-0.99 held-out structure accuracy, and FedAvg from random weights got 0.22-0.58 on sites
# a and b within the 15 minutes, whatever the rounds, steps and learning rate tried.
PUBLIC = SiteStyle("public")
PROCEDURES, FRAMES, PUBLIC_PROCEDURES = 12, 16, 24
PRETRAIN = {"per_device_batch_size": 32, "effective_batch_size": 32, "lr": 3e-3, "max_steps": 420}
# The tiny base cannot learn through a LoRA adapter alone (random weights under it), so the
# demo trains and averages every component (sft.freeze=none, federation.trainable=full); a
# real pretrained base uses the default LoRA.
FEDERATION = {"rounds": 4, "dpo_rounds": 1, "local_steps": 15, "trainable": "full", "capture_messages": True}
SFT = {"num_workers": 1, "zero_stage": 0, "per_device_batch_size": 8, "effective_batch_size": 8, "lr": 1e-3, "freeze": "none"}
# Federated DPO after the SFT rounds: each site samples 48 of its own pool items five times with
# the consortium's SFT model and its offline judge picks; gentle, as in the main demo.
DPO = {"num_workers": 1, "zero_stage": 0, "per_device_batch_size": 8, "effective_batch_size": 8, "lr": 5e-6}
SAMPLE = {"limit": 48, "batch_size": 16}


def site_config(base: RunConfig, root: Path, style: SiteStyle) -> RunConfig:
    c = base.model_copy(deep=True)
    work = root / "sites" / style.site
    c.workdir, c.model.base = str(work), str(root / "models" / "pretrained")
    c.sources = [Source(uri=str(work / "synth"), layout="cmevlm", site=style.site)]
    c.federation = FederationConfig(site=style.site, sites=[s.site for s in SITES], **FEDERATION)  # its kit under its own workdir
    for section, values in ((c.sft, SFT), (c.dpo, DPO), (c.sample, SAMPLE)):
        for k, v in values.items():
            setattr(section, k, v)
    c.ray.num_cpus = 1
    return c


def coordinator_config(base: RunConfig, root: Path) -> RunConfig:
    c = site_config(base, root, SITES[0])
    c.workdir, c.sources = str(root), []
    c.federation.site, c.federation.kits = None, str(root / "kits")
    return c


def pretrain(cfg: RunConfig, root: Path) -> str:
    """The public pretraining of the random tiny base (see PUBLIC): its own synthetic set,
    ingest, teach and SFT, exported as <root>/models/pretrained. Skipped when there."""
    import shutil

    from cmevlm.storage import Storage
    from cmevlm.train import sft

    out = root / "models" / "pretrained"
    if Storage().is_complete(str(out)):
        return str(out)
    c = site_config(cfg, root, PUBLIC)
    c.workdir, c.model.base = str(root / "public"), str(root / "models" / "base")
    c.sources = [Source(uri=str(root / "public" / "synth"), layout="cmevlm", site=PUBLIC.site)]
    prepare_sites([c], cfg.seed + 1000, (PUBLIC,), PUBLIC_PROCEDURES)
    for k, v in PRETRAIN.items():
        setattr(c.sft, k, v)
    c.sft.scheduler, c.sft.checkpoint_every = "cosine", PRETRAIN["max_steps"]
    sft.run(c)
    shutil.copytree(root / "public" / "models" / "sft", out)
    return str(out)


def prepare_sites(cfgs: list[RunConfig], seed: int, styles=SITES, procedures: int = PROCEDURES) -> None:
    """Synthetic data and the local ingest + teach of every site (each skipped when there)."""
    from cmevlm.data.synth import write_dataset
    from cmevlm.federation.site import prepare

    for i, (c, style) in enumerate(zip(cfgs, styles)):
        src = Path(c.sources[0].uri)
        if not (src / "procedures.csv").exists():
            write_dataset(src, procedures=procedures, frames_per_procedure=FRAMES, seed=seed + 100 * i, style=style)
        prepare(c)


def train_local(c: RunConfig) -> str:
    """The site's model trained on its own data alone, as many steps as in the consortium."""
    from cmevlm.storage import join
    from cmevlm.train import sft

    local = c.model_copy(deep=True)
    local.sft.output, local.sft.max_steps = "models/local", c.federation.rounds * c.federation.local_steps
    local.sft.scheduler, local.sft.warmup_ratio = "constant", 0.0  # as the federated rounds train
    local.sft.checkpoint_every = local.sft.max_steps
    sft.run(local)
    return join(c.workdir, "models/local")


def federate(coord: RunConfig, cfgs: list[RunConfig]) -> dict:
    """The coordinator and the three sites as their own processes, the SFT job then the DPO job
    (skipped when the coordinator has written its summary and last model)."""
    from cmevlm.federation import coordinator, kits, processes, site
    from cmevlm.federation.state import OUTPUT, last_phase
    from cmevlm.storage import Storage, join

    st = Storage(coord.storage)
    done = join(coord.workdir, "consortium", "federation.json")
    if st.exists(done) and st.is_complete(join(coord.workdir, OUTPUT[last_phase(coord)])):
        log.info("federate: %s exists, skipped", done)
        return st.read_json(done)

    kits.enroll(coord, cfgs)  # each site's key made and kept in its own folder; the coordinator signs
    procs = [site.start(c) for c in cfgs]
    try:
        return coordinator.run(coord)
    finally:
        for p in procs:
            processes.stop(p)


def cross_evaluate(cfgs: list[RunConfig], local_models: dict[str, str]) -> dict:
    """Every local-only model on every site's test set."""
    from cmevlm.federation.scoring import score_model, test_items

    tests = {c.federation.site: (c, test_items(c)) for c in cfgs}
    return {m: {s: score_model(c, uri, items) for s, (c, items) in tests.items()} for m, uri in local_models.items()}


def run(cfg: RunConfig, workdir: str = "runs/consortium") -> dict:
    from cmevlm.config import absolute_paths
    from cmevlm.federation import report
    from cmevlm.model.tiny import build_tiny_model

    root = Path(workdir).resolve()
    t0 = time.time()
    if not (root / "models" / "base" / "config.json").exists():
        build_tiny_model(root / "models" / "base", seed=cfg.seed)
    cfgs = [absolute_paths(site_config(cfg, root, s)) for s in SITES]
    coord = absolute_paths(coordinator_config(cfg, root))
    timings = {}
    pretrain(absolute_paths(cfg.model_copy(deep=True)), root)
    timings["public_pretraining"] = time.time() - t0
    prepare_sites(cfgs, cfg.seed)
    timings["sites_ready"] = time.time() - t0 - timings["public_pretraining"]
    local = {c.federation.site: train_local(c) for c in cfgs}
    timings["local_models"] = time.time() - t0 - timings["sites_ready"] - timings["public_pretraining"]
    fed = federate(coord, cfgs)
    timings["federation"] = fed["seconds"]
    cross = cross_evaluate(cfgs, {**local, "pretrained": str(root / "models" / "pretrained")})
    pretrained = cross.pop("pretrained")
    timings["total"] = time.time() - t0
    return report.write(coord, cfgs, fed, cross, {k: round(v, 1) for k, v in timings.items()}, pretrained)
