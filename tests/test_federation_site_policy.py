"""A hostile coordinator's jobs, submitted with its admin kit to a running FLARE server and two
sites (real processes, mutual TLS, each site's own policy): a job that carries code, a job
whose command is not the installed package's, a job with a component the consortium's job does
not have, and one built by another version are each refused at every site, and nothing of them
runs there. Then the sites' policy rules as pure checks."""

import json
import time
from pathlib import Path

import pytest

from cmevlm.config import load_config
from cmevlm.federation import coordinator, kits, processes, site, site_policy
from conftest import free_port

SITES = ["site-a", "site-b"]


def _cfg(work: Path, tiny_model_dir, synth_dir, port: int, site_name: str | None, kits_dir: Path | None = None):
    fed = {"sites": SITES, "rounds": 1, "dpo_rounds": 0, "local_steps": 1, "port": port, "site": site_name,
           **({"kits": str(kits_dir)} if kits_dir else {})}
    return load_config(overrides=[f"workdir={work}", f"model.base={tiny_model_dir}", f"sources=[{{uri: '{synth_dir}', site: x}}]",
                                  "ray.num_cpus=1", f"federation={json.dumps(fed)}"])


@pytest.fixture(scope="module")
def running(tmp_path_factory, tiny_model_dir, synth_dir):
    """The coordinator's server and two sites' FLARE clients, running; no job yet."""
    root, port = tmp_path_factory.mktemp("hostile-coordinator"), free_port()
    coord = _cfg(root / "coordinator", tiny_model_dir, synth_dir, port, None, root / "kits")
    sites = [_cfg(root / s, tiny_model_dir, synth_dir, port, s) for s in SITES]
    kits.enroll(coord, sites)
    server = coordinator.serve(coord, coordinator.server_kit(coord))
    clients = [site.start(c) for c in sites]
    time.sleep(5)  # the clients register
    yield root, coord, sites
    for p in (*clients, server):
        processes.stop(p)


def _marker_script(root: Path, name: str) -> str:
    return f"from pathlib import Path\nPath({str(root / name)!r}).write_text('ran')\n"


def _hostile_jobs(root: Path, coord, initial: str) -> dict:
    """name -> a FLARE recipe a hostile coordinator could submit."""
    from nvflare.app_common.widgets.event_recorder import ClientEventRecorder
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    from cmevlm.federation.filters import SiteAudit

    def base(name: str, script: Path):
        recipe = FedAvgRecipe(name=name, min_clients=2, num_rounds=2, train_script=str(script), train_args="sft",
                              launch_external_process=True, command="python3 -u",
                              model={"class_path": "cmevlm.federation.state.TrainableState", "args": {"uri": initial}})
        recipe.add_client_output_filter(SiteAudit(), tasks=["train"])  # as the consortium's job has it
        return recipe

    jobs = {}
    for name in ("custom-code", "other-command", "extra-component", "other-version"):
        script = root / f"{name}.py"
        script.write_text(_marker_script(root, f"ran-{name}"))
        jobs[name] = base(name, script)
    # The installed module's command, but something else around it:
    for name in ("other-command", "extra-component", "other-version"):
        coordinator.installed_job(jobs[name], "sft")
    client = jobs["other-command"]._job._deploy_map["@ALL"].app_config
    client.executors[0].executor._command = ["python3", "-c", _marker_script(root, "ran-other-command")]
    jobs["extra-component"]._job.to_clients(ClientEventRecorder(), id="recorder")
    jobs["other-version"]._job._deploy_map["@ALL"].app_config.executors[0].executor._command[-1] = "0.0.1"
    return jobs


def test_a_hostile_coordinators_jobs_are_refused_at_every_site_and_nothing_runs(running):
    from nvflare.recipe.prod_env import ProdEnv

    root, coord, sites = running
    initial = coordinator.write_initial(coord)
    env = ProdEnv(startup_kit_location=str(kits.kits_dir(coord) / kits.admin_name(coord)), username=kits.admin_name(coord),
                  login_timeout=30)
    for name, recipe in _hostile_jobs(root, coord, initial).items():
        run = recipe.execute(env)
        run.get_result(timeout=90)
        status = str(run.get_status())
        assert "COMPLETED" not in status, (name, status)
        assert not list(root.rglob("ran-*")), name  # no code of it ran, at a site or anywhere
        for s in sites:  # and nothing of the job trained or left the site
            assert not (Path(s.workdir) / "federation" / "rounds").exists(), name
            assert not (Path(s.workdir) / "federation" / "audit.jsonl").exists(), name
    server_log = (Path(coord.workdir) / "federation" / "coordinator" / "server.log").read_text(errors="replace")
    assert all(f"{s}: NVFLARE_ERROR: BYOC not permitted" in server_log for s in SITES)  # the job with code, by FLARE at each site
    for s in sites:  # the other three, by each site's own guard and job
        log = (Path(s.workdir) / "federation" / "site" / "client.log").read_text(errors="replace")
        assert "site policy refused a job's component: the job's command ['python3', '-c'" in log
        assert "ClientEventRecorder' is not one of the consortium job's own" in log
        assert "built by cmevlm 0.0.1, this site runs" in log


@pytest.mark.parametrize("config, why", [
    ({"path": "nvflare.app_common.widgets.event_recorder.ClientEventRecorder", "args": {}}, "not one of"),
    ({"path": "cmevlm.federation.filters.SiteAudit", "args": {"extra": 1}}, "not allowed"),
    ({"path": "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
      "args": {"command": ["python3", "-u", "-m", "cmevlm.federation.site_app", "sft; rm -rf /", "0.1.0"]}}, "command"),
    ({"path": "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
      "args": {"command": ["bash", "-c", "true"]}}, "command"),
    ({"path": "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
      "args": {"command": site_policy.job_command("sft"), "execution_mode": "in_process"}}, "own process"),
])
def test_the_site_guard_refuses_what_is_not_the_consortiums_job(config, why):
    assert why in site_policy.refusal(config)


def test_the_site_guard_admits_the_consortiums_own_job():
    for phase in ("sft", "dpo"):
        assert site_policy.refusal({"path": "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
                                    "args": {"command": site_policy.job_command(phase), "execution_mode": "external_process"}}) is None
    policy = site_policy.authorization()["permissions"]
    assert all(rights.get("byoc", "none") == "none" for rights in policy.values())  # nobody may bring code
    assert [role for role, rights in policy.items() if rights.get("submit_job", "none") != "none"] == [kits.ADMIN_ROLE]


def test_a_site_takes_no_more_rounds_than_its_own_config():
    from cmevlm.federation.site_app import check_job

    cfg = load_config(overrides=["federation={site: site-a, sites: [site-a], rounds: 3, dpo_rounds: 1}"])
    check_job(cfg, "sft", 0, 4)
    with pytest.raises(RuntimeError, match="more than this site's 4"):
        check_job(cfg, "sft", 0, 50)
    with pytest.raises(RuntimeError, match="more than this site's 2"):
        check_job(cfg, "dpo", 0, 3)
