"""Connecting to Ray: the cluster of a RayJob (`ray.address: auto`) or a local one."""

from __future__ import annotations

import logging
import os
import sys

from cmevlm.config import RayConfig

log = logging.getLogger(__name__)

# Settings for this stack that must be in place before torch or Ray start, measured on 2-core
# machines: tiny models run 100x slower with two BLAS threads per process on two busy cores;
# Ray must not report usage or (2.60) ask for auth tokens on a local cluster; nothing may reach
# a model hub; DeepSpeed's CPU comm op is compiled once by `make install` into the environment.
# The one place they are applied: apply_env_defaults (the CLI, the tests, the benches, connect).
ENV_DEFAULTS = {
    "OMP_NUM_THREADS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TORCH_EXTENSIONS_DIR": os.path.join(sys.prefix, "torch_extensions"),
}


def apply_env_defaults() -> None:
    """ENV_DEFAULTS into os.environ, where not set already; call before torch or Ray are imported."""
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def connect(cfg: RayConfig):
    """Initialise Ray once per process (a no-op when already initialised); returns `ray`."""
    import ray

    if ray.is_initialized():
        return ray
    apply_env_defaults()
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
