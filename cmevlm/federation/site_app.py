"""The consortium job's client script: what a site does in each round (NVIDIA FLARE Client API).

The site's FLARE client (started by `cmevlm site`) launches it as a process of its own (through
a two-line launcher the job carries), with the site's run config in CMEVLM_SITE_CONFIG: its
workdir, its data, its Ray cluster (in-process, torch's import raced FLARE's own threads). The
job's phase is its argument: sft, then (a second job) dpo. Each round it receives the global
trainable tensors, trains `federation.local_steps` of the phase on its own data through the
same Ray Train stage as `cmevlm sft` / `cmevlm dpo` (their `local_round`), and sends back only
the trained tensors, their example count (FedAvg's weight) and its training loss. Before its
first DPO round it builds its preferences: the consortium's SFT model answers the site's own
pool five times and its judge picks (text only). In the last round (the distribution round) it
trains nothing: it evaluates the consortium model on its own test set, keeps it
(models/federated after SFT, models/federated-dpo after DPO), and sends its metrics with the
tensors unchanged. Frames, composites and masks never enter a message: the site's audit records every
message before it leaves (cmevlm.federation.filters.SiteAudit).
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("cmevlm.federation.site")


def train_round(cfg, state: dict, rnd: int, phase: str) -> tuple[dict, dict]:
    """(trained tensors, metrics) of one round of `phase` at this site."""
    from safetensors.torch import load, save

    from cmevlm.federation.state import federated_cfg
    from cmevlm.storage import Storage, join
    from cmevlm.train import dpo, sft

    c = federated_cfg(cfg, phase)
    init = join(cfg.workdir, "federation", "rounds", phase, f"r{rnd:03d}", "global.safetensors")
    Storage(cfg.storage).write_bytes(init, save({k: v.contiguous() for k, v in state.items()}))
    t0 = time.time()
    trained, final = (sft if phase == "sft" else dpo).local_round(c, init, f"federated-{phase}-r{rnd:03d}")
    return load(trained), {"train_seconds": round(time.time() - t0, 2), "steps": final["global_step"], "loss": final["loss"]}


def preferences(cfg) -> dict:
    """DPO's data at this site, before its first DPO round: the consortium's SFT model answers
    the site's own pool five times and the site's judge picks (text only), as `cmevlm sample`
    and `cmevlm prefer` do; rebuilt for each job (the model is new)."""
    from cmevlm import prefer, sample
    from cmevlm.federation.state import OUTPUT

    c = cfg.model_copy(deep=True)
    c.sample.model = OUTPUT["sft"]
    t0 = time.time()
    sample.run(c, force=True)
    m = prefer.run(c, force=True)
    return {"pairs": m["pairs"], "preference_seconds": round(time.time() - t0, 2)}


def distribute(cfg, state: dict, phase: str) -> dict:
    """The last round: keep the consortium model and evaluate it on this site's test set."""
    from cmevlm.federation.scoring import score_model
    from cmevlm.federation.state import OUTPUT, save_model
    from cmevlm.storage import stage_uri

    save_model(cfg, state, phase)
    return score_model(cfg, stage_uri(cfg, OUTPUT[phase]))


def examples(cfg, phase: str) -> int:
    from cmevlm.federation.state import stage_of
    from cmevlm.storage import Storage, stage_uri

    return Storage(cfg.storage).read_parquet(stage_uri(cfg, stage_of(cfg, phase).data), columns=["item_id"]).num_rows


def answer(cfg, received, phase: str, state: dict, ready: dict, seen: dict) -> tuple[dict, dict]:
    """(tensors, metrics) this site sends for one received round."""
    rnd, total = received.current_round, received.total_rounds
    check_job(cfg, phase, rnd, total)
    check_global(cfg, state, seen.get(phase), rnd)
    seen[phase] = state
    if rnd == total - 1:
        return state, {"phase": "distribute", **distribute(cfg, state, phase)}
    if phase == "dpo" and not ready:
        ready.update(preferences(cfg))
    out, metrics = train_round(cfg, state, rnd, phase)
    check_finite(cfg, out, rnd, metrics)
    return out, {"phase": "train", **metrics, **ready}


def check_job(cfg, phase: str, rnd, total) -> None:
    """The coordinator decides a job's rounds: this site takes at most its own config's
    (federation.rounds or dpo_rounds, + the distribution round)."""
    f = cfg.federation
    most = (f.rounds if phase == "sft" else f.dpo_rounds) + 1
    if not isinstance(total, int) or not isinstance(rnd, int) or not 0 <= rnd < total <= most:
        raise RuntimeError(f"site {f.site}: a {phase} job of {total} rounds (round {rnd}) is more than this site's {most}: refused")


def check_global(cfg, state: dict, last: dict | None, rnd: int) -> None:
    """A site applies the coordinator's bounds to what comes back: a global model with
    non-finite values, other tensors than the last round's, or (with federation.max_update_norm)
    further from the last global than one bounded round can move it, is refused before this
    site trains on it or keeps it (under secure aggregation only the sites can see the values)."""
    import torch

    site, bound = cfg.federation.site, cfg.federation.max_update_norm
    bad = sorted(k for k, v in state.items() if not torch.isfinite(v).all())
    if bad:
        raise RuntimeError(f"site {site}: round {rnd}'s global model has non-finite values ({bad[0]}, ...): refused")
    if last is None:
        return
    if {k: tuple(v.shape) for k, v in state.items()} != {k: tuple(v.shape) for k, v in last.items()}:
        raise RuntimeError(f"site {site}: round {rnd}'s global model has other tensors than the last round's: refused")
    moved = float(sum(torch.sum((state[k].double() - last[k].double()) ** 2) for k in state) ** 0.5)
    if bound is not None and moved > bound * (1 + 1e-3):
        raise RuntimeError(f"site {site}: round {rnd}'s global model moved {moved:.4g} from the last, more than "
                           f"federation.max_update_norm {bound:g}: refused")


def check_finite(cfg, tensors: dict, rnd: int, metrics: dict) -> None:
    """A round that trained to NaN / inf fails at the site, loudly, instead of being sent (the
    coordinator would refuse it; FLARE's DP filter never ends on one)."""
    import torch

    bad = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if bad:
        raise RuntimeError(f"site {cfg.federation.site}: round {rnd} trained {len(bad)} non-finite tensors ({bad[0]}, ...; "
                           f"loss {metrics.get('loss')}): not sent")


def main() -> None:
    """argv[1] = the job's phase: sft (the default) or dpo."""
    import sys

    import nvflare.client as flare
    from nvflare.apis.fl_constant import FLMetaKey

    from cmevlm.cluster import apply_env_defaults, connect
    from cmevlm.config import RunConfig
    from cmevlm.federation.processes import SITE_CONFIG_ENV
    from cmevlm.federation.site_policy import package_version
    from cmevlm.federation.state import TRAINING_PHASES, from_numpy

    phase, version = (sys.argv[1:] + ["", ""])[:2]
    if phase not in TRAINING_PHASES:
        raise SystemExit(f"the job's phase must be one of {TRAINING_PHASES}, not {phase!r}")
    if version != package_version():
        raise SystemExit(f"the coordinator's job was built by cmevlm {version or '(unknown)'}, this site runs {package_version()}: "
                         "refused (install the consortium's version)")
    apply_env_defaults()
    cfg = RunConfig.model_validate_json(os.environ[SITE_CONFIG_ENV])
    connect(cfg.ray)
    flare.init()
    ready: dict = {}
    seen: dict = {}
    n = 0
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        out, metrics = answer(cfg, received, phase, from_numpy(received.params), ready, seen)
        n = n or examples(cfg, phase)  # once per job: DPO's pairs exist after its first round
        log.info("site %s %s round %d/%d: %s", cfg.federation.site, phase, received.current_round + 1, received.total_rounds, metrics)
        flare.send(flare.FLModel(params={k: v.float() for k, v in out.items()}, metrics={**metrics, "stage": phase, "examples": n},
                                 meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: n}))


if __name__ == "__main__":
    main()
