"""Bounded influence: the coordinator's aggregation (FLARE's ModelAggregator interface, as the
FedAvg controller calls it) under the attacks of a hostile site, and the site's own check of
what comes back."""

import json

import numpy as np
import pytest
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from safetensors.numpy import save_file

from cmevlm.federation.aggregation import BoundedAggregator
from cmevlm.federation.filters import ROUND_LOG_ENV

SHAPES = {"a.lora_A.weight": (4, 8), "a.lora_B.weight": (8, 4)}
N = {"site-a": 120, "site-b": 100, "site-c": 80}


@pytest.fixture
def initial(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    save_file(g, str(tmp_path / "initial.safetensors"))
    monkeypatch.setenv(ROUND_LOG_ENV, str(tmp_path / "rounds.jsonl"))
    return tmp_path, g


def _honest(g, seed) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}


def _round(agg, sent: dict[str, tuple[dict, float]]) -> dict:
    agg.reset_stats()
    for site, (params, n) in sent.items():
        agg.accept_model(FLModel(params=params, params_type=ParamsType.FULL, current_round=0,
                                 meta={"client_name": site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: n}))
    return agg.aggregate_model().params


def _honest_average(g, honest: dict, weights: dict) -> dict:
    w = sum(weights.values())
    return {k: sum(weights[s] * honest[s][k].astype(np.float64) for s in honest) / w for k in g}


def _off(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


ATTACKS = {  # what site-c sends instead of its honest tensors, and the count it declares
    "3e38": (lambda g, h: {k: np.full_like(v, 3e38) for k, v in g.items()}, N["site-c"]),
    "a weight of 1e12": (lambda g, h: {k: (v + 5.0).astype(np.float32) for k, v in g.items()}, 1e12),
    "honest update x100": (lambda g, h: {k: (g[k] + 100 * (h[k] - g[k])).astype(np.float32) for k in g}, N["site-c"]),
}


@pytest.mark.parametrize("aggregation", ["fedavg", "trimmed_mean", "median"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_one_hostile_site_stays_within_a_stated_tolerance_of_the_honest_average(initial, aggregation, attack):
    root, g = initial
    honest = {s: _honest(g, i) for i, s in enumerate(N)}
    norm = max(_off(honest[s], {k: v.astype(np.float64) for k, v in g.items()}) for s in N)
    make, declared = ATTACKS[attack]
    sent = {s: (honest[s], N[s]) for s in N}
    sent["site-c"] = (make(g, honest["site-c"]), declared)
    agg = BoundedAggregator(str(root / "initial.safetensors"), aggregation=aggregation, trim_fraction=0.34, clip_to_median=3.0,
                            enrolled_examples=N)
    out = _round(agg, sent)
    # Tolerance: the clip bound is 3 x an honest distance, so a fedavg global moves at most
    # (80/300) x (3 + 1) honest distances from the honest average; trimmed mean and median keep
    # to the honest values' spread.
    assert all(np.isfinite(v).all() for v in out.values())
    assert _off(out, _honest_average(g, honest, N)) <= 4 * norm * N["site-c"] / sum(N.values()) + 1e-6, attack
    log = [json.loads(x) for x in (root / "rounds.jsonl").read_text().splitlines()]
    assert log and all(r["site"] == "site-c" and r["event"] == "bounded" for r in log)
    assert any("clipped" in r or "capped" in r for r in log)


def test_fedavg_of_honest_sites_is_their_weighted_average(initial):
    root, g = initial
    honest = {s: _honest(g, i) for i, s in enumerate(N)}
    agg = BoundedAggregator(str(root / "initial.safetensors"), enrolled_examples=N, clip_to_median=3.0)
    out = _round(agg, {s: (honest[s], N[s]) for s in N})
    assert _off(out, _honest_average(g, honest, N)) < 1e-5
    assert not (root / "rounds.jsonl").exists()  # nothing to report


def test_a_site_that_did_not_enroll_is_refused_and_a_count_is_capped(initial):
    root, g = initial
    honest = {s: _honest(g, i) for i, s in enumerate(N)}
    agg = BoundedAggregator(str(root / "initial.safetensors"), enrolled_examples={"site-a": 120, "site-b": 100})
    out = _round(agg, {"site-a": (honest["site-a"], 10**9), "site-b": (honest["site-b"], 100), "site-c": (honest["site-c"], 80)})
    assert _off(out, _honest_average(g, {s: honest[s] for s in ("site-a", "site-b")}, {"site-a": 120, "site-b": 100})) < 1e-5
    log = {r["site"]: r for r in map(json.loads, (root / "rounds.jsonl").read_text().splitlines())}
    assert "capped at 120" in log["site-a"]["capped"] and "did not enroll" in log["site-c"]["refused"]


def test_under_dp_the_sites_send_differences_and_the_bound_applies_to_them(initial):
    root, g = initial
    agg = BoundedAggregator(str(root / "initial.safetensors"), max_update_norm=1.0, clip_to_median=None)
    agg.reset_stats()
    for site, d in (("site-a", 0.1), ("site-b", 100.0)):
        agg.accept_model(FLModel(params={k: np.full(v.shape, d, np.float32) for k, v in g.items()}, params_type=ParamsType.DIFF,
                                 current_round=0, meta={"client_name": site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: 10}))
    out = agg.aggregate_model()
    assert out.params_type == ParamsType.DIFF
    assert np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in out.params.values())) <= 1.0 + 1e-6


def test_a_site_refuses_a_global_model_that_is_not_finite_or_moved_past_the_bound():
    import torch

    from cmevlm.config import load_config
    from cmevlm.federation.site_app import check_global

    cfg = load_config(overrides=["federation={site: site-a, sites: [site-a], max_update_norm: 1.0}"])
    last = {"w": torch.zeros(4, 4)}
    check_global(cfg, {"w": torch.full((4, 4), 0.2)}, last, 1)  # moved 0.8: within the bound
    for bad, why in (({"w": torch.full((4, 4), float("inf"))}, "non-finite"), ({"w": torch.full((4, 4), 1.0)}, "moved 4"),
                     ({"w": torch.zeros(4, 5)}, "other tensors")):
        with pytest.raises(RuntimeError, match=why):
            check_global(cfg, bad, last, 1)


def test_the_job_carries_the_bounded_aggregator_with_the_consortiums_settings(tmp_path):
    from cmevlm.config import load_config
    from cmevlm.federation.coordinator import build_recipe

    cfg = load_config(overrides=[f"workdir={tmp_path}", "federation={sites: [site-a, site-b], aggregation: median, "
                                 "max_update_norm: 2.5, enrolled_examples: {site-a: 10, site-b: 20}}"])
    recipe = build_recipe(cfg, str(tmp_path / "initial.safetensors"))
    recipe.export(str(tmp_path / "job"))
    server = json.loads(next((tmp_path / "job").rglob("config_fed_server.json")).read_text())
    agg = next(w for w in server["workflows"] if w["id"] == "controller")["args"]["aggregator"]
    assert agg["path"] == "cmevlm.federation.aggregation.BoundedAggregator"
    assert agg["args"]["aggregation"] == "median" and agg["args"]["max_update_norm"] == 2.5
    assert agg["args"]["enrolled_examples"] == {"site-a": 10, "site-b": 20}
