"""Federation: a round's time against the same local steps without federation, and bytes per round.

    .venv/bin/python bench/federate.py [--rounds 3] [--local-steps 20] [--dp] [--secure] [--bytes-only]

Two synthetic sites (the consortium demo's site-a and site-b, tiny model), each its own
NVIDIA FLARE client process, one coordinator, mutual TLS on loopback. Baseline, measured in the
same run: both sites' `local_round` at once, each in its own process and Ray as in the
federated round (the same Ray Train stage, the same steps, no FLARE), twice; the slower site's
time counts (after a first pair that also starts each process's Ray). A federated round is timed from the coordinator's round log (the moment the last site's
result arrived, round to round). Target: round time <= 1.3x the baseline.

Bytes per round (fp32 exchange, one site's message): measured serialized for the tiny model's
LoRA adapter and its merger + LM, and counted exactly on the meta device for Qwen2.5-VL-7B
(LoRA r=16 on the default modules vs every merger + LM parameter), and what secure aggregation
makes of them (CKKS ciphertexts with the consortium's parameters, encryption time). With --dp /
--secure the same two sites federate again with NVIDIA FLARE's SVT privacy filter / its
homomorphic encryption: round time, message size and losses next to the plain run's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cmevlm.cluster import apply_env_defaults  # noqa: E402

apply_env_defaults()

from cmevlm.config import DPSettings, LoraSettings, absolute_paths, load_config  # noqa: E402
from cmevlm.federation import demo  # noqa: E402
from cmevlm.model.tiny import build_tiny_model  # noqa: E402


def sites(root: Path, rounds: int, steps: int):
    cfg = load_config()
    demo.FEDERATION.update(rounds=rounds, local_steps=steps, dpo_rounds=0)  # the SFT job's rounds
    cfgs = [absolute_paths(demo.site_config(cfg, root, s)) for s in demo.SITES[:2]]
    coord = absolute_paths(demo.coordinator_config(cfg, root))
    for c in [*cfgs, coord]:
        c.model.base = str(root / "models" / "base")  # the random tiny base: the timing does not need the demo's pretraining
        c.federation.sites = [s.federation.site for s in cfgs]
    return cfg, cfgs, coord


def _local_round(cfg_json: str, init: str, name: str) -> float:
    """One site's local steps in a process of its own (its own Ray, as a site has): seconds."""
    apply_env_defaults()
    from cmevlm.config import RunConfig
    from cmevlm.federation.state import federated_cfg
    from cmevlm.train.sft import local_round

    t0 = time.time()
    local_round(federated_cfg(RunConfig.model_validate_json(cfg_json)), init, name)
    return time.time() - t0


def baseline(cfgs: list) -> list[float]:
    """The same local steps of both sites at once, through the same Ray Train stage, each in
    its own process and Ray as in a federated round, without FLARE: the slower site's time,
    twice."""
    import multiprocessing

    from cmevlm.federation.coordinator import write_initial

    init = write_initial(cfgs[0])  # the tensors a coordinator starts round 1 with
    times = []
    with multiprocessing.get_context("spawn").Pool(len(cfgs)) as pool:
        for i in range(3):
            times.append(max(pool.starmap(_local_round, [(c.model_dump_json(), init, f"bench-local-{i}") for c in cfgs])))
    return times[1:]  # the first also starts each process's Ray, which a site's rounds do not


def round_times(rounds: list[dict]) -> list[float]:
    """Seconds from one training round's last arrival to the next one's."""
    last = {}
    for r in rounds:
        if (r.get("metrics") or {}).get("phase") == "train":
            last[r["round"]] = max(last.get(r["round"], 0), r["time"])
    ends = [last[k] for k in sorted(last)]
    return [b - a for a, b in zip(ends, ends[1:])]


def message_bytes(cfg, trainable: str) -> tuple[int, int]:
    """(serialized bytes of one site's message, values) for the tiny model."""
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.fuel.utils import fobs

    from cmevlm.federation.state import initial_state, to_numpy

    c = cfg.model_copy(deep=True)
    c.federation.trainable = trainable
    state = to_numpy(initial_state(c))
    common_decomposers.register()
    return len(fobs.dumps(DXO(DataKind.WEIGHTS, data=state).to_shareable())), sum(v.size for v in state.values())


def seven_b_values() -> tuple[int, int]:
    from cmevlm import plan

    config = json.loads((ROOT / "configs/models/qwen2.5-vl-7b-instruct.json").read_text())
    shape = plan.model_shape(config)
    return plan.lora_params(config, LoraSettings(), "sft"), shape.params["merger"] + shape.params["lm"]


def he_costs(sizes: list[int]) -> dict:
    """Secure aggregation's cost for tensors of these sizes, measured with the consortium's
    own CKKS context (cmevlm.federation.kits.new_context): each tensor is one CKKS vector
    that FLARE serializes with its (public) context; encryption time and bytes are measured
    once per distinct size and counted for every tensor."""
    import numpy as np
    import tenseal as ts

    from cmevlm.federation.kits import new_context

    ctx = new_context()
    sent_ctx = len(ctx.serialize(save_secret_key=False))
    per = {}
    for n in sorted(set(sizes)):
        values = np.random.default_rng(0).standard_normal(n) * 0.02
        t0 = time.perf_counter()
        v = ts.ckks_vector(ctx, values)
        per[n] = (time.perf_counter() - t0, len(v.serialize()))
    return {"tensors": len(sizes), "values": sum(sizes), "context_bytes": sent_ctx,
            "bytes": sum(per[n][1] + sent_ctx for n in sizes), "encrypt_s": sum(per[n][0] for n in sizes)}


def print_he(c) -> None:
    from cmevlm import plan
    from cmevlm.federation.state import initial_state

    tiny = [int(v.numel()) for v in initial_state(c).values()]
    config = json.loads((ROOT / "configs/models/qwen2.5-vl-7b-instruct.json").read_text())
    for name, sizes in (("tiny model, full", tiny), ("Qwen2.5-VL-7B, LoRA r=16", plan.lora_tensor_sizes(config, LoraSettings(), "sft"))):
        h = he_costs(sizes)
        print(f"secure aggregation, {name}: {h['tensors']:,} tensors, {h['values']:,} values -> {h['bytes'] / 2**20:,.1f} MiB per site "
              f"per round ({h['bytes'] / (4 * h['values']):.1f}x the plaintext fp32; {h['context_bytes'] / 2**10:,.0f} KiB of public "
              f"context per tensor), encryption {h['encrypt_s']:.1f} s on one core")


def print_bytes(c) -> None:
    for trainable in ("lora", "full"):
        b, n = message_bytes(c, trainable)
        print(f"tiny model, {trainable} (freeze policy {c.sft.freeze or 'sft'}): {n:,} values, {b:,} bytes per site per round ({b / (4 * n):.3f} x 4 bytes a value)")
    lora, full = seven_b_values()
    print(f"Qwen2.5-VL-7B: LoRA r=16 {lora:,} values = {4 * lora / 2**20:,.0f} MiB vs merger + LM {full:,} = "
          f"{4 * full / 2**30:,.1f} GiB per site per round ({full / lora:,.0f}x)")


def variant(root: Path, cfgs: list, a, **fed) -> dict:
    """The same two sites' federation with `fed` changed (its own workdirs, the same base)."""
    root2 = Path(tempfile.mkdtemp(prefix="cmevlm-bench-federate-variant-"))
    (root2 / "models").symlink_to(root / "models")
    _, cfgs2, coord2 = sites(root2, a.rounds, a.local_steps)
    for c in [*cfgs2, coord2]:
        c.federation = c.federation.model_copy(update=fed)
    demo.prepare_sites(cfgs2, 0)
    return demo.federate(coord2, cfgs2)


def compare(name: str, fed: dict, other: dict) -> None:
    per, per2 = statistics.median(round_times(fed["rounds"])), statistics.median(round_times(other["rounds"]))
    loss = {k: [r["metrics"].get("loss") for r in f["rounds"] if r["metrics"].get("phase") == "train"][-2:] for k, f in (("plain", fed), (name, other))}
    size = {k: statistics.median(r["bytes"] for r in f["rounds"] if r["metrics"].get("phase") == "train") for k, f in (("plain", fed), (name, other))}
    print(f"with {name}: round {per2:.1f} s vs {per:.1f} s ({per2 / per:.2f}x); one site's message {size[name]:,.0f} vs {size['plain']:,.0f} bytes "
          f"({size[name] / size['plain']:.1f}x); last losses plain {loss['plain']} vs {name} {loss[name]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--dp", action="store_true", help="also a run with the SVT privacy filter")
    ap.add_argument("--secure", action="store_true", help="also a run with secure aggregation (homomorphic encryption)")
    ap.add_argument("--bytes-only", action="store_true", help="only the bytes per round (no training)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cmevlm-bench-federate-"))
    build_tiny_model(root / "models/base", seed=0)
    cfg, cfgs, coord = sites(root, a.rounds, a.local_steps)
    if a.bytes_only:
        print_bytes(cfgs[0])
        return print_he(cfgs[0])
    demo.prepare_sites(cfgs, 0)
    base = baseline(cfgs)
    fed = demo.federate(coord, cfgs)
    per_round = round_times(fed["rounds"])
    ratio = statistics.median(per_round) / statistics.median(base)
    print(f"both sites' local_round at once ({a.local_steps} steps, Ray Train, no FLARE): {', '.join(f'{t:.1f}' for t in base)} s")
    print(f"federated round (2 sites in parallel on this machine): {', '.join(f'{t:.1f}' for t in per_round)} s")
    print(f"round time / local steps alone: {ratio:.2f}  (target <= 1.30)")
    print_bytes(cfgs[0])
    print_he(cfgs[0])
    if a.dp:
        compare("DP (SVT filter)", fed, variant(root, cfgs, a, dp=DPSettings()))
    if a.secure:
        compare("secure aggregation", fed, variant(root, cfgs, a, secure_aggregation=True))


if __name__ == "__main__":
    main()
