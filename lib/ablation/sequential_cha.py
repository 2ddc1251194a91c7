"""CHA with an effect statistic that can prune on real models: groups are judged against random
groups of the same size, prompts are added only while a decision is ambiguous, and every decision
has a stated error rate.

Why: on a small, fragile model almost every multi-unit group flips some prompt, and random groups'
effects grow with their size, so "the flip rate's upper bound reaches τ" keeps nearly every node.
What a group containing a high-impact unit has, and a random group of its size has not, is that
unit's own effect on top of the background.

Per prompt p the tester reports the binary flip (the answer left the regime) and the continuous
effect e_p = margin_base(p) - margin_ablated(p), the drop of the reference first answer token's
logit margin over the best other token. For a node of size s in layer L:

* background b_p = the per-prompt median effect of `n_background` random groups of size s drawn
  from L's candidates, on the same prompts (cached per (layer, size); evaluated lazily, prompt range
  by prompt range, so it costs a few groups per tree level). A random group holds a given unit with
  probability s/N, so the median is contaminated by a high-impact unit only when most of the random
  groups hold it; that is likely for big nodes (s = N/2: a random group overlaps half the node), so
  nodes of depth <= `always_split_depth` (2: s >= N/4) are split without a test — a few cheap
  evaluations per layer on the first prompt batch — and tested from s = N/8 on, where the median of
  5 groups is contaminated with probability about 1.6 %;
* effects are taken relative to each prompt's baseline margin and clipped to [-1, 1] (1 = the first
  token flipped), so a few huge drops cannot swamp the test, and set to 1 where the answer left the
  regime at a later token (the first-token margin cannot see those); excess x_p = r_p - b_p. A high-impact
  unit (flip rate >= τ on a slice) adds, on the prompts it flips, what the background left of the
  margin: δ = τ × mean(1 - clip(b, 0, 1)) of mean excess;
* a Wald sequential probability ratio test per slice, H0 "mean excess 0" against H1 "mean excess δ"
  (Gaussian, variance estimated from the node's prompts): keep when the log-likelihood ratio
  reaches log((1-β)/α), prune when it falls to log(β/(1-α)), else double the prompts (up to the
  slice size). α is the false-keep and β the false-prune (recall) error rate per slice and decision.
  A node is pruned only when both slices say "prune"; a node still ambiguous at the full slice is kept.

A singleton is an agonist when, on one slice, the one-sided Clopper–Pearson *lower* bound of its
flip rate reaches τ (bound and observed rate from the same slice); prompts are added while the
interval straddles τ. The contrast between slices is recorded: the flip rates of both slices and
Fisher's exact test of their difference (`selective_slice` when significant at `alpha_agonist`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import fisher_exact
from tqdm import tqdm

__all__ = [
    "SliceResult",
    "SequentialTester",
    "SequentialSettings",
    "clopper_pearson_lower",
    "relative_effect",
    "prompt_effect",
    "min_agonist_excess",
    "sprt_decision",
    "agonist_decision",
    "run_sequential_cha",
    "run_sequential_exhaustive",
]


@dataclass
class SliceResult:
    """One group on one slice, for a range of the slice's prompts: flips (answer left the regime)
    and effects (drop of the reference token's first-position margin), prompt order."""

    flips: np.ndarray
    effects: np.ndarray


# tester(groups, lo, hi) -> per group (associated, unrelated) results on prompts lo..hi-1 of each slice
SequentialTester = Callable[[Sequence[Mapping[int, Sequence[int]]], int, int], list[tuple[SliceResult, SliceResult]]]


@dataclass(frozen=True)
class SequentialSettings:
    """Knobs of the sequential effect CHA (all error rates per slice and decision)."""

    tau: float = 0.2  # flip rate that makes a unit high-impact
    alpha_keep: float = 0.05  # P(keep | the group is background only)
    beta_prune: float = 0.01  # P(prune | the group holds a unit adding δ)
    alpha_agonist: float = 0.05  # two-sided level of the singleton flip-rate interval (α/2 per side)
    n_start: int = 16  # prompts per slice of a node's first evaluation
    n_background: int = 5  # random same-size groups per (layer, size); their per-prompt median is the background
    always_split_depth: int = 2  # nodes this shallow are split without a test (see the module docstring)
    min_sd: float = 1e-3  # floor of the excess standard deviation (a constant background is not certainty)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1−α) Clopper–Pearson lower bound of a binomial rate with k successes in n."""
    if n <= 0 or k <= 0:
        return 0.0
    if k >= n:
        return float(alpha ** (1.0 / n))
    return float(beta_dist.ppf(alpha, k, n - k + 1))


def _cp_upper(k: int, n: int, alpha: float) -> float:
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    if k <= 0:
        return 1.0 - alpha ** (1.0 / n)
    return float(beta_dist.ppf(1.0 - alpha, k + 1, n - k))


def relative_effect(effects: np.ndarray, base_margins: np.ndarray) -> np.ndarray:
    """Share of each prompt's baseline margin an ablation removes, clipped to [-1, 1]: 1 means the
    first answer token flipped. Bounded, so a few huge drops cannot swamp the test."""
    m = np.clip(np.asarray(base_margins, dtype=float), 1e-3, None)
    return np.clip(np.asarray(effects, dtype=float) / m, -1.0, 1.0)


def prompt_effect(res: SliceResult, base_margins: np.ndarray) -> np.ndarray:
    """Per-prompt effect of an ablation: 1 where the answer left the regime (at any answer token),
    else the relative first-token margin drop. The flip term sees units that change later tokens
    of a multi-token answer, which the first-token margin alone cannot."""
    n = len(res.effects)
    return np.where(np.asarray(res.flips[:n], dtype=bool), 1.0, relative_effect(res.effects, base_margins[:n]))


def min_agonist_excess(background: np.ndarray, tau: float) -> float:
    """δ: the least mean relative effect a unit that flips a fraction τ of the prompts adds on top of
    a background group: on the prompts it flips it adds what the background left of the margin."""
    b = np.clip(np.asarray(background, dtype=float), 0.0, 1.0)
    return float(tau * np.mean(1.0 - b)) if len(b) else 0.0


def sprt_decision(excess: np.ndarray, delta: float, alpha: float, beta: float, min_sd: float) -> tuple[str, float]:
    """Wald's SPRT of mean 0 against mean δ on Gaussian excesses: ("keep" | "prune" | "more", LLR)."""
    x = np.asarray(excess, dtype=float)
    n = len(x)
    if n == 0 or delta <= 0:
        return "more", 0.0
    sd = max(float(x.std(ddof=1)) if n > 1 else 0.0, min_sd)
    llr = float(delta / sd**2 * np.sum(x - delta / 2.0))
    if llr >= math.log((1.0 - beta) / alpha):
        return "keep", llr
    if llr <= math.log(beta / (1.0 - alpha)):
        return "prune", llr
    return "more", llr


def agonist_decision(flips: np.ndarray, tau: float, alpha: float) -> tuple[str, float, float]:
    """("agonist" | "not" | "more", lower, upper) of one slice's flip rate against τ (α/2 per side)."""
    n, k = len(flips), int(np.sum(flips))
    lo, hi = clopper_pearson_lower(k, n, alpha / 2), _cp_upper(k, n, alpha / 2)
    if lo >= tau:
        return "agonist", lo, hi
    if hi < tau:
        return "not", lo, hi
    return "more", lo, hi


@dataclass
class _Node:
    layer_pos: int
    layer: int
    units: list[int]
    depth: int
    path: str
    n: int = 0  # prompts per slice evaluated so far
    target: int = 0  # prompts per slice the next evaluation brings it to
    res: list[SliceResult] = field(default_factory=list)  # [assoc, unrel]


class _Evaluator:
    """Evaluates nodes and background groups on growing prompt prefixes, counting the cost."""

    def __init__(self, tester: SequentialTester, n_max: int) -> None:
        self.tester, self.n_max = tester, n_max
        self.evaluations = 0  # group evaluations (a node or background group counts once)
        self.forward_rows = 0  # (group, prompt) generations, both slices
        self._counted: set[int] = set()
        self._alive: list[object] = []  # keeps counted keys alive, so their ids are never reused

    def extend(self, items: list[tuple[object, Mapping[int, Sequence[int]], list[SliceResult], int]], hi: int) -> None:
        """Bring every item to `hi` prompts per slice; items are (key, group, results, n_done)."""
        by_lo: dict[int, list[int]] = {}
        for j, (_, _, _, lo) in enumerate(items):
            if lo < hi:
                by_lo.setdefault(lo, []).append(j)
        for lo, idx in sorted(by_lo.items()):
            out = self.tester([items[j][1] for j in idx], lo, hi)
            for j, (a, u) in zip(idx, out):
                key, _, res, _ = items[j]
                if id(key) not in self._counted:
                    self._counted.add(id(key))
                    self._alive.append(key)
                    self.evaluations += 1
                self.forward_rows += len(a.flips) + len(u.flips)
                if not res:
                    res.extend([a, u])
                else:
                    for s, new in enumerate((a, u)):
                        res[s] = SliceResult(np.concatenate([res[s].flips, new.flips]),
                                             np.concatenate([res[s].effects, new.effects]))


@dataclass
class _Background:
    groups: list[dict[int, list[int]]]
    res: list[list[SliceResult]]
    n: int = 0


def run_sequential_cha(layer_units: Mapping[int, Sequence[int]], tester: SequentialTester, n_max: int,
                       base_margins: tuple[np.ndarray, np.ndarray], regime: str, settings: SequentialSettings,
                       rng: np.random.Generator, sign_scores: Mapping[int, Mapping[int, float]] | None = None,
                       sign_split_first: bool = False, singletons: bool = False,
                       progress: bool | str = False) -> tuple[list[dict], dict]:
    """Sequential effect CHA over every layer; (records in per-layer DFS pre-order, cost).

    `base_margins` are the unablated first-token margins of the associated and unrelated prompts
    (slice order, at least `n_max` each); they set δ per slice for the prompts evaluated.
    `singletons=True` is the exhaustive counterpart: every unit is judged alone by the same
    sequential agonist decision (no group tests). `progress` (a label) shows decided nodes and cost."""
    ev = _Evaluator(tester, n_max)
    bar = tqdm(desc=progress if isinstance(progress, str) else "CHA", unit="node", disable=not progress)
    pools = {int(L): [int(i) for i in ids] for L, ids in layer_units.items()}
    n0 = min(settings.n_start, n_max)
    pending: list[_Node] = []
    for pos, (layer, ids) in enumerate(pools.items()):
        if singletons:
            pending += [_Node(pos, layer, [i], 0, f"{j:08d}", target=n0) for j, i in enumerate(sorted(ids))]
            continue
        pool = [ids[i] for i in rng.permutation(len(ids))]
        if pool:
            pending.append(_Node(pos, layer, pool, 0, "", target=n0))
    backgrounds: dict[tuple[int, int], _Background] = {}
    done: list[tuple[int, str, dict]] = []
    while pending:
        # The backgrounds the pending nodes need, drawn once per (layer, size), grown to the largest target.
        need: dict[tuple[int, int], int] = {}
        for nd in pending:
            if len(nd.units) > 1 and nd.depth > settings.always_split_depth:
                key = (nd.layer, len(nd.units))
                need[key] = max(need.get(key, 0), nd.target)
                if key not in backgrounds:
                    pool = pools[nd.layer]
                    groups = [{nd.layer: sorted(int(x) for x in rng.choice(pool, len(nd.units), replace=False))}
                              for _ in range(settings.n_background)]
                    backgrounds[key] = _Background(groups, [[] for _ in groups])
        for hi in sorted({nd.target for nd in pending} | set(need.values())):
            items = [(nd, {nd.layer: nd.units}, nd.res, nd.n) for nd in pending if nd.target == hi and nd.n < hi]
            for key, want in need.items():
                bg = backgrounds[key]
                if want == hi and bg.n < hi:
                    items += [(res, g, res, bg.n) for g, res in zip(bg.groups, bg.res)]
            ev.extend(items, hi)
            for nd in pending:
                if nd.target == hi:
                    nd.n = hi
            for key, want in need.items():
                if want == hi:
                    backgrounds[key].n = max(backgrounds[key].n, hi)
        nxt: list[_Node] = []
        for nd in pending:
            rec, verdict = _judge(nd, backgrounds, base_margins, regime, settings, n_max)
            if verdict == "more":
                nd.target = min(n_max, nd.n * 2)
                nxt.append(nd)
                continue
            if verdict == "split":
                scores = (sign_scores or {}).get(nd.layer)
                left, right, meta = _split(nd, scores, sign_split_first, rng)
                rec.update(split=True, **meta)
                nxt += [_Node(nd.layer_pos, nd.layer, left, nd.depth + 1, nd.path + "0", target=n0),
                        _Node(nd.layer_pos, nd.layer, right, nd.depth + 1, nd.path + "1", target=n0)]
            done.append((nd.layer_pos, nd.path, rec))
            bar.update(1)
        bar.set_postfix(pending=len(nxt), evaluations=ev.evaluations, rows=ev.forward_rows, refresh=False)
        pending = nxt
    bar.close()
    done.sort(key=lambda t: (t[0], t[1]))
    cost = {"evaluations": ev.evaluations, "forward_rows": ev.forward_rows,
            "background_groups": sum(len(b.groups) for b in backgrounds.values())}
    return [r for _, _, r in done], cost


def _slice_flip_rate(res: SliceResult) -> float | None:
    return float(np.mean(res.flips)) if len(res.flips) else None


def _judge(nd: _Node, backgrounds: dict, base_margins: tuple[np.ndarray, np.ndarray], regime: str,
           st: SequentialSettings, n_max: int) -> tuple[dict, str]:
    """Record and verdict ("split" | "stop" | "more") of a node evaluated on nd.n prompts per slice."""
    a, u = nd.res
    rec: dict = {
        "layers_neurons_dict": {f"m{nd.layer}": [int(i) for i in nd.units]},
        "group_size": len(nd.units),
        "depth": nd.depth,
        "baseline_subset": regime,
        "n_associated_eval": int(len(a.flips)),
        "n_unrelated_eval": int(len(u.flips)),
        "delta_on_associated_hat": _slice_flip_rate(a),
        "delta_on_unrelated_hat": _slice_flip_rate(u),
        "mean_effect_associated": float(np.mean(a.effects)),
        "mean_effect_unrelated": float(np.mean(u.effects)),
        "statistic": "effect_sprt",
    }
    # accuracy after the knockout (share of answers still positive), as the flip-UCB records have it
    acc = [float(np.mean(~r.flips)) if regime == "positive" else float(np.mean(r.flips)) for r in (a, u)]
    rec.update(acc_after_knockout_on_associated=acc[0], acc_after_knockout_on_unrelated=acc[1],
               accuracy_gap=acc[1] - acc[0], max_effect=None,
               max_effect_hat=max(x for x in (rec["delta_on_associated_hat"], rec["delta_on_unrelated_hat"])
                                  if x is not None))
    full = nd.n >= n_max
    if len(nd.units) == 1:
        verdicts = [agonist_decision(r.flips, st.tau, st.alpha_agonist) for r in (a, u)]
        rec.update(flip_lcb_associated=verdicts[0][1], flip_ucb_associated=verdicts[0][2],
                   flip_lcb_unrelated=verdicts[1][1], flip_ucb_unrelated=verdicts[1][2])
        is_ag = any(v[0] == "agonist" for v in verdicts)
        if not is_ag and not full and any(v[0] == "more" for v in verdicts):
            return rec, "more"
        # bound and observed rate of the same slice: the one whose lower bound is highest
        best = int(np.argmax([v[1] for v in verdicts]))
        hats = (rec["delta_on_associated_hat"], rec["delta_on_unrelated_hat"])
        rec.update(split=False, stop_reason="single_neuron", is_agonist=bool(is_ag),
                   agonist_slice=("associated", "unrelated")[best] if is_ag else None,
                   max_effect=float(verdicts[best][1]), max_effect_lcb=float(verdicts[best][1]),
                   max_effect_hat=hats[best])
        table = [[int(a.flips.sum()), int(len(a.flips) - a.flips.sum())],
                 [int(u.flips.sum()), int(len(u.flips) - u.flips.sum())]]
        p = float(fisher_exact(table)[1]) if len(a.flips) and len(u.flips) else 1.0
        hat_a, hat_u = rec["delta_on_associated_hat"] or 0.0, rec["delta_on_unrelated_hat"] or 0.0
        rec.update(contrast_p_value=p,
                   selective_slice=(("associated" if hat_a > hat_u else "unrelated") if p < st.alpha_agonist else None))
        return rec, "stop"
    if nd.depth <= st.always_split_depth:
        rec.update(stop_reason=None, tested=False)
        return rec, "split"
    bg = backgrounds[(nd.layer, len(nd.units))]
    verdicts, llrs, deltas = [], [], []
    for s in (0, 1):
        res = nd.res[s]
        m = base_margins[s][:len(res.effects)]
        n = len(res.effects)
        b = np.median([prompt_effect(SliceResult(g[s].flips[:n], g[s].effects[:n]), m) for g in bg.res], axis=0)
        x = prompt_effect(res, m) - b
        delta = min_agonist_excess(b, st.tau)
        v, llr = sprt_decision(x, delta, st.alpha_keep, st.beta_prune, st.min_sd)
        verdicts.append(v)
        llrs.append(llr)
        deltas.append(delta)
    rec.update(background_effect_associated=float(np.mean(np.median([g[0].effects[:nd.n] for g in bg.res], axis=0))),
               background_effect_unrelated=float(np.mean(np.median([g[1].effects[:nd.n] for g in bg.res], axis=0))),
               delta_associated=deltas[0], delta_unrelated=deltas[1], llr_associated=llrs[0],
               llr_unrelated=llrs[1])
    if "keep" in verdicts:
        return rec, "split"
    if all(v == "prune" for v in verdicts):
        rec.update(split=False, stop_reason="effect_not_above_background")
        return rec, "stop"
    if full:
        rec.update(ambiguous_at_full_slice=True)
        return rec, "split"
    return rec, "more"


def _split(node: _Node, scores: Mapping[int, float] | None, sign_split_first: bool,
           rng: np.random.Generator) -> tuple[list[int], list[int], dict]:
    units = node.units
    if node.depth == 0 and sign_split_first and scores is not None:
        left = [x for x in units if scores.get(x, 0.0) >= 0]
        right = [x for x in units if scores.get(x, 0.0) < 0]
        if left and right:
            return left, right, {"split_strategy": "score_sign"}
    half = len(units) // 2
    return units[:half], units[half:], {"split_strategy": "bisect"}


def run_sequential_exhaustive(layer_units: Mapping[int, Sequence[int]], tester: SequentialTester, n_prompts: int,
                              settings: SequentialSettings, chunk: int = 256) -> tuple[list[dict], dict]:
    """The reference: every unit alone on all `n_prompts` of each slice; high-impact when, on one
    slice, the observed flip rate and its Clopper–Pearson lower bound both reach τ."""
    ev = _Evaluator(tester, n_prompts)
    singles = [(int(L), int(i)) for L, ids in layer_units.items() for i in sorted(int(x) for x in ids)]
    records = []
    for start in range(0, len(singles), chunk):
        part = singles[start:start + chunk]
        items = [(object(), {L: [i]}, [], 0) for L, i in part]
        ev.extend(items, n_prompts)
        for (L, i), it in zip(part, items):
            a, u = it[2]
            lcb = [clopper_pearson_lower(int(r.flips.sum()), len(r.flips), settings.alpha_agonist / 2) for r in (a, u)]
            hat = [float(np.mean(r.flips)) for r in (a, u)]
            records.append({"layer": L, "unit": i, "flip_hat_associated": hat[0], "flip_hat_unrelated": hat[1],
                            "flip_lcb_associated": lcb[0], "flip_lcb_unrelated": lcb[1],
                            "mean_effect_associated": float(np.mean(a.effects)),
                            "mean_effect_unrelated": float(np.mean(u.effects)),
                            "high_impact": bool(any(h >= settings.tau and lb >= settings.tau for h, lb in zip(hat, lcb)))})
    return records, {"evaluations": ev.evaluations, "forward_rows": ev.forward_rows}
