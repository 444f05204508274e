"""`cmevlm federate`: the coordinator. `cmevlm site`: a site. Both on NVIDIA FLARE.

The coordinator starts FLARE's server from its startup kit (gRPC, mutual TLS), writes the
initial trainable tensors (cmevlm.federation.state), submits one FedAvg job with its admin kit
(FLARE's FedAvgRecipe: rounds of weighted averaging of what the sites send, weighted by their
example counts, then one distribution round), waits, and writes the consortium model
(<workdir>/models/federated) and report (<workdir>/consortium/). A site runs its ingest and
teach stages (skipped when complete), then FLARE's client from its kit, which runs the job's
client script (cmevlm.federation.site_app) in the site's own process and Ray cluster.
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


def build_recipe(cfg: RunConfig, initial: str):
    """The FedAvg job: the initial tensors, the site script, DP (when on) then the audit on
    each site's results, the round log on the coordinator's inputs."""
    from nvflare.app_common.filters.svt_privacy import SVTPrivacy
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.client.config import TransferType

    from cmevlm.federation import filters

    f = cfg.federation
    launcher = local_dir(cfg, "coordinator") / "cmevlm_site.py"  # outside any package: FLARE ships it as is
    launcher.write_text("from cmevlm.federation.site_app import main\n\nmain()\n")
    recipe = FedAvgRecipe(
        name=f"{f.name}-sft", min_clients=f.min_sites or len(f.sites), num_rounds=f.rounds + 1,
        model={"class_path": "cmevlm.federation.state.TrainableState",
               "args": {"uri": initial, "endpoint": cfg.storage.endpoint, "region": cfg.storage.region}},
        train_script=str(launcher), launch_external_process=True, command="python3 -u",
        params_transfer_type=TransferType.DIFF if f.dp else TransferType.FULL)
    if f.dp:
        d = f.dp
        recipe.add_client_output_filter(SVTPrivacy(fraction=d.fraction, epsilon=d.epsilon, noise_var=d.noise_var, gamma=d.gamma, tau=d.tau),
                                        tasks=[TASK])
    recipe.add_client_output_filter(filters.SiteAudit(), tasks=[TASK])
    recipe.add_server_input_filter(filters.RoundLog(initial, cfg.storage.endpoint, cfg.storage.region), tasks=[TASK])
    return recipe


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
    data = torch.load(files[-1], map_location="cpu", weights_only=False)
    return from_numpy(data.get("model", data))


def rounds(round_log: Path) -> list[dict]:
    rows = [json.loads(x) for x in round_log.read_text().splitlines() if x.strip()] if round_log.exists() else []
    return sorted(rows, key=lambda r: (r.get("round") or 0, r.get("site") or ""))


def server_kit(cfg: RunConfig) -> Path:
    """The coordinator's kit (provisioned only when the kits folder does not exist: mounted
    Secrets are never overwritten)."""
    f = cfg.federation
    if not f.sites:
        raise ConfigError("federation.sites is empty: name every site of the consortium")
    if not f.kit and not kits.kits_dir(cfg).exists():
        kits.provision(cfg)
    return kits.require_kit(kits.kit_of(cfg, f.server_host), "federate")


def write_initial(cfg: RunConfig) -> str:
    """The initial trainable tensors in the run's storage, where the server reads them
    wherever it runs; returns their URI. Loads the base model: only the submitter needs it."""
    from safetensors.torch import save

    from cmevlm.federation.state import initial_state

    initial = join(cfg.workdir, "federation", "initial.safetensors")
    Storage(cfg.storage).write_bytes(initial, save(initial_state(cfg)))
    return initial


def serve(cfg: RunConfig, kit: Path):
    """FLARE's server from its kit, listening; returns the process."""
    from cmevlm.federation.filters import ROUND_LOG_ENV

    work = local_dir(cfg, "coordinator")
    os.environ[ROUND_LOG_ENV] = str(work / "rounds.jsonl")  # the server process and its jobs inherit it
    server = processes.start_server(kit, work / "server", kits.ADMIN_ORG, work / "server.log")
    processes.wait_port(cfg.federation.server_host, cfg.federation.port, server)
    return server


def submit(cfg: RunConfig, initial: str) -> dict:
    """Submit the job to the running server, wait, write the consortium model and summary."""
    from safetensors.torch import save_file

    from cmevlm.federation.state import save_model

    work = local_dir(cfg, "coordinator")
    (work / "rounds.jsonl").unlink(missing_ok=True)
    admin_kit = kits.require_kit(kits.kits_dir(cfg) / kits.admin_name(cfg), "federate (admin)")
    t0 = time.time()
    try:
        result = submit_and_wait(cfg, build_recipe(cfg, initial), admin_kit)
    except RuntimeError as e:
        rejected = [f"{r['site']} round {r['round']}: {r['rejected']}" for r in rounds(work / "rounds.jsonl") if r.get("rejected")]
        raise RuntimeError(f"{e}" + (f"; updates refused: {'; '.join(rejected)}" if rejected else "")) from e
    state = global_state(result)
    save_file({k: v.contiguous() for k, v in state.items()}, str(work / "global.safetensors"))
    manifest = save_model(cfg, state, join(cfg.workdir, "models", "federated"))
    summary = {"engine": ENGINE, "seconds": round(time.time() - t0, 1), "rounds": rounds(work / "rounds.jsonl"), "model": manifest}
    Storage(cfg.storage).write_json(join(cfg.workdir, "consortium", "federation.json"), summary)
    return summary


def run(cfg: RunConfig) -> dict:
    """The whole coordinator in one process: serve, submit one job, wait, stop."""
    kit = server_kit(cfg)
    initial = write_initial(cfg)
    server = serve(cfg, kit)
    try:
        return submit(cfg, initial)
    finally:
        processes.stop(server)
