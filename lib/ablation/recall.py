"""How a search compares with the exhaustive reference: recall of the reference's high-impact units
(overall and by effect bin, with a 95 % interval), precision, and the cost ratios the paper reports.

A reference unit is high-impact when, on one slice, its observed flip rate and the Clopper–Pearson
lower bound of it both reach τ (`run_sequential_exhaustive`); a search "finds" the singleton units
it calls agonists. Recall without a stated interval and cost is no result, so both come together.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from scipy.stats import beta as beta_dist

from lib.ablation.cha import group_testing_bound, is_agonist

__all__ = ["Unit", "binomial_interval", "effect_bins", "high_impact_units", "recall_report", "cost_report",
           "singleton_agonists"]

Unit = tuple[int, int]  # (layer, unit index)


def binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """Two-sided Clopper–Pearson interval of k successes in n (None when n = 0)."""
    if n <= 0:
        return None, None
    a = (1.0 - level) / 2.0
    lo = 0.0 if k <= 0 else float(beta_dist.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta_dist.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def effect_bins(tau: float) -> dict[str, tuple[float, float]]:
    """The paper's Table 3 bins of the reference flip rate: [τ, 0.3), [0.3, 0.5), [0.5, 1]."""
    return {f"[{tau:g},0.3)": (tau, 0.3), "[0.3,0.5)": (0.3, 0.5), "[0.5,1]": (0.5, 1.0 + 1e-9)}


def high_impact_units(reference: Iterable[Mapping]) -> dict[Unit, float]:
    """(layer, unit) → the larger observed slice flip rate, for the reference's high-impact units."""
    return {(int(r["layer"]), int(r["unit"])): max(float(r["flip_hat_associated"]), float(r["flip_hat_unrelated"]))
            for r in reference if r.get("high_impact")}


def recall_report(reference_hi: Mapping[Unit, float], found: Iterable[Unit], tau: float) -> dict:
    """Recall (with 95 % interval), by effect bin, and precision of `found` against the reference."""
    found = set(found)
    ref = set(reference_hi)
    hit = ref & found
    lo, hi = binomial_interval(len(hit), len(ref))
    by_bin = {}
    for name, (a, b) in effect_bins(tau).items():
        in_bin = {u for u, e in reference_hi.items() if a <= e < b}
        by_bin[name] = {"n_reference": len(in_bin), "recalled": len(in_bin & found),
                        "recall": (len(in_bin & found) / len(in_bin)) if in_bin else None}
    return {"n_reference_high_impact": len(ref), "n_found": len(found), "n_recalled": len(hit),
            "recall": (len(hit) / len(ref)) if ref else None, "recall_ci95": [lo, hi],
            "precision": (len(hit) / len(found)) if found else None, "recall_by_bin": by_bin}


def cost_report(n_units: int, k_reference: int, evaluations: int, forward_rows: int, reference_rows: int) -> dict:
    """The search's cost as evaluations / N and / (2N−1), forward rows / the reference's, and
    evaluations / the group-testing bound k·log2(N/k)+k with the reference's k."""
    bound = group_testing_bound(n_units, k_reference)
    return {"n_units": int(n_units), "evaluations": int(evaluations), "forward_rows": int(forward_rows),
            "evaluations_over_n": evaluations / n_units if n_units else None,
            "evaluations_over_2n_minus_1": evaluations / (2 * n_units - 1) if n_units else None,
            "forward_rows_ratio": forward_rows / reference_rows if reference_rows else None,
            "bound_k_log2_n_over_k_plus_k": bound,
            "evaluations_over_bound": evaluations / bound if bound > 0 else None}


def singleton_agonists(records: Sequence[Mapping], tau: float) -> set[Unit]:
    """(layer, unit) of the singleton records a search calls agonists (`lib.ablation.cha.is_agonist`)."""
    out: set[Unit] = set()
    for r in records:
        if is_agonist(dict(r), tau):
            (label, ids), = r["layers_neurons_dict"].items()
            out.add((int(str(label).lstrip("m")), int(ids[0])))
    return out

