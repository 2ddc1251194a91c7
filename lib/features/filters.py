"""Stage-2 feature selection on TRAIN rows only: constant, MAD high-variance, predictive power,
near-duplicate filters, and median imputation (spec 5.5–5.8, with the defects fixed).

Every function takes a float matrix (rows × features, NaN = missing) restricted by the caller
to TRAIN rows, and returns the indices of the columns it keeps plus a reason for each drop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score

__all__ = [
    "FilterResult",
    "sanitize_column_names",
    "drop_constant",
    "mad_high_variance_filter",
    "predictive_power_metrics",
    "predictive_power_filter",
    "near_duplicate_filter",
    "fit_medians",
    "impute",
]


@dataclass
class FilterResult:
    """Columns kept (indices into the input) and, for every dropped column, why."""

    kept: list[int]
    dropped: dict[int, str] = field(default_factory=dict)


def sanitize_column_names(labels: Sequence[str], reserved: Iterable[str] = ()) -> list[str]:
    """Labels → snake-case column names; repeats and clashes with `reserved` get `_1`, `_2`, …

    The original let a feature column clash with a dataset column (both then vanished at the
    merge); here a clash is resolved by the same numeric suffix as a repeated label.
    """
    taken = {r.lower() for r in reserved}
    out: list[str] = []
    for label in labels:
        base = re.sub(r"[^0-9a-zA-Z]+", "_", str(label)).strip("_").lower() or "feature"
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        out.append(name)
    return out


def drop_constant(X: np.ndarray) -> FilterResult:
    """Drop columns with at most one distinct value once missing values count as 0."""
    res = FilterResult([])
    filled = np.nan_to_num(X, nan=0.0)
    for j in range(X.shape[1]):
        col = filled[:, j]
        if col.size == 0 or np.all(col == col[0]):
            res.dropped[j] = "constant on train rows"
        else:
            res.kept.append(j)
    return res


def mad_high_variance_filter(X: np.ndarray, z_thresh: float) -> FilterResult:
    """Drop columns whose log-variance is an upper outlier (robust z > z_thresh), spec 5.5."""
    filled = np.nan_to_num(X, nan=0.0)
    eligible = [j for j in range(X.shape[1]) if np.count_nonzero(~np.isnan(X[:, j])) >= 10]
    res = FilterResult([j for j in range(X.shape[1]) if j not in eligible])
    if not eligible:
        return res
    lv = np.log1p(np.var(filled[:, eligible], axis=0, ddof=1))
    med = np.median(lv)
    mad = np.median(np.abs(lv - med))
    z = (lv - med) / (1.4826 * mad + 1e-12)
    for j, zj in zip(eligible, z):
        if zj > z_thresh:
            res.dropped[j] = f"high variance: robust z {zj:.1f} > {z_thresh:g}"
        else:
            res.kept.append(j)
    res.kept.sort()
    if not res.kept:  # never drop everything
        return FilterResult(list(range(X.shape[1])))
    return res


def _auc(scores: np.ndarray, y: np.ndarray) -> float:
    """Mann–Whitney AUC with average ranks for ties (NaN if a class is empty)."""
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def predictive_power_metrics(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """AUC, AP (higher score = positive) above base rate and standardised mean difference, on finite rows.

    Unlike the original, class means skip missing values, and the AP and its base rate are
    computed on the same rows.
    """
    ok = np.isfinite(x)
    xs, ys = x[ok], y[ok].astype(int)
    out = {"n": float(ok.sum()), "auc": float("nan"), "best_auc": float("nan"),
           "ap_above_base": float("nan"), "delta_mean_std_units": float("nan")}
    if xs.size == 0 or ys.min() == ys.max():
        return out
    auc = _auc(xs, ys)
    out["auc"], out["best_auc"] = auc, max(auc, 1 - auc)
    out["ap_above_base"] = float(average_precision_score(ys, xs) - ys.mean())
    delta = xs[ys == 1].mean() - xs[ys == 0].mean()
    std = xs.std(ddof=1) if xs.size > 1 else 0.0
    out["delta_mean_std_units"] = float(abs(delta) / (abs(std) + 1e-8))
    return out


def predictive_power_filter(X: np.ndarray, y: np.ndarray, min_auc: float = 0.0, min_delta: float = 0.2,
                            min_ap_above_base: float = 0.0) -> tuple[FilterResult, list[dict[str, float]]]:
    """Keep a column if any active criterion holds (spec 5.6); none passing → keep all.

    Active criteria: `min_auc > 0`, `min_delta > 0`, `min_ap_above_base > -1` (as the original).
    """
    metrics = [predictive_power_metrics(X[:, j], y) for j in range(X.shape[1])]
    res = FilterResult([])
    for j, m in enumerate(metrics):
        checks = []
        if min_auc > 0:
            checks.append(np.nan_to_num(m["best_auc"], nan=0.0) >= min_auc)
        if min_delta > 0:
            checks.append(np.nan_to_num(m["delta_mean_std_units"], nan=0.0) >= min_delta)
        if min_ap_above_base > -1:
            checks.append(np.nan_to_num(m["ap_above_base"], nan=-1.0) >= min_ap_above_base)
        if not checks or any(checks):
            res.kept.append(j)
        else:
            res.dropped[j] = (f"low predictive power: best AUC {m['best_auc']:.3f}, "
                              f"|Δmean|/sd {m['delta_mean_std_units']:.3f}, AP−base {m['ap_above_base']:.3f}")
    if not res.kept:
        return FilterResult(list(range(X.shape[1]))), metrics
    return res, metrics


def near_duplicate_filter(X: np.ndarray, threshold: float, names: Sequence[str] | None = None) -> FilterResult:
    """Drop a column whose |Pearson r| with an earlier KEPT column is ≥ threshold (spec 5.7, fixed)."""
    filled = np.nan_to_num(X, nan=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.abs(np.corrcoef(filled, rowvar=False)) if X.shape[1] > 1 else np.ones((1, 1))
    corr = np.nan_to_num(np.atleast_2d(corr), nan=0.0)
    res = FilterResult([])
    for j in range(X.shape[1]):
        twin = next((k for k in res.kept if corr[j, k] >= threshold), None)
        if twin is None:
            res.kept.append(j)
        else:
            other = names[twin] if names is not None else str(twin)
            res.dropped[j] = f"near-duplicate of '{other}' (|r| = {corr[j, twin]:.5f})"
    return res


def fit_medians(X_train: np.ndarray) -> np.ndarray:
    """Per-column medians of finite TRAIN values (0 where a column has none)."""
    with np.errstate(all="ignore"):
        med = np.array([np.nanmedian(c) if np.isfinite(c).any() else 0.0 for c in X_train.T], dtype=float)
    return np.nan_to_num(med, nan=0.0)


def impute(X: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """Replace missing values by the given (train-fitted) column medians."""
    out = np.array(X, dtype=float, copy=True)
    rows, cols = np.where(~np.isfinite(out))
    out[rows, cols] = medians[cols]
    return out
