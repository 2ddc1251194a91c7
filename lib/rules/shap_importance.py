"""Global SHAP importance of features for one target (spec stage 3, §5).

The data itself is the model being explained ("abstracted model"): a query vector gets the
target of the nearest SHAP row (plain squared Euclidean distance; ties within 1e-8 of the
minimum broken uniformly at random by a seeded generator). A masked feature takes the value of a
single background row = per-feature minimum − epsilon, i.e. "absent" ≈ "just below its minimum".
Features are grouped by shap's label-aware redundancy clustering (`shap.utils.hclust(X, y)`), used
through a `shap.maskers.Partition` masker, and explained with `shap.explainers.Permutation`.

`npermutations` — what it means here
------------------------------------
shap's permutation explainer (checked in the installed shap 0.51, `explainers/_permutation.py`,
`PermutationExplainer.explain_row`) draws

    n_orderings = max_evals // (2·m + 1)

orderings per explained row, where m = the number of the row's features that differ from the
background (`MaskedModel.varying_inputs()`, via `np.isclose(x, background)`); each ordering is
walked forward and in reverse (antithetic), and SHAP values are averaged over 2·n_orderings
walks. The original called the legacy `shap_values(X, npermutations=p)`, which passes
`max_evals = p·M` and therefore draws only ⌊p·M/(2M+1)⌋ ≈ p/2 orderings (0 — an error — for
p = 1). Here we pass `max_evals = p·(2m + 1)`, so exactly `p` antithetic orderings are drawn for
every row. With epsilon > 0 every feature of every row differs from the background, so m = M;
rows where some features coincide with the background (isclose, e.g. epsilon ≤ 0 or huge
values) are explained in a separate call with their own m, so the count stays exact.

Cost: hclust fits O(M²) small univariate XGBoost models (M = number of features); SHAP then
needs n_rows · p · (2M+1) nearest-neighbour queries over n_rows rows, done here as vectorised
numpy over each model call's batch.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "TIE_TOLERANCE",
    "NearestNeighbourModel",
    "prepare_shap_data",
    "compute_global_shap_stats",
    "shap_feature_weights",
]

log = logging.getLogger(__name__)

TIE_TOLERANCE = 1e-8
_STAT_KEYS = ("max", "min", "mean", "std", "median", "percentile_75th", "spearman_correlation", "upper_importance_bound")


class NearestNeighbourModel:
    """The abstracted model: y of the nearest data row (squared Euclidean), seeded tie-break.

    Rows whose squared distance is within `tie_tolerance` of the minimum are ties; one of them is
    chosen uniformly with a `numpy.random.default_rng(seed)` stream (deterministic for a seed and
    a fixed sequence of calls). Queries are processed in chunks of about `chunk_elems` distances;
    minimum and ties are decided on exactly recomputed distances (see `_nearest`)."""

    def __init__(
        self,
        data: np.ndarray,
        targets: np.ndarray,
        seed: int,
        tie_tolerance: float = TIE_TOLERANCE,
        chunk_elems: int = 1 << 22,
    ) -> None:
        self.data = np.ascontiguousarray(data, dtype=np.float64)
        self.targets = np.asarray(targets, dtype=np.float64).reshape(-1)
        if self.data.ndim != 2 or self.data.shape[0] != self.targets.shape[0] or self.data.shape[0] == 0:
            raise ValueError("NearestNeighbourModel needs a non-empty (n, M) matrix and n targets")
        self.tie_tolerance = float(tie_tolerance)
        self.rng = np.random.default_rng(seed)
        n, m = self.data.shape
        self._chunk = max(1, int(chunk_elems) // max(1, n))
        self._xx = np.einsum("ij,ij->i", self.data, self.data)
        self._xx_max = float(self._xx.max())
        self.n_calls = 0
        self.n_queries = 0

    def __call__(self, X: Any) -> np.ndarray:
        Q = np.asarray(X, dtype=np.float64)
        if Q.ndim == 1:
            Q = Q[None, :]
        self.n_calls += 1
        self.n_queries += Q.shape[0]
        out = np.empty(Q.shape[0], dtype=np.float64)
        for start in range(0, Q.shape[0], self._chunk):
            q = Q[start : start + self._chunk]
            out[start : start + q.shape[0]] = self.targets[self._nearest(q)]
        return out

    def _nearest(self, q: np.ndarray) -> np.ndarray:
        """Index of the chosen nearest row per query.

        Candidates come from the fast expansion |q|² − 2q·x + |x|² (BLAS); every row within
        tolerance + twice a generous rounding bound of the approximate minimum is re-measured
        exactly as Σ(q − x)², and the minimum and ties are decided on the exact distances (the
        true minimum and all true ties are always among the candidates)."""
        D = self.data
        qq = np.einsum("ij,ij->i", q, q)
        approx = qq[:, None] + self._xx[None, :] - 2.0 * (q @ D.T)
        slack = 2e-10 * (qq[:, None] + self._xx_max) + 1e-300
        cand = approx <= approx.min(axis=1, keepdims=True) + self.tie_tolerance + slack
        qi, ni = np.nonzero(cand)  # row-major: grouped by query, data index ascending
        diff = q[qi] - D[ni]
        exact = np.einsum("ij,ij->i", diff, diff)
        starts = np.flatnonzero(np.r_[True, qi[1:] != qi[:-1]])
        qmin = np.minimum.reduceat(exact, starts)
        counts_all = np.diff(np.r_[starts, qi.size])
        tie = exact <= np.repeat(qmin, counts_all) + self.tie_tolerance
        tq, tn = qi[tie], ni[tie]
        tstarts = np.flatnonzero(np.r_[True, tq[1:] != tq[:-1]])
        counts = np.diff(np.r_[tstarts, tq.size])
        pick = tstarts.copy()  # first tie (lowest data index)
        multi = np.flatnonzero(counts > 1)
        if multi.size:
            r = np.floor(self.rng.random(multi.size) * counts[multi]).astype(np.int64)
            pick[multi] += np.minimum(r, counts[multi] - 1)
        return tn[pick]


def prepare_shap_data(X: pd.DataFrame, y: Any, only_unique: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features and target as float64 with ALL NaNs (target included) set to 0 (spec §5);
    with `only_unique`, the unique rows of (X‖y), sorted (np.unique)."""
    Xa = X.to_numpy(dtype=np.float64, na_value=np.nan) if isinstance(X, pd.DataFrame) else np.asarray(X, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    if Xa.ndim != 2 or Xa.shape[0] != ya.shape[0]:
        raise ValueError(f"X has shape {Xa.shape} but y has {ya.shape[0]} values")
    Xa = np.nan_to_num(Xa, nan=0.0)
    ya = np.nan_to_num(ya, nan=0.0)
    if only_unique:
        both = np.unique(np.column_stack([Xa, ya]), axis=0)
        Xa, ya = both[:, :-1].copy(), both[:, -1].copy()
    return Xa, ya


def _clustering(Xa: np.ndarray, ya: np.ndarray) -> np.ndarray | None:
    import shap
    import xgboost

    if Xa.shape[1] < 2:
        return None
    # hclust fits O(M²) tiny univariate XGBoost models; one thread each is ~8× faster than
    # xgboost's default all-cores (thread start-up dominates on a few hundred rows)
    with warnings.catch_warnings(), xgboost.config_context(nthread=1):
        warnings.filterwarnings("ignore", message=".*[Nn]o/low signal found from feature.*")
        return shap.utils.hclust(Xa, ya)


def _seed_numba_rng(seed: int) -> None:
    """Seed numba's own random generator. shap's `partition_tree_shuffle` (the ordering draw
    under a Partition masker) is numba-compiled and uses numba's RNG, which `np.random.seed` in
    `shap.explainers.Permutation(seed=...)` does NOT reach — without this the orderings, and the
    SHAP values, change from run to run despite the seed."""
    global _NUMBA_SEEDER
    if _NUMBA_SEEDER is None:
        import numba

        @numba.njit(cache=False)
        def _seeder(s):  # pragma: no cover - compiled
            np.random.seed(s)

        _NUMBA_SEEDER = _seeder
    _NUMBA_SEEDER(np.uint32(int(seed) % (1 << 32)))


_NUMBA_SEEDER = None


def _explain(model: NearestNeighbourModel, Xa: np.ndarray, background: np.ndarray, clustering, seed: int, npermutations: int) -> np.ndarray:
    """Signed SHAP values (n × M) with exactly `npermutations` antithetic orderings per row."""
    import shap

    if clustering is not None:
        masker = shap.maskers.Partition(background, clustering=clustering)
    else:  # a single feature: no tree to respect
        masker = shap.maskers.Independent(background, max_samples=1)
    explainer = shap.explainers.Permutation(model, masker, seed=seed)  # seeds NumPy's global RNG
    _seed_numba_rng(seed)
    # m = features that differ from the background, as shap decides it (Tabular.invariants)
    varying = ~np.isclose(Xa, background[0][None, :])
    m_per_row = varying.sum(axis=1)
    values = np.zeros(Xa.shape, dtype=np.float64)
    for m in np.unique(m_per_row):  # usually a single group, m = M
        rows = np.flatnonzero(m_per_row == m)
        if m == 0:
            continue  # nothing varies: all SHAP values are 0
        max_evals = int(npermutations) * (2 * int(m) + 1)
        expl = explainer(Xa[rows], max_evals=max_evals, silent=True)
        values[rows] = np.asarray(expl.values, dtype=np.float64).reshape(len(rows), -1)
    return values


def _summary_plot(values: np.ndarray, Xa: np.ndarray, names: list[str], plot_path: Path) -> None:
    try:
        import matplotlib

        if "matplotlib.pyplot" not in __import__("sys").modules:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import shap

        plot_path = Path(plot_path)
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plt.figure()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation noise from shap/matplotlib
            shap.summary_plot(values, Xa, feature_names=names, plot_type="violin", show=False)
            plt.savefig(plot_path, bbox_inches="tight", dpi=120)
        plt.close("all")
    except Exception as exc:  # the plot is a by-product: log, never fail the stage
        log.warning("SHAP summary plot %s failed: %s: %s", plot_path, type(exc).__name__, exc)
        try:
            import matplotlib.pyplot as plt

            plt.close("all")
        except Exception:
            pass


def compute_global_shap_stats(
    X: pd.DataFrame,
    y: np.ndarray,
    *,
    seed: int,
    npermutations: int,
    epsilon: float = 0.1,
    only_unique: bool = False,
    plot_path: Path | None = None,
) -> dict[str, dict]:
    """Per-feature global statistics of |SHAP| of the nearest-neighbour abstracted model.

    Returns `{feature: {"max", "min", "mean", "std", "median", "percentile_75th",
    "spearman_correlation", "upper_importance_bound"}}` (floats; statistics of |SHAP| over all
    explained rows; Spearman ρ between the signed SHAP values and y, NaN when undefined;
    upper_importance_bound = mean + std), ordered by upper_importance_bound descending (stable).
    `npermutations` = the number of antithetic feature orderings drawn per row (≥ 1; see the
    module docstring). Raises on bad input; a failing plot is only logged."""
    from scipy.stats import spearmanr

    if int(npermutations) < 1:
        raise ValueError(f"npermutations must be ≥ 1, got {npermutations}")
    names = [str(c) for c in X.columns] if isinstance(X, pd.DataFrame) else [f"f{i}" for i in range(np.shape(X)[1])]
    Xa, ya = prepare_shap_data(X, y, only_unique=only_unique)
    if Xa.shape[0] == 0 or Xa.shape[1] == 0:
        raise ValueError(f"SHAP needs at least one row and one feature, got {Xa.shape}")
    background = (Xa.min(axis=0) - float(epsilon))[None, :]
    model = NearestNeighbourModel(Xa, ya, seed=seed)
    clustering = _clustering(Xa, ya)
    values = _explain(model, Xa, background, clustering, seed, int(npermutations))
    absv = np.abs(values)

    stats: dict[str, dict] = {}
    for j, name in enumerate(names):
        a = absv[:, j]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if np.ptp(values[:, j]) == 0 or np.ptp(ya) == 0:
                rho = float("nan")
            else:
                rho = float(spearmanr(values[:, j], ya).statistic)
        mean, std = float(a.mean()), float(a.std())
        stats[name] = {
            "max": float(a.max()),
            "min": float(a.min()),
            "mean": mean,
            "std": std,
            "median": float(np.median(a)),
            "percentile_75th": float(np.percentile(a, 75)),
            "spearman_correlation": rho,
            "upper_importance_bound": mean + std,
        }
    order = sorted(range(len(names)), key=lambda j: -stats[names[j]]["upper_importance_bound"])
    stats = {names[j]: stats[names[j]] for j in order}
    if plot_path is not None:
        _summary_plot(values, Xa, names, Path(plot_path))
    return stats


def shap_feature_weights(stats: dict[str, dict], feature_names: list[str]) -> np.ndarray:
    """`upper_importance_bound` per feature in `feature_names` order (a feature missing from
    `stats`, or a non-finite / non-positive value, counts as 0), zeros → 1e-8, normalised to sum 1.
    Raises ValueError on empty stats (the original crashed there, spec §12)."""
    if not stats:
        raise ValueError("no SHAP statistics (the SHAP stage failed or was skipped)")
    w = np.array(
        [float(stats.get(name, {}).get("upper_importance_bound", 0.0)) for name in feature_names],
        dtype=np.float64,
    )
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    w[w == 0] = 1e-8
    return w / w.sum()
