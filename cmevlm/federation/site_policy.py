"""What a site lets the consortium's coordinator run: only this package's own job, as installed.

The coordinator writes the job (its components, the command each site runs), so a hostile or
compromised coordinator could send any code. Every site therefore starts FLARE's client with
its own policy in its workspace's `local/` (written by `cmevlm site` at each start, never taken
from the kit or the job):

- `authorization.json`: no role has FLARE's `byoc` right, so a job that carries code (an app
  `custom/` folder) is refused by FLARE itself; only the admin role `lead` may submit; no
  shell commands.
- `resources.json`: FLARE's enforced class allow-list plus exactly the classes this job uses,
  and `JobGuard`, which FLARE asks before it builds each of the job's components at the site
  (its BEFORE_BUILD_COMPONENT event): each component must be one of ALLOWED, with only the
  argument names listed there, and the executor's command must be exactly
  `python3 -u -m cmevlm.federation.site_app sft|dpo VERSION` (the installed package's module;
  the job refuses to run when VERSION, the coordinator's, is not the site's, `site_app.main`). Anything else is refused before it is
  built, and nothing of the job runs.

The job's settings that matter at a site (learning rate, local steps, what is trainable, the
data) come from the site's own run config, never from the job; the coordinator decides only
the phase and the number of rounds, which the site also checks (`site_app.check_job`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

log = logging.getLogger(__name__)

PHASES = ("sft", "dpo")
COMMAND = ["python3", "-u", "-m", "cmevlm.federation.site_app"]  # + the phase and the coordinator's package version
# The components the consortium's job may build at a site, each with the argument names it may set.
ALLOWED = {
    "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor":
        {"execution_mode", "command", "shutdown_timeout", "params_exchange_format", "params_transfer_type", "launch_timeout",
         "server_expected_format", "memory_gc_rounds", "cuda_empty_cache", "heartbeat_timeout", "task_wait_timeout"},
    "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent": {"events_to_convert", "fed_event_prefix"},
    "cmevlm.federation.filters.SiteAudit": set(),
    # FLARE adds it to every job: the job's error log (error_log.txt) streamed to the server.
    "nvflare.app_common.logging.job_log_streamer.JobLogStreamer": {"target_parent_server", "log_file_name"},
    "nvflare.app_common.filters.svt_privacy.SVTPrivacy": {"fraction", "epsilon", "noise_var", "gamma", "tau", "data_kinds", "replace"},
    "nvflare.app_opt.he.model_encryptor.HEModelEncryptor": {"tenseal_context_file", "encrypt_layers", "aggregation_weights",
                                                             "weigh_by_local_iter", "data_kinds"},
    "nvflare.app_opt.he.model_decryptor.HEModelDecryptor": {"tenseal_context_file", "data_kinds"},
}
VERSION = re.compile(r"[0-9][0-9A-Za-z.+-]{0,40}")
GUARD_PATH = "cmevlm.federation.site_policy.JobGuard"


def package_version() -> str:
    from importlib.metadata import version

    return version("cmevlm")


def job_command(phase: str) -> list[str]:
    """What every site runs for a job of `phase`: the installed module, with this package's version."""
    return [*COMMAND, phase, package_version()]


def refusal(config) -> str | None:
    """Why a component of the job may not be built at this site, or None."""
    if not isinstance(config, dict) or "path" not in config:
        return None  # not a component (a plain value of the configuration)
    path, args = config.get("path"), config.get("args") or {}
    if path not in ALLOWED:
        return f"component {path!r} is not one of the consortium job's own"
    if not isinstance(args, dict):
        return f"{path}: arguments are not a mapping"
    unknown = sorted(set(args) - ALLOWED[path])
    if unknown:
        return f"{path}: settings {unknown} are not allowed at this site"
    if path.endswith("ClientAPIExecutor"):
        command = args.get("command")
        if not (isinstance(command, list) and len(command) == len(COMMAND) + 2 and command[:len(COMMAND)] == COMMAND
                and command[-2] in PHASES and VERSION.fullmatch(str(command[-1]))):
            return f"the job's command {command!r} is not `{' '.join(COMMAND)} sft|dpo VERSION` (the installed package's job)"
        if args.get("execution_mode", "external_process") != "external_process":
            return f"execution_mode {args.get('execution_mode')!r}: the job runs as its own process only"
    return None


class JobGuard(FLComponent):
    """The site's check of each component of a job before FLARE builds it (see the module)."""

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != EventType.BEFORE_BUILD_COMPONENT:
            return
        why = refusal(fl_ctx.get_prop(FLContextKey.COMPONENT_CONFIG))
        if why:
            log.error("site policy refused a job's component: %s", why)
            fl_ctx.set_prop(FLContextKey.COMPONENT_BUILD_ERROR, f"site policy: {why}", private=True, sticky=False)


def authorization() -> dict:
    """FLARE's authorization policy of a site: nobody may bring code; only `lead` submits."""
    none = {"submit_job": "none", "clone_job": "none", "manage_job": "none", "download_job": "none", "view": "any",
            "operate": "none", "shell_commands": "none", "byoc": "none", "server-predeployed-flwr": "none"}
    return {"format_version": "1.0", "permissions": {
        "project_admin": dict(none), "org_admin": {**none, "operate": "o:site"},
        "lead": {**none, "submit_job": "any", "manage_job": "n:submitter", "download_job": "n:submitter"}, "member": {"view": "any"}}}


def resources(default: dict) -> dict:
    """The site's resources.json: FLARE's defaults, its enforced allow-list plus this job's
    classes, and the guard."""
    out = json.loads(json.dumps(default))
    out["class_list_enforcement_mode"] = "enforce"
    out["class_allow_list"] = sorted(set(out.get("class_allow_list") or []) | set(ALLOWED))
    out["components"] = [c for c in out.get("components", []) if c.get("path") != GUARD_PATH] + [{"id": "cmevlm_job_guard", "path": GUARD_PATH, "args": {}}]
    return out


def apply(workspace: Path) -> None:
    """Write this site's policy into a FLARE client workspace's local/ (every start)."""
    local = workspace / "local"
    default = json.loads((local / "resources.json.default").read_text())
    (local / "resources.json").write_text(json.dumps(resources(default), indent=2))
    (local / "authorization.json").write_text(json.dumps(authorization(), indent=2))


# The coordinator's own job, built on its side: FLARE's persistor, FedAvg and HE pieces, and
# this package's model holder, gate and aggregator (FLARE's default allow-list lacks some).
SERVER_CLASSES = ("nvflare.app_opt.pt.", "nvflare.app_common.", "nvflare.app_opt.he.", "cmevlm.federation.state.TrainableState",
                  "cmevlm.federation.filters.RoundLog", "cmevlm.federation.aggregation.BoundedAggregator")


def apply_coordinator(workspace: Path) -> None:
    """The coordinator's server workspace: FLARE's enforced allow-list plus its own job's classes
    (the job carries no code, so the allow-list applies to it)."""
    local = workspace / "local"
    out = json.loads((local / "resources.json.default").read_text())
    out["class_list_enforcement_mode"] = "enforce"
    out["class_allow_list"] = sorted(set(out.get("class_allow_list") or []) | set(SERVER_CLASSES))
    (local / "resources.json").write_text(json.dumps(out, indent=2))
