"""Statistical tests and sample summaries used by the paper tables and scripts 8-11.

Holm adjustment, exact sign test, sign-flip permutation test, Mann-Whitney U, Fisher's combination,
significance stars and descriptive summaries of one sample; scipy is imported only where needed.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

__all__ = [
    "holm",
    "sign_test_p",
    "signflip_test",
    "mann_whitney",
    "fisher_combined_p",
    "significance_stars",
    "distribution_summary",
    "describe_sample",
]


def holm(pvals: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (NaN stays NaN)."""
    p = np.asarray(pvals, dtype=float)
    out = np.full(len(p), np.nan)
    idx = [i for i in np.argsort(p, kind="mergesort") if not np.isnan(p[i])]
    m, running = len(idx), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def sign_test_p(diffs: Sequence[float], alternative: str = "greater") -> tuple[float, int, int, int]:
    """Exact binomial sign test over nonzero diffs → (p, n_nonzero, n_pos, n_neg)."""
    from scipy.stats import binomtest

    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    n = pos + neg
    if n == 0:
        return 1.0, 0, 0, 0
    return float(binomtest(pos, n, 0.5, alternative=alternative).pvalue), n, pos, neg


def signflip_test(diffs: Sequence[float], alternative: str = "greater", seed: int = 0,
                  exact_max: int = 22, n_random: int = 200_000) -> tuple[float, str]:
    """Sign-flip permutation test on Σ diffs: exact up to `exact_max` nonzero diffs, else Monte Carlo."""
    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d) & (d != 0)]
    if d.size == 0:
        return 1.0, "empty"
    obs = d.sum()
    if d.size <= exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        sums = signs @ d
        mode = "exact"
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice((1.0, -1.0), size=(n_random, d.size))
        sums = np.concatenate([signs @ d, [obs]])
        mode = "monte_carlo"
    tol = 1e-9 * max(1.0, abs(obs))
    if alternative == "greater":
        p = float(np.mean(sums >= obs - tol))
    elif alternative == "less":
        p = float(np.mean(sums <= obs + tol))
    else:
        p = float(np.mean(np.abs(sums) >= abs(obs) - tol))
    return p, mode


def mann_whitney(a: np.ndarray, b: np.ndarray, alternative: str) -> tuple[float, float]:
    """Mann-Whitney U (stat, p); NaN when a side is empty."""
    from scipy.stats import mannwhitneyu

    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size == 0 or b.size == 0:
        return float("nan"), float("nan")
    res = mannwhitneyu(a, b, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def fisher_combined_p(ps: Sequence[float]) -> float:
    """Fisher's combination of p-values (NaN ignored)."""
    from scipy.stats import combine_pvalues

    p = [x for x in ps if x is not None and not math.isnan(x)]
    if not p:
        return float("nan")
    return float(combine_pvalues(np.clip(p, 1e-300, 1.0), method="fisher").pvalue)


def significance_stars(p: float) -> str:
    """`***` < .001, `**` < .01, `*` < .05, else `ns`."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "ns"
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "ns"


def distribution_summary(vals: np.ndarray) -> dict:
    """n, mean, median, quantiles and tail shares of one metric sample."""
    v = vals[~np.isnan(vals)]
    if v.size == 0:
        return {"n": 0, "mean": np.nan, "median": np.nan, "q10": np.nan, "q50": np.nan, "q90": np.nan,
                "q95": np.nan, "p_ge_0.80": np.nan, "p_ge_0.90": np.nan, "tail_mean_ge_0.90": np.nan}
    tail = v[v >= 0.9]
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "q10": float(np.quantile(v, 0.1)), "q50": float(np.quantile(v, 0.5)), "q90": float(np.quantile(v, 0.9)),
            "q95": float(np.quantile(v, 0.95)), "p_ge_0.80": float((v >= 0.8).mean()),
            "p_ge_0.90": float((v >= 0.9).mean()), "tail_mean_ge_0.90": float(tail.mean()) if tail.size else np.nan}


def describe_sample(vals: Sequence[float], prefix: str) -> dict:
    """mean/std/SEM/CI95/quartiles/min/max of a sample, keys prefixed."""
    v = np.asarray([x for x in vals if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return {f"{prefix}_{k}": np.nan for k in ("n", "mean", "std", "sem", "ci95", "q25", "median", "q75", "min", "max")}
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    sem = sd / math.sqrt(v.size) if v.size > 1 else 0.0
    return {f"{prefix}_n": int(v.size), f"{prefix}_mean": float(v.mean()), f"{prefix}_std": sd, f"{prefix}_sem": sem,
            f"{prefix}_ci95": 1.96 * sem, f"{prefix}_q25": float(np.quantile(v, 0.25)),
            f"{prefix}_median": float(np.median(v)), f"{prefix}_q75": float(np.quantile(v, 0.75)),
            f"{prefix}_min": float(v.min()), f"{prefix}_max": float(v.max())}
