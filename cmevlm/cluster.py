"""Connecting to Ray: the cluster of a RayJob (`ray.address: auto`) or a local one."""

from __future__ import annotations

import logging
import os
import sys

from cmevlm.config import RayConfig

log = logging.getLogger(__name__)

# Settings for this stack that must be in place before torch or Ray start, measured on 2-core
# machines: tiny models run 100x slower with two BLAS threads per process on two busy cores;
# Ray must not report usage; nothing may reach a model hub; DeepSpeed's CPU comm op is compiled
# once by `make install` into the environment. The one place they are applied:
# apply_env_defaults (the CLI, the tests, the benches, connect). Ray's authentication is not
# among them: a local Ray gets a token of its own (`connect`), a cluster's comes from its pods.
ENV_DEFAULTS = {
    "OMP_NUM_THREADS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TORCH_EXTENSIONS_DIR": os.path.join(sys.prefix, "torch_extensions"),
    # Ray Train waits this long for its workers' placement group before an attempt fails (and
    # the group is removed). Its 60 s default is shorter than a GPU pod's start on an
    # autoscaled cluster (node provisioning, image pull): every attempt would fail while the
    # nodes come up. Ray Train passes it from the driver to its controller.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900",
}


def apply_env_defaults() -> None:
    """ENV_DEFAULTS into os.environ, where not set already, and token auth for a Ray this process
    may start (no RAY_ADDRESS: not a job on a cluster); call before torch or Ray are imported
    (Ray's driver reads its auth mode when `ray` is imported)."""
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if not os.environ.get("RAY_ADDRESS"):
        local_token_auth()


def local_token_auth() -> None:
    """Token authentication for a Ray this process starts: Ray's GCS and raylet listen on every
    interface (measured: `_node_ip_address=127.0.0.1` does not change that), so without a token
    anything that reaches this machine could submit code next to the frames. A fresh random
    token per Ray, in this process's environment (Ray's own workers and our subprocesses inherit
    it), unless the caller set Ray's auth already (a cluster's pods carry KubeRay's token, which
    this never replaces)."""
    import secrets

    if not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def connect(cfg: RayConfig):
    """Initialise Ray once per process (a no-op when already initialised); returns `ray`."""
    apply_env_defaults()  # before `import ray`: the driver reads its auth mode then
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # a RayJob's submitter sets RAY_ADDRESS
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
    log.info("ray: %s", ray.cluster_resources())
    if not log.isEnabledFor(logging.DEBUG):
        # Ray Data logs every operator's progress at INFO when stdout is not a terminal; keep
        # the stage's own lines readable (-v shows everything). Terminal progress bars remain.
        import ray.data  # noqa: F401  (configures its loggers on import)

        logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray
