"""Metrics of rule fire masks against a target (spec stage 3, §8.3 and §8.4).

Two helpers with stable names, shared by the per-rule table (`lib.rules.ruleshap`) and the OR-combo
selector:

* `binary_rule_metrics(fire, y)` — §8.4 signed-metric helper (always the positive sign):
  how well the boolean mask `fire` predicts the binary event `y` (y ≥ 0.5 when y is not bool).
* `segmentation_stats(fire, t, tail_q=0.9)` — §8.3 statistics of a continuous target `t`
  segmented by `fire`.

Each has a vectorised twin taking a boolean matrix (n_rows × n_masks) and returning a dict of
arrays (`binary_rule_metrics_matrix`, `segmentation_stats_matrix`); the scalar versions are the
matrix versions applied to one column, so both give identical numbers.

Conventions (eps = 1e-12 as in the original):
  precision = TP / n_fire (NaN if nothing fires); recall = TPR = TP / (n_pos + eps) (NaN if there
  are no positives); TNR = TN / (n_neg + eps) (NaN if no negatives); FPR = 1 − TNR; FNR = 1 − TPR;
  F1 = 2PR / (P + R + eps); lift = precision / (base_rate + eps); accuracy = (TP + TN) / n;
  balanced accuracy = (TPR + TNR) / 2; MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)),
  0 when that denominator is 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "EPS",
    "binarize_target",
    "binary_rule_metrics",
    "binary_rule_metrics_matrix",
    "mcc_from_counts",
    "segmentation_stats",
    "segmentation_stats_matrix",
]

EPS = 1e-12


def binarize_target(y: Any, threshold: float = 0.5) -> np.ndarray:
    """Boolean event: bool input as is, numbers ≥ `threshold` (NaN → False)."""
    arr = np.asarray(y)
    if arr.dtype == bool:
        return arr.reshape(-1)
    with np.errstate(invalid="ignore"):
        return (arr.astype(np.float64) >= threshold).reshape(-1)


def _as_matrix(fire: Any, n: int | None = None) -> np.ndarray:
    F = np.asarray(fire, dtype=bool)
    if F.ndim == 1:
        F = F[:, None]
    if F.ndim != 2:
        raise ValueError(f"fire masks must be 1-D or 2-D, got shape {F.shape}")
    if n is not None and F.shape[0] != n:
        raise ValueError(f"fire masks have {F.shape[0]} rows but the target has {n}")
    return F


def mcc_from_counts(tp: Any, fp: Any, tn: Any, fn: Any, *, zero_den: float = 0.0) -> np.ndarray:
    """Matthews correlation from confusion counts (float64); `zero_den` where the denominator is 0.

    The one MCC definition of the project: rule tables, screening and combo selection all use it.
    """
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    den2 = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (tp * tn - fp * fn) / np.sqrt(np.where(den2 > 0, den2, 1.0))
    return np.where(den2 > 0, out, zero_den)


def binary_rule_metrics_matrix(fire: Any, y: Any) -> dict[str, np.ndarray]:
    """§8.4 metrics for every column of the boolean matrix `fire` (n × k) against binary `y`.

    Returns float arrays of length k: `coverage`, `precision`, `recall`, `f1`, `lift`, `accuracy`,
    `tpr`, `tnr`, `balanced_accuracy`, `fpr`, `fnr`, `mcc`, and counts `tp`, `fp`, `tn`, `fn`,
    `n_fire` (int64) plus scalars `n`, `n_pos`, `n_neg`, `base_rate` (broadcast to length k)."""
    yb = binarize_target(y)
    n = yb.shape[0]
    F = _as_matrix(fire, n)
    k = F.shape[1]
    n_pos = int(yb.sum())
    n_neg = n - n_pos
    n_fire = F.sum(axis=0, dtype=np.int64)
    tp = F[yb].sum(axis=0, dtype=np.int64) if n_pos else np.zeros(k, dtype=np.int64)
    fp = n_fire - tp
    fn = n_pos - tp
    tn = n_neg - fp
    tpf, fpf, tnf, fnf = (a.astype(np.float64) for a in (tp, fp, tn, fn))
    nf = n_fire.astype(np.float64)
    base = n_pos / n if n else np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_fire > 0, tpf / np.maximum(nf, 1.0), np.nan)
        tpr = np.full(k, np.nan) if n_pos == 0 else tpf / (n_pos + EPS)
        tnr = np.full(k, np.nan) if n_neg == 0 else tnf / (n_neg + EPS)
        recall = tpr
        f1 = 2.0 * precision * recall / (precision + recall + EPS)
        lift = precision / (base + EPS)
        accuracy = (tpf + tnf) / n if n else np.full(k, np.nan)
        balanced = (tpr + tnr) / 2.0
        mcc = mcc_from_counts(tpf, fpf, tnf, fnf)
        coverage = nf / n if n else np.full(k, np.nan)
    return {
        "coverage": coverage,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "lift": lift,
        "accuracy": accuracy,
        "tpr": tpr,
        "tnr": tnr,
        "balanced_accuracy": balanced,
        "fpr": 1.0 - tnr,
        "fnr": 1.0 - tpr,
        "mcc": mcc,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n_fire": n_fire,
        "n": np.full(k, n, dtype=np.int64),
        "n_pos": np.full(k, n_pos, dtype=np.int64),
        "n_neg": np.full(k, n_neg, dtype=np.int64),
        "base_rate": np.full(k, base, dtype=np.float64),
    }


def binary_rule_metrics(fire: Any, y: Any) -> dict[str, float]:
    """§8.4 signed-metric helper for one fire mask: keys as `binary_rule_metrics_matrix`
    (`coverage`, `precision`, `recall`, `f1`, `lift`, `accuracy`, `tpr`, `tnr`,
    `balanced_accuracy`, `fpr`, `fnr`, `mcc`, `tp`, `fp`, `tn`, `fn`, `n_fire`, `n`, `n_pos`,
    `n_neg`, `base_rate`); floats, counts as int."""
    fire = np.asarray(fire, dtype=bool).reshape(-1)
    out = binary_rule_metrics_matrix(fire[:, None], y)
    return {k: (int(v[0]) if v.dtype.kind == "i" else float(v[0])) for k, v in out.items()}


def segmentation_stats_matrix(fire: Any, t: Any, tail_q: float = 0.9) -> dict[str, np.ndarray]:
    """§8.3 statistics of continuous `t` segmented by each column of `fire` (n × k).

    p = fire rate; μ₁/μ₀ = mean of t where the mask fires / does not (NaN if that group is empty).
    * `r_pb` = (μ₁−μ₀)·√(p(1−p)) / (sample std of t + eps)  (NaN if a group is empty)
    * `cohen_d` = (μ₁−μ₀) / (pooled sample std + eps)       (NaN if n₁ + n₀ − 2 ≤ 0 or a group is empty)
    * `mean_shift` = μ₁ − μ₀
    * `r2_seg` = 1 − (p·mse₁ + (1−p)·mse₀) / (var t + eps), mse/var population (an empty group adds 0)
    * tail event X = t ≥ quantile_q(t): `prec_tail`, `rec_tail`, `f1_tail`, `lift_tail` of the
      mask against X (§8.4 conventions); `event_threshold` = that quantile.
    """
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    n = t.shape[0]
    F = _as_matrix(fire, n)
    k = F.shape[1]
    Ff = F.astype(np.float64)
    n1 = Ff.sum(axis=0)
    n0 = n - n1
    tmean = float(t.mean()) if n else 0.0
    tc = t - tmean  # centred: the within-group sums of squares below lose no precision
    s1 = tc @ Ff
    s0 = tc.sum() - s1
    q1 = (tc * tc) @ Ff
    q0 = (tc * tc).sum() - q1
    with np.errstate(invalid="ignore", divide="ignore"):
        c1 = np.where(n1 > 0, s1 / np.maximum(n1, 1.0), np.nan)  # centred group means
        c0 = np.where(n0 > 0, s0 / np.maximum(n0, 1.0), np.nan)
        # within-group sums of squared deviations (clipped: rounding can go slightly negative)
        ss1 = np.where(n1 > 0, np.maximum(q1 - n1 * np.nan_to_num(c1) ** 2, 0.0), 0.0)
        ss0 = np.where(n0 > 0, np.maximum(q0 - n0 * np.nan_to_num(c0) ** 2, 0.0), 0.0)
        mu1, mu0 = c1 + tmean, c0 + tmean
        p = n1 / n if n else np.full(k, np.nan)
        diff = c1 - c0
        sd = float(np.std(t, ddof=1)) if n > 1 else np.nan
        var = float(np.var(t)) if n else np.nan
        r_pb = diff * np.sqrt(p * (1.0 - p)) / (sd + EPS)
        dof = n1 + n0 - 2.0
        pooled = np.where(dof > 0, np.sqrt((ss1 + ss0) / np.where(dof > 0, dof, 1.0)), np.nan)
        cohen_d = diff / (pooled + EPS)
        r2_seg = 1.0 - ((ss1 + ss0) / n) / (var + EPS) if n else np.full(k, np.nan)
    thr = float(np.quantile(t, tail_q)) if n else np.nan
    event = t >= thr
    m = binary_rule_metrics_matrix(F, event)
    return {
        "r_pb": r_pb,
        "cohen_d": cohen_d,
        "mean_shift": diff,
        "r2_seg": r2_seg,
        "prec_tail": m["precision"],
        "rec_tail": m["recall"],
        "f1_tail": m["f1"],
        "lift_tail": m["lift"],
        "event_threshold": np.full(k, thr),
    }


def segmentation_stats(fire: Any, t: Any, tail_q: float = 0.9) -> dict[str, float]:
    """§8.3 segmentation statistics for one fire mask: `r_pb`, `cohen_d`, `mean_shift`,
    `r2_seg`, `prec_tail`, `rec_tail`, `f1_tail`, `lift_tail`, `event_threshold` (floats)."""
    fire = np.asarray(fire, dtype=bool).reshape(-1)
    out = segmentation_stats_matrix(fire[:, None], t, tail_q)
    return {k: float(v[0]) for k, v in out.items()}
