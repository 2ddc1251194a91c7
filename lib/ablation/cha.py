"""Contrastive Hierarchical Ablation: adaptive group testing over one circuit's units (spec §5).

A group is *strong* when the one-sided Clopper–Pearson upper bound of its flip rate on either
slice (associated / unrelated prompts) reaches τ; weak groups are pruned with their subtree,
strong ones are split in two until singletons. Nodes of every layer are visited level by level
so each call of the group tester evaluates a whole frontier in full batches; records are then
put back in the original depth-first pre-order. The exhaustive reference tests every singleton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.stats import beta

__all__ = [
    "clopper_pearson_upper",
    "slice_effect",
    "effect_record",
    "GroupTester",
    "run_cha",
    "run_exhaustive",
    "group_testing_bound",
    "is_agonist",
]

# A tester takes groups ({layer: [ids]}) and returns, per group, the per-prompt "positive"
# flags (bool lists) on the associated and the unrelated slice.
GroupTester = Callable[[Sequence[Mapping[int, Sequence[int]]]], list[tuple[list[bool], list[bool]]]]


def clopper_pearson_upper(k: int, n: int, alpha: float | None) -> float:
    """One-sided (1−α) Clopper–Pearson upper bound of a binomial rate with k successes in n."""
    if alpha is None or alpha <= 0:
        return 1.0
    if n <= 0:
        return 0.0
    if k <= 0:
        return 1.0 - alpha ** (1.0 / n)
    if k >= n:
        return 1.0
    return float(beta.ppf(1.0 - alpha, k + 1, n - k))


def slice_effect(flags: Sequence[bool], regime: str, alpha: float | None) -> tuple[int, int, float | None, float | None]:
    """(k_effect, n, observed flip rate, UCB) of one slice: flips are answers that left the regime."""
    n = len(flags)
    k_pos = int(sum(bool(f) for f in flags))
    if regime == "positive":
        k = n - k_pos
    elif regime == "negative":
        k = k_pos
    else:
        raise ValueError(f"regime must be positive or negative, not '{regime}'")
    hat = k / n if n else None
    return k, n, hat, (clopper_pearson_upper(k, n, alpha) if n else None)


def effect_record(group: Mapping[int, Sequence[int]], assoc: Sequence[bool], unrel: Sequence[bool],
                  regime: str, alpha_slice: float | None) -> dict:
    """The spec's ablation record (§8.2) plus `max_effect_hat`, the observed counterpart of the
    UCB-based `max_effect` that gates inclusion."""
    ka, na, ha, ua = slice_effect(assoc, regime, alpha_slice)
    ku, nu, hu, uu = slice_effect(unrel, regime, alpha_slice)
    acc_a = float(np.mean(assoc)) if na else float("nan")
    acc_u = float(np.mean(unrel)) if nu else float("nan")
    ucbs = [u for u in (ua, uu) if u is not None]
    hats = [h for h in (ha, hu) if h is not None]
    return {
        "layers_neurons_dict": {_label(L): [int(i) for i in ids] for L, ids in group.items()},
        "group_size": int(sum(len(ids) for ids in group.values())),
        "accuracy_gap": acc_u - acc_a,
        "acc_after_knockout_on_associated": acc_a,
        "acc_after_knockout_on_unrelated": acc_u,
        "acc_after_knockout_on_associated_all": [int(bool(f)) for f in assoc],
        "acc_after_knockout_on_unrelated_all": [int(bool(f)) for f in unrel],
        "baseline_subset": regime,
        "alpha_slice": alpha_slice,
        "delta_on_associated_hat": ha,
        "delta_on_unrelated_hat": hu,
        "delta_on_associated_ucb": ua,
        "delta_on_unrelated_ucb": uu,
        "n_associated_eval": na,
        "n_unrelated_eval": nu,
        "k_effect_associated": ka,
        "k_effect_unrelated": ku,
        "max_effect": max(ucbs) if ucbs else None,
        "max_effect_hat": max(hats) if hats else None,
    }


def is_agonist(record: dict, tau: float) -> bool:
    """A single unit that is an agonist on one slice, bound and observed rate of the same slice.

    Effect-statistic records (`statistic: effect_sprt`) carry the decision (flip-rate *lower*
    bound ≥ τ on one slice). Flip-UCB records: the slice's flip-rate UCB reaches τ and the unit
    flipped at least one prompt of that slice (the UCB alone would call a unit with zero flips an
    agonist whenever the slices are too small for the bound to fall below τ). Compact records
    (bucket files) carry only `max_effect` / `max_effect_hat`."""
    if record.get("group_size") != 1:
        return False
    if record.get("statistic") == "effect_sprt":
        return bool(record.get("is_agonist"))
    slices = [(record.get(f"delta_on_{s}_ucb"), record.get(f"delta_on_{s}_hat")) for s in ("associated", "unrelated")]
    if any(ucb is not None for ucb, _ in slices):
        return any(ucb is not None and ucb >= tau and (hat is None or hat > 0) for ucb, hat in slices)
    eff, hat = record.get("max_effect"), record.get("max_effect_hat")
    return eff is not None and eff >= tau and (hat is None or hat > 0)


def _label(layer: int) -> str:
    return f"m{int(layer)}"


def group_testing_bound(n: int, k: int) -> float:
    """Adaptive group-testing cost k·log2(N/k)+k (N when k = 0 is not meaningful: returns 1)."""
    if n <= 0:
        return 0.0
    if k <= 0:
        return 1.0
    return k * math.log2(n / k) + k


@dataclass
class _Node:
    layer_pos: int  # position of the layer in the circuit's layer order
    layer: int
    units: list[int]
    depth: int
    path: str  # "" root, then "0"/"1" per left/right split: lexical order = DFS pre-order


def _split(node: _Node, scores: Mapping[int, float] | None, sign_split_first: bool,
           rng: np.random.Generator) -> tuple[list[int], list[int], dict]:
    """Children of a strong node: by score sign at the root (if asked), else halves."""
    units = node.units
    if node.depth == 0 and sign_split_first and scores is not None:
        left = [u for u in units if scores.get(u, 0.0) >= 0]
        right = [u for u in units if scores.get(u, 0.0) < 0]
        left = [left[i] for i in rng.permutation(len(left))]
        right = [right[i] for i in rng.permutation(len(right))]
        if left and right:
            return left, right, {"split_strategy": "score_sign", "split_left_size": len(left),
                                 "split_right_size": len(right)}
        half = len(units) // 2
        return units[:half], units[half:], {"split_strategy": "bisect_fallback"}
    half = len(units) // 2
    return units[:half], units[half:], {"split_strategy": "bisect"}


def run_cha(layer_units: Mapping[int, Sequence[int]], tester: GroupTester, tau: float, prune_alpha: float,
            regime: str, rng: np.random.Generator, sign_scores: Mapping[int, Mapping[int, float]] | None = None,
            sign_split_first: bool = False) -> list[dict]:
    """CHA over every layer of a circuit; returns the records in per-layer DFS pre-order.

    The pool of each layer is shuffled with `rng`; a node is split when τ ≤ 0, when its
    `max_effect` is None, or when `max_effect` ≥ τ; singletons are always recorded."""
    alpha_slice = prune_alpha / 2 if prune_alpha > 0 else None
    frontier: list[_Node] = []
    for pos, (layer, ids) in enumerate(layer_units.items()):
        pool = [int(i) for i in ids]
        pool = [pool[i] for i in rng.permutation(len(pool))]
        if pool:
            frontier.append(_Node(pos, int(layer), pool, 0, ""))
    done: list[tuple[int, str, dict]] = []
    while frontier:
        results = tester([{n.layer: n.units} for n in frontier])
        nxt: list[_Node] = []
        for node, (assoc, unrel) in zip(frontier, results):
            rec = effect_record({node.layer: node.units}, assoc, unrel, regime, alpha_slice)
            rec.update(depth=node.depth, alpha_node=prune_alpha)
            eff = rec["max_effect"]
            if len(node.units) == 1:
                rec.update(split=False, stop_reason="single_neuron")
            elif tau > 0 and eff is not None and eff < tau:
                rec.update(split=False, stop_reason="max_effect_below_epsilon")
            else:
                scores = (sign_scores or {}).get(node.layer)
                left, right, meta = _split(node, scores, sign_split_first, rng)
                rec.update(split=True, **meta)
                nxt += [_Node(node.layer_pos, node.layer, left, node.depth + 1, node.path + "0"),
                        _Node(node.layer_pos, node.layer, right, node.depth + 1, node.path + "1")]
            done.append((node.layer_pos, node.path, rec))
        frontier = nxt
    done.sort(key=lambda t: (t[0], t[1]))
    return [rec for _, _, rec in done]


def run_exhaustive(layer_units: Mapping[int, Sequence[int]], tester: GroupTester, prune_alpha: float,
                   regime: str, chunk: int = 512) -> list[dict]:
    """Every unit ablated alone (the brute-force reference), in layer order and sorted id order."""
    alpha_slice = prune_alpha / 2 if prune_alpha > 0 else None
    singles = [(int(L), int(i)) for L, ids in layer_units.items() for i in sorted(int(x) for x in ids)]
    records: list[dict] = []
    for start in range(0, len(singles), chunk):
        part = singles[start:start + chunk]
        for (L, i), (assoc, unrel) in zip(part, tester([{L: [i]} for L, i in part])):
            records.append(effect_record({L: [i]}, assoc, unrel, regime, alpha_slice))
    return records
