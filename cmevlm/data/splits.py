"""Train/test splits by procedure: never a frame of one procedure in two splits.

Procedures of `holdout_sites` all go to test. Of the others, about `test_fraction` go to test,
chosen greedily so the test set's structure counts track `test_fraction` of each structure's
total (stratified where the procedures allow it). Each pick is the best of a few candidates
taken in a seeded random order, so another seed gives another (equally balanced) split.
"""

from __future__ import annotations

import random
from collections import Counter


def assign_splits(
    procedures: dict[tuple[str, str], Counter],
    test_fraction: float,
    holdout_sites: list[str] | tuple[str, ...] = (),
    seed: int = 0,
) -> dict[tuple[str, str], str]:
    """{(site, procedure_id): structure counts} -> {(site, procedure_id): "train" | "test"}."""
    keys = sorted(procedures)
    split = {k: "test" for k in keys if k[0] in set(holdout_sites)}
    pool = [k for k in keys if k not in split]
    random.Random(seed).shuffle(pool)
    n_test = round(test_fraction * len(pool))
    if test_fraction > 0 and n_test == 0 and len(pool) > 1:
        n_test = 1
    total = sum((procedures[k] for k in pool), Counter())
    target = {s: test_fraction * c for s, c in total.items()}
    have: Counter = Counter()
    chosen: set = set()
    remaining = list(pool)
    window = max(3, len(pool) // 4)
    for _ in range(n_test):
        def cost(k):
            after = have + procedures[k]
            return sum((after[s] - target[s]) ** 2 for s in target)

        best = min(remaining[:window], key=cost)  # min keeps the shuffled order on ties
        remaining.remove(best)
        chosen.add(best)
        have += procedures[best]
    for k in pool:
        split[k] = "test" if k in chosen else "train"
    return split
