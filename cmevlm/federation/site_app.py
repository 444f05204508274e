"""The consortium job's client script: what a site does in each round (NVIDIA FLARE Client API).

The site's FLARE client (started by `cmevlm site`) launches it as a process of its own (through
a two-line launcher the job carries), with the site's run config in CMEVLM_SITE_CONFIG: its
workdir, its data, its Ray cluster. In-process, torch's import raced FLARE's own threads. Each round it receives the global
trainable tensors, trains `federation.local_steps` of SFT on its own `sft/train` through the
same Ray Train stage as `cmevlm sft` (cmevlm.train.sft.local_round), and sends back only the
trained tensors, their example count (FedAvg's weight) and its training loss. In the last
round (the distribution round) it trains nothing: it evaluates the consortium model on its own
test set, keeps it as <workdir>/models/federated, and sends its metrics with the tensors
unchanged. Frames, composites and masks never enter a message: the site's audit records every
message before it leaves (cmevlm.federation.filters.SiteAudit).
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("cmevlm.federation.site")


def train_round(cfg, state: dict, rnd: int) -> tuple[dict, dict]:
    """(trained tensors, metrics) of one round at this site."""
    from safetensors.torch import load, save

    from cmevlm.federation.state import federated_cfg
    from cmevlm.storage import Storage, join
    from cmevlm.train.sft import local_round

    c = federated_cfg(cfg)
    init = join(cfg.workdir, "federation", "rounds", f"r{rnd:03d}", "global.safetensors")
    Storage(cfg.storage).write_bytes(init, save({k: v.contiguous() for k, v in state.items()}))
    t0 = time.time()
    trained, final = local_round(c, init, f"federated-sft-r{rnd:03d}")
    return load(trained), {"train_seconds": round(time.time() - t0, 2), "steps": final["global_step"], "loss": final["loss"]}


def distribute(cfg, state: dict) -> dict:
    """The last round: keep the consortium model and evaluate it on this site's test set."""
    from cmevlm.federation.scoring import score_model
    from cmevlm.federation.state import save_model
    from cmevlm.storage import join

    out = join(cfg.workdir, "models", "federated")
    save_model(cfg, state, out)
    return score_model(cfg, out)


def examples(cfg) -> int:
    from cmevlm.storage import Storage, stage_uri

    return Storage(cfg.storage).read_parquet(stage_uri(cfg, cfg.sft.data), columns=["item_id"]).num_rows


def main() -> None:
    import nvflare.client as flare
    from nvflare.apis.fl_constant import FLMetaKey

    from cmevlm.cluster import apply_env_defaults, connect
    from cmevlm.config import RunConfig
    from cmevlm.federation.processes import SITE_CONFIG_ENV
    from cmevlm.federation.state import from_numpy

    apply_env_defaults()
    cfg = RunConfig.model_validate_json(os.environ[SITE_CONFIG_ENV])
    connect(cfg.ray)
    flare.init()
    n = examples(cfg)
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        rnd, total = received.current_round, received.total_rounds
        state = from_numpy(received.params)
        if rnd == total - 1:
            metrics, out = {"phase": "distribute", **distribute(cfg, state)}, state
        else:
            out, metrics = train_round(cfg, state, rnd)
            metrics["phase"] = "train"
        log.info("site %s round %d/%d: %s", cfg.federation.site, rnd + 1, total, metrics)
        flare.send(flare.FLModel(params={k: v.float() for k, v in out.items()}, metrics={**metrics, "examples": n},
                                 meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: n}))


if __name__ == "__main__":
    main()
