"""How the coordinator combines the sites' updates, each one's influence bounded.

A site's update is what it sends minus the global model it started from (its sent tensors when
FLARE transfers differences, under DP). Each round, before anything is combined:

- its weight is the example count it declares, capped at what it declared when it enrolled
  (`federation.enrolled_examples`; a site missing there is refused), or at
  `federation.max_examples` when no site enrolled counts (a self-reported 1e12 weighs that cap);
- its distance from the global model (the L2 norm over every tensor, in float64) is clipped to
  `federation.max_update_norm` and to `federation.clip_to_median` x the round's lower median
  distance (the median when the sites are odd, the smaller middle one when even: an honest
  majority sets it, a 3e38 or an honest update scaled x100 cannot raise it);
- then `federation.aggregation`: fedavg (FLARE's WeightedAggregationHelper, weighted by the
  capped counts), trimmed_mean (per value, `trim_fraction` of the sites cut at each end) or
  median (per value).

Non-finite values, other dtypes, names or shapes never get here: the gate (filters.RoundLog)
refuses them first. Every cap and clip is written to the round log (site, round, why), which
`consortium/federation.json` carries. The coordinator keeps every site's update of a round in
memory (trimmed mean and median need them all): sites x trainable tensors.
"""

from __future__ import annotations

import numpy as np

from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

AGGREGATIONS = ("fedavg", "trimmed_mean", "median")


def distance(update: dict) -> float:
    """L2 norm over every tensor of an update, in float64 (a float32 3e38 does not overflow)."""
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in update.values())))


def capped_weight(site: str, declared, enrolled: dict, max_examples: int) -> tuple[float | None, str | None]:
    """(the weight a site's update gets, why it was capped or refused; None when neither)."""
    try:
        n = float(declared)
    except (TypeError, ValueError):
        n = float("nan")
    if not np.isfinite(n) or n <= 0:
        return None, f"example count {declared!r} is not a positive number"
    if enrolled and site not in enrolled:
        return None, f"{site} did not enroll an example count"
    cap = float(enrolled.get(site, max_examples))
    return (cap, f"example count {n:g} capped at {cap:g}") if n > cap else (n, None)


def clip_bound(norms: list[float], max_norm: float | None, median_factor: float | None) -> float:
    """The distance no update of this round may exceed (inf when no bound is set)."""
    bound = float("inf") if max_norm is None else float(max_norm)
    if median_factor is not None and norms:
        bound = min(bound, median_factor * sorted(norms)[(len(norms) - 1) // 2])
    return bound


def clip(update: dict, norm: float, bound: float) -> dict:
    if norm <= bound:
        return update
    scale = bound / norm
    return {k: np.asarray(v, np.float64) * scale for k, v in update.items()}


def combine(updates: list[dict], weights: list[float], how: str, trim_fraction: float) -> dict:
    """The round's update from the bounded ones."""
    if how == "fedavg":
        from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

        helper = WeightedAggregationHelper()
        for i, (u, w) in enumerate(zip(updates, weights)):
            helper.add(data={k: np.asarray(v, np.float64) for k, v in u.items()}, weight=w, contributor_name=str(i), contribution_round=0)
        return helper.get_result()
    out = {}
    for k in updates[0]:
        stack = np.stack([np.asarray(u[k], np.float64) for u in updates])
        if how == "median":
            out[k] = np.median(stack, axis=0)
        else:
            cut = int(trim_fraction * len(updates))
            out[k] = np.sort(stack, axis=0)[cut:len(updates) - cut].mean(axis=0)
    return out


class BoundedAggregator(ModelAggregator):
    """FLARE's aggregator of the consortium job (FedAvg's `aggregator`): collects the round's
    results, bounds each (module docstring), combines them and tracks the global model."""

    def __init__(self, initial: str = "", endpoint: str | None = None, region: str | None = None, aggregation: str = "fedavg",
                 trim_fraction: float = 0.2, max_update_norm: float | None = None, clip_to_median: float | None = None,
                 enrolled_examples: dict | None = None, max_examples: int = 100_000):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")
        self.initial, self.endpoint, self.region, self.aggregation = initial, endpoint, region, aggregation
        self.trim_fraction, self.max_update_norm, self.clip_to_median = trim_fraction, max_update_norm, clip_to_median
        self.enrolled_examples, self.max_examples = dict(enrolled_examples or {}), max_examples
        self._global: dict | None = None
        self._results: list[FLModel] = []

    def reset_stats(self):
        self._results = []

    def accept_model(self, model: FLModel):
        self._results.append(model)

    def global_model(self) -> dict:
        if self._global is None:
            from safetensors.numpy import load

            from cmevlm.config import StorageConfig
            from cmevlm.storage import Storage

            self._global = {k: v.astype(np.float64) for k, v in
                            load(Storage(StorageConfig(endpoint=self.endpoint, region=self.region)).read_bytes(self.initial)).items()}
        return self._global

    def aggregate_model(self) -> FLModel:
        diff = bool(self._results) and self._results[0].params_type == ParamsType.DIFF
        g = self.global_model()
        kept = self._weighed()
        if not kept:
            raise RuntimeError("no update of this round could be weighed: every site was refused")
        updates = [{k: np.asarray(v, np.float64) - (0 if diff else g[k]) for k, v in m.params.items()} for _, m, _ in kept]
        norms = [distance(u) for u in updates]
        bound = clip_bound(norms, self.max_update_norm, self.clip_to_median)
        for (site, m, _), norm in zip(kept, norms):
            if norm > bound:
                self._log(site, m, clipped=f"update distance {norm:.4g} clipped to {bound:.4g}")
        step = combine([clip(u, n, bound) for u, n in zip(updates, norms)], [w for *_, w in kept], self.aggregation, self.trim_fraction)
        self._global = {k: g[k] + step[k] for k in g}
        params = step if diff else self._global
        rnd = kept[0][1].current_round
        return FLModel(params={k: v.astype(np.float32) for k, v in params.items()}, params_type=ParamsType.DIFF if diff else ParamsType.FULL,
                       current_round=rnd, meta={"aggregation": self.aggregation, "clip_bound": bound, "sites": [s for s, *_ in kept]})

    def _weighed(self) -> list[tuple[str, FLModel, float]]:
        """(site, result, weight) of each result a weight could be given; the others logged."""
        kept = []
        for m in self._results:
            site = (m.meta or {}).get("client_name", "unknown")
            w, why = capped_weight(site, (m.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND), self.enrolled_examples, self.max_examples)
            if w is None:
                self._log(site, m, refused=why)
                continue
            if why:
                self._log(site, m, capped=why)
            kept.append((site, m, w))
        return kept

    @staticmethod
    def _log(site: str, m: FLModel, **why) -> None:
        from cmevlm.federation.filters import append_round_log

        append_round_log({"event": "bounded", "site": site, "round": m.current_round, **why})
