"""Federation: a round's time against the same local steps without federation, and bytes per round.

    .venv/bin/python bench/federate.py [--rounds 3] [--local-steps 20] [--dp]

Two synthetic sites (the consortium demo's site-a and site-b, tiny model), each its own
NVIDIA FLARE client process, one coordinator, mutual TLS on loopback. Baseline, measured in the
same run: the site's `local_round` alone (the same Ray Train stage, the same steps, no FLARE),
twice. A federated round is timed from the coordinator's round log (the moment the last site's
result arrived, round to round). Target: round time <= 1.3x the baseline.

Bytes per round (fp32 exchange, one site's message): measured serialized for the tiny model's
LoRA adapter and its merger + LM, and counted exactly on the meta device for Qwen2.5-VL-7B
(LoRA r=16 on the default modules vs every merger + LM parameter). With --dp the same run has
NVIDIA FLARE's SVT privacy filter on every site's update: its round time and loss are printed
next to the plain run's.
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


def sites(root: Path, rounds: int, steps: int, dp: bool):
    cfg = load_config()
    demo.FEDERATION.update(rounds=rounds, local_steps=steps)
    cfgs = [absolute_paths(demo.site_config(cfg, root, s)) for s in demo.SITES[:2]]
    coord = absolute_paths(demo.coordinator_config(cfg, root))
    for c in [*cfgs, coord]:
        c.model.base = str(root / "models" / "base")  # the random tiny base: the timing does not need the demo's pretraining
        c.federation.sites = [s.federation.site for s in cfgs]
        c.federation.dp = DPSettings() if dp else None
    return cfg, cfgs, coord


def baseline(c, steps: int) -> list[float]:
    """The same local steps through the same Ray Train stage, without FLARE."""
    from safetensors.torch import save

    from cmevlm.federation.state import federated_cfg, initial_state
    from cmevlm.storage import Storage
    from cmevlm.train.sft import local_round

    init = f"{c.workdir}/bench/initial.safetensors"
    Storage().write_bytes(init, save(dict(initial_state(c))))
    times = []
    for i in range(2):
        t0 = time.time()
        local_round(federated_cfg(c), init, f"bench-local-{i}")
        times.append(time.time() - t0)
    return times


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


def print_bytes(c) -> None:
    for trainable in ("lora", "full"):
        b, n = message_bytes(c, trainable)
        print(f"tiny model, {trainable} (freeze policy {c.sft.freeze or 'sft'}): {n:,} values, {b:,} bytes per site per round ({b / (4 * n):.3f} x 4 bytes a value)")
    lora, full = seven_b_values()
    print(f"Qwen2.5-VL-7B: LoRA r=16 {lora:,} values = {4 * lora / 2**20:,.0f} MiB vs merger + LM {full:,} = "
          f"{4 * full / 2**30:,.1f} GiB per site per round ({full / lora:,.0f}x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--dp", action="store_true", help="also a run with the SVT privacy filter")
    ap.add_argument("--bytes-only", action="store_true", help="only the bytes per round (no training)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cmevlm-bench-federate-"))
    build_tiny_model(root / "models/base", seed=0, max_pixels=168 * 168)
    cfg, cfgs, coord = sites(root, a.rounds, a.local_steps, dp=False)
    if a.bytes_only:
        return print_bytes(cfgs[0])
    demo.prepare_sites(cfgs, 0)
    base = baseline(cfgs[0], a.local_steps)
    fed = demo.federate(coord, cfgs)
    per_round = round_times(fed["rounds"])
    ratio = statistics.median(per_round) / statistics.median(base)
    print(f"local_round alone ({a.local_steps} steps, Ray Train, no FLARE): {', '.join(f'{t:.1f}' for t in base)} s")
    print(f"federated round (2 sites in parallel on this machine): {', '.join(f'{t:.1f}' for t in per_round)} s")
    print(f"round time / local steps alone: {ratio:.2f}  (target <= 1.30)")
    print_bytes(cfgs[0])
    if a.dp:
        root2 = Path(tempfile.mkdtemp(prefix="cmevlm-bench-federate-dp-"))
        (root2 / "models").symlink_to(root / "models")
        _, cfgs2, coord2 = sites(root2, a.rounds, a.local_steps, dp=True)
        for c, c0 in zip(cfgs2, cfgs):
            c.federation.port = c0.federation.port
        demo.prepare_sites(cfgs2, 0)
        fed2 = demo.federate(coord2, cfgs2)
        dp_rounds = round_times(fed2["rounds"])
        loss = {name: [r["metrics"].get("loss") for r in f["rounds"] if r["metrics"].get("phase") == "train"][-2:]
                for name, f in (("plain", fed), ("dp", fed2))}
        print(f"with DP (SVT filter): round {statistics.median(dp_rounds):.1f} s vs {statistics.median(per_round):.1f} s "
              f"({statistics.median(dp_rounds) / statistics.median(per_round):.2f}x); last losses plain {loss['plain']} vs dp {loss['dp']}")


if __name__ == "__main__":
    main()
