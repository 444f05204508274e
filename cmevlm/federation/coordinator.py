"""`cmevlm federate`: the coordinator. `cmevlm site`: a site. Both on NVIDIA FLARE.

The coordinator starts FLARE's server from its startup kit (gRPC, mutual TLS), writes the
initial trainable tensors (cmevlm.federation.state), submits a FedAvg job with its admin kit
(FLARE's FedAvgRecipe, or its HE recipe under secure aggregation: rounds of averaging of what
the sites send, weighted by their example counts, then one distribution round), waits, and
writes the consortium model (<workdir>/models/federated; under secure aggregation only the
sites can decrypt it); then, with federation.dpo_rounds, a second job of DPO rounds from that
model (models/federated-dpo), and the summary (<workdir>/consortium/). A site runs its ingest
and teach stages (skipped when complete), then FLARE's client from its kit, which runs the
job's client script (cmevlm.federation.site_app) in the site's own process and Ray cluster.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from cmevlm.config import RunConfig
from cmevlm.errors import ConfigError
from cmevlm.federation import kits, processes
from cmevlm.storage import Storage, join

log = logging.getLogger(__name__)

ENGINE = "nvflare"
TASK = "train"  # the task FLARE's FedAvg sends each round


def local_dir(cfg: RunConfig, *parts: str) -> Path:
    """A local folder for FLARE's own workspaces (they are processes' files, never S3)."""
    root = Path(cfg.workdir) if "://" not in cfg.workdir else Path.home() / ".cache" / "cmevlm" / "federation"
    p = root.joinpath("federation", *parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def build_recipe(cfg: RunConfig, initial: str, phase: str = "sft"):
    """The FedAvg job of a phase (sft or dpo): the initial tensors, the site script with the
    phase as its argument; on each site's results DP (when on) or FLARE's homomorphic
    encryptor (secure aggregation: its HE recipe) and then the audit, the last before sending;
    the round log and gate on the coordinator's inputs."""
    from nvflare.app_common.filters.svt_privacy import SVTPrivacy
    from nvflare.client.config import TransferType

    from cmevlm.federation import filters

    f = cfg.federation
    launcher = local_dir(cfg, "coordinator") / "cmevlm_site.py"  # FLARE's recipe wants a script; the job ships none (installed_job)
    launcher.write_text("from cmevlm.federation.site_app import main\n\nmain()\n")
    if f.secure_aggregation:
        from nvflare.app_opt.pt.recipes.fedavg_he import FedAvgRecipeWithHE as Recipe
    else:
        from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe as Recipe
    recipe = Recipe(
        name=f"{f.name}-{phase}", min_clients=f.min_sites or len(f.sites), num_rounds=(f.rounds if phase == "sft" else f.dpo_rounds) + 1,
        model={"class_path": "cmevlm.federation.state.TrainableState",
               "args": {"uri": initial, "endpoint": cfg.storage.endpoint, "region": cfg.storage.region}},
        train_script=str(launcher), train_args=phase, launch_external_process=True, command="python3 -u",
        params_transfer_type=TransferType.DIFF if f.dp else TransferType.FULL,
        **({} if f.secure_aggregation else {"aggregator": bounded_aggregator(cfg, initial)}))
    if f.dp:
        d = f.dp
        recipe.add_client_output_filter(SVTPrivacy(fraction=d.fraction, epsilon=d.epsilon, noise_var=d.noise_var, gamma=d.gamma, tau=d.tau),
                                        tasks=[TASK])
    recipe.add_client_output_filter(filters.SiteAudit(), tasks=[TASK])
    recipe.add_server_input_filter(filters.RoundLog(initial, cfg.storage.endpoint, cfg.storage.region, f.secure_aggregation), tasks=[TASK])
    return installed_job(recipe, phase)


def installed_job(recipe, phase: str):
    """The job without code: no script and no copy of this package's modules travel in it (a
    site refuses a job that carries code); each site runs its installed
    `cmevlm.federation.site_app` with the phase and this package's version (site_policy)."""
    from cmevlm.federation.site_policy import job_command

    job = recipe._job  # FLARE's recipe builds the FedJob; it has no public setter for these two
    job.job.set_app_packages(["cmevlm"])
    for app in job._deploy_map.values():
        config = app.app_config
        if hasattr(config, "executors"):
            config.ext_scripts = []
            for e in config.executors:
                e.executor._command = job_command(phase)
    return recipe


def bounded_aggregator(cfg: RunConfig, initial: str):
    """The coordinator's aggregation with each site's influence bounded (cmevlm.federation.aggregation)."""
    from cmevlm.federation.aggregation import BoundedAggregator

    f = cfg.federation
    return BoundedAggregator(initial, cfg.storage.endpoint, cfg.storage.region, f.aggregation, f.trim_fraction, f.max_update_norm,
                             f.clip_to_median, f.enrolled_examples, f.max_examples)


def submit_and_wait(cfg: RunConfig, recipe, admin_kit: Path) -> Path:
    """Submit with the admin kit, wait for the job to end, download its result folder."""
    from nvflare.recipe.prod_env import ProdEnv

    env = ProdEnv(startup_kit_location=str(admin_kit), username=kits.admin_name(cfg), login_timeout=30)
    run = recipe.execute(env)
    log.info("federate: job %s submitted", run.get_job_id())
    result = run.get_result(timeout=cfg.federation.timeout_s)
    status = run.get_status()
    if not result or "FINISHED:COMPLETED" not in str(status):
        raise RuntimeError(f"the federated job ended as {status} (result: {result})")
    return Path(result)


def global_state(result: Path) -> dict:
    """The coordinator's final global tensors, from the persistor's file in the job result."""
    import torch

    from cmevlm.federation.state import from_numpy

    files = sorted(result.rglob("FL_global_model.pt"))
    if not files:
        raise RuntimeError(f"no FL_global_model.pt under {result}")
    data = torch.load(files[-1], map_location="cpu", weights_only=True)  # tensors and plain containers only: no pickled code
    return from_numpy(data.get("model", data))


def rounds(round_log: Path) -> list[dict]:
    rows = [json.loads(x) for x in round_log.read_text().splitlines() if x.strip()] if round_log.exists() else []
    return sorted(rows, key=lambda r: (r.get("round") or 0, r.get("site") or ""))


def server_kit(cfg: RunConfig) -> Path:
    """The coordinator's kit (its own part provisioned when there is no kit: a mounted Secret
    is never overwritten)."""
    f = cfg.federation
    if not f.sites:
        raise ConfigError("federation.sites is empty: name every site of the consortium")
    if not f.kit and not (kits.kit_of(cfg, f.server_host) / "startup").is_dir():
        kits.provision(cfg)
    return kits.require_kit(kits.kit_of(cfg, f.server_host), "federate")


def write_initial(cfg: RunConfig, phase: str = "sft") -> str:
    """A phase's initial trainable tensors in the run's storage, where the server reads them
    wherever it runs; returns their URI. Loads the phase's base (DPO's: the consortium's SFT
    model this coordinator kept): only the submitter needs it."""
    from safetensors.torch import save

    from cmevlm.federation.state import initial_state

    initial = join(cfg.workdir, "federation", f"initial-{phase}.safetensors")
    Storage(cfg.storage).write_bytes(initial, save(initial_state(cfg, phase)))
    return initial


def serve(cfg: RunConfig, kit: Path):
    """FLARE's server from its kit, listening; returns the process."""
    from cmevlm.federation.filters import ROUND_LOG_ENV

    work = local_dir(cfg, "coordinator")
    os.environ[ROUND_LOG_ENV] = str(work / "rounds.jsonl")  # the server process and its jobs inherit it
    server = processes.start_server(kit, work / "server", kits.ADMIN_ORG, work / "server.log")
    processes.wait_port(cfg.federation.server_host, cfg.federation.port, server)
    return server


def submit(cfg: RunConfig, initial: str, phase: str = "sft") -> dict:
    """Submit a phase's job to the running server, wait, write the phase's consortium model;
    returns its summary (every round record tagged with the phase)."""
    from safetensors.torch import save_file

    from cmevlm.federation.state import save_model

    work = local_dir(cfg, "coordinator")
    (work / "rounds.jsonl").unlink(missing_ok=True)
    admin_kit = kits.require_kit(kits.kits_dir(cfg) / kits.admin_name(cfg), "federate (admin)")
    t0 = time.time()
    try:
        result = submit_and_wait(cfg, build_recipe(cfg, initial, phase), admin_kit)
    except RuntimeError as e:
        rejected = [f"{r['site']} round {r['round']}: {r['rejected']}" for r in rounds(work / "rounds.jsonl") if r.get("rejected")]
        raise RuntimeError(f"{phase}: {e}" + (f"; updates refused: {'; '.join(rejected)}" if rejected else "")) from e
    manifest = None
    if not cfg.federation.secure_aggregation:  # encrypted, the global tensors are the sites' alone
        state = global_state(result)
        save_file({k: v.contiguous() for k, v in state.items()}, str(work / f"global-{phase}.safetensors"))
        manifest = save_model(cfg, state, phase)
    return {"seconds": round(time.time() - t0, 1), "rounds": [{**r, "phase": phase} for r in rounds(work / "rounds.jsonl")],
            "model": manifest}


def submit_all(cfg: RunConfig, initial: str | None = None) -> dict:
    """The consortium's jobs in order, SFT then (federation.dpo_rounds > 0) DPO from the SFT
    result; writes <workdir>/consortium/federation.json and returns it."""
    from cmevlm.federation.state import last_phase

    phases = ("sft", "dpo") if last_phase(cfg) == "dpo" else ("sft",)
    jobs = {}
    for phase in phases:
        jobs[phase] = submit(cfg, initial if phase == "sft" and initial else write_initial(cfg, phase), phase)
    summary = {"engine": ENGINE, "phases": list(phases), "seconds": round(sum(j["seconds"] for j in jobs.values()), 1),
               "rounds": [r for j in jobs.values() for r in j["rounds"]], "models": {p: j["model"] for p, j in jobs.items()}}
    Storage(cfg.storage).write_json(join(cfg.workdir, "consortium", "federation.json"), summary)
    return summary


def run(cfg: RunConfig) -> dict:
    """The whole coordinator in one process: serve, submit the jobs, wait, stop."""
    kit = server_kit(cfg)
    initial = write_initial(cfg)
    server = serve(cfg, kit)
    try:
        return submit_all(cfg, initial)
    finally:
        processes.stop(server)
