"""Knockout validation: ablate all agonists CHA found for a rule together and measure how much of
the behaviour goes away, against random unit sets of the same size and layer mix.

Why: a set of units is only a mechanism if removing it removes the behaviour, and removing *any*
set of that many units of a fragile small model removes some of it. The comparison with random
sets of the same per-layer counts (drawn from the same search space, without the agonists) says
how much of the removal is specific to the units found; the empirical p-value (1 + #random sets
removing at least as much) / (n + 1) states the error rate of calling the set specific.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from lib.ablation.sequential_cha import SequentialTester, relative_effect

__all__ = ["random_like", "knockout_validation"]


def random_like(units: Mapping[int, Sequence[int]], pool: Mapping[int, Sequence[int]], n_sets: int,
                rng: np.random.Generator, layer_width: int | None = None) -> list[dict[int, list[int]]]:
    """`n_sets` random groups with the per-layer counts of `units`, drawn from `pool` minus `units`; a
    layer whose pool is too small (e.g. the agonist is its only candidate) draws from all `layer_width`
    units of that layer instead."""
    out = []
    for _ in range(int(n_sets)):
        group: dict[int, list[int]] = {}
        for L, ids in units.items():
            taken = {int(i) for i in ids}
            free = [int(i) for i in pool.get(L, ()) if int(i) not in taken]
            if len(free) < len(taken) and layer_width:
                free = [i for i in range(int(layer_width)) if i not in taken]
            if len(free) < len(taken):
                raise ValueError(f"layer {L}: {len(free)} units outside the set, {len(taken)} needed for a random set")
            group[int(L)] = sorted(int(x) for x in rng.choice(free, size=len(taken), replace=False))
        out.append(group)
    return out


def _measures(res, base_margins: np.ndarray) -> tuple[float, float]:
    """(share of prompts whose answer left the regime, mean relative first-token margin drop)."""
    if not len(res.flips):
        return float("nan"), float("nan")
    return float(np.mean(res.flips)), float(np.mean(relative_effect(res.effects, base_margins[:len(res.effects)])))


def knockout_validation(tester: SequentialTester, units: Mapping[int, Sequence[int]], pool: Mapping[int, Sequence[int]],
                        n_prompts: int, base_margins: tuple[np.ndarray, np.ndarray], n_random: int,
                        rng: np.random.Generator, layer_width: int | None = None) -> dict:
    """Removal by the found set and by `n_random` random same-size sets, on both slices (one batched call)."""
    units = {int(L): sorted(int(i) for i in ids) for L, ids in units.items() if len(ids)}
    n_units = sum(len(v) for v in units.values())
    report: dict = {"n_units": n_units, "units": {f"m{L}": ids for L, ids in units.items()},
                    "n_prompts_per_slice": int(n_prompts), "n_random_sets": 0}
    if n_units == 0:
        return report
    randoms = random_like(units, pool, n_random, rng, layer_width)
    results = tester([units, *randoms], 0, int(n_prompts))
    for s, name in enumerate(("associated", "unrelated")):
        removal, drop = _measures(results[0][s], base_margins[s])
        rand = np.array([_measures(r[s], base_margins[s]) for r in results[1:]], dtype=float).reshape(-1, 2)
        report[f"removal_{name}"] = removal
        report[f"margin_drop_{name}"] = drop
        if len(rand):
            report[f"random_removal_{name}_mean"] = float(np.mean(rand[:, 0]))
            report[f"random_removal_{name}_q95"] = float(np.quantile(rand[:, 0], 0.95))
            report[f"random_margin_drop_{name}_mean"] = float(np.mean(rand[:, 1]))
            report[f"p_value_{name}"] = float((1 + np.sum(rand[:, 0] >= removal)) / (len(rand) + 1))
    report["n_random_sets"] = len(randoms)
    report["random_layer_counts"] = {f"m{L}": len(ids) for L, ids in units.items()}
    return report
