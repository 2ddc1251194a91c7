"""RuleSHAP: candidate rules from a tree ensemble, an optional SHAP-weighted sparse linear stage,
and the per-rule table of stage 3 (spec stage 3, §6 and §7).

Rules are the root→leaf paths of an `XGBRegressor` (squared error; also for binary targets, as in
the original — documented choice). Each split on the path becomes `Atom.from_split`, i.e. XGBoost's
exact semantics `x < t` ("yes") / `x >= t` ("no") with the float32 threshold XGBoost used, so a
rule fires on exactly the rows that reach its leaf. Internal nodes do not become rules. A path
becomes `Rule(atoms).canonical()` (per feature the tightest lower and upper bound; atoms sorted
by feature name, op, threshold), identical canonical rules are merged (first occurrence kept,
exact comparison — no summed hash), and rules that fire on no training row are dropped, as are
empty rules (a tree that is a single leaf: TRUE carries no information).

Data handling (fit, transform, get_rules alike): the fitted feature columns are taken from the
frame, converted to float32 and NaN → 0 (stage 3 imputes first anyway); rows with a NaN target are
dropped. Rule text evaluated on a table with NaNs (comparisons false) can therefore differ from
`transform` on those rows only.

With `use_lasso=True` a real sparse linear stage runs (spec §6.3): design = [winsorised (2.5/97.5 %)
and Friedman-scaled (0.4/std, when > 2 distinct values) linear terms | rule indicators], solved by
`LassoCV` (10 automatic alphas, `lasso_cv` folds, max_iter 1000, tol 1e-4) with a SHAP-weighted
penalty α·Σ|w_j|/s_j implemented by scaling column j by s_j and mapping back w_j = s_j·v_j
(s_j = the feature's normalised weight; for a rule, the mean weight of its distinct features;
all 1 without feature weights). `get_rules` then keeps the nonzero components only.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd

from lib.rules.metrics import binary_rule_metrics_matrix, segmentation_stats_matrix
from lib.rules.expressions import Atom, Literal, Rule
from lib.rules.language import format_expression, format_feature
from lib.rules.evaluation import evaluate_many

__all__ = [
    "RuleSHAP",
    "BASE_COLUMNS",
    "CLASSIFICATION_METRIC_COLUMNS",
    "REGRESSION_METRIC_COLUMNS",
    "MCC_COLUMN",
    "TAIL_Q",
    "is_binary_target",
    "sanitize_feature_weights",
]

TAIL_Q = 0.90

BASE_COLUMNS: tuple[str, ...] = (
    "rule_index",
    "is_negated",
    "rule_expression",
    "component_type",
    "dataset_coverage",
    "coefficient_sign",
    "importance",
    "min_condition_coverage",
    "path_gain_sum",
    "path_gain_max",
    "importance_weighted_by_gain",
)
# §7 classification columns (2 dp), in order, with the §8.4 helper key each one shows
_CLASSIFICATION = (
    ("P(ŷ_model=coefficient_sign | fire)", "precision"),
    ("R(fire | ŷ_model=coefficient_sign)", "recall"),
    ("F1(ŷ_model=coefficient_sign | fire)", "f1"),
    ("Lift(ŷ_model=coefficient_sign | fire)", "lift"),
    ("Acc(ŷ_rule vs ŷ_model)", "accuracy"),
    ("Coverage(ŷ_model=1 correct by ŷ_rule)", "tpr"),
    ("Coverage(ŷ_model=0 correct by ŷ_rule)", "tnr"),
    ("BalancedAcc(ŷ_rule vs ŷ_model)", "balanced_accuracy"),
    ("MCC(ŷ_rule vs ŷ_model)", "mcc"),
)
CLASSIFICATION_METRIC_COLUMNS: tuple[str, ...] = tuple(c for c, _ in _CLASSIFICATION)
MCC_COLUMN = "MCC(ŷ_rule vs ŷ_model)"
_TAIL_EVENT = f"ŷ_model in signed_tail(q={TAIL_Q:.2f})"
# §7 regression columns (unrounded), in order, with the §8.3 key each one shows
_REGRESSION = (
    ("r(point-biserial; fire vs ŷ_model)", "r_pb"),
    ("Cohen_d(ŷ_model; fire vs ~fire)", "cohen_d"),
    ("E[ŷ_model | fire] - E[ŷ_model | ~fire]", "mean_shift"),
    ("R^2(ŷ_model segmented by fire)", "r2_seg"),
    (f"P({_TAIL_EVENT} | fire)", "prec_tail"),
    (f"R({_TAIL_EVENT} | fire)", "rec_tail"),
    (f"F1({_TAIL_EVENT} | fire)", "f1_tail"),
    (f"Lift({_TAIL_EVENT} | fire)", "lift_tail"),
)
REGRESSION_METRIC_COLUMNS: tuple[str, ...] = tuple(c for c, _ in _REGRESSION)


def is_binary_target(y: Any) -> bool:
    """True when the non-NaN values of `y` are a subset of {0, 1} (bools included)."""
    arr = np.asarray(y, dtype=np.float64).reshape(-1)
    arr = arr[~np.isnan(arr)]
    return bool(np.isin(arr, (0.0, 1.0)).all())


def sanitize_feature_weights(weights: Any, n_features: int) -> np.ndarray:
    """Spec §6.1: non-finite/negative → 0, zeros → 1e-8, normalised to sum 1."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n_features:
        raise ValueError(f"feature_weights has {w.shape[0]} values for {n_features} features")
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    w[w == 0] = 1e-8
    return w / w.sum()


class RuleSHAP:
    """Tree-ensemble rule generator (+ optional SHAP-weighted Lasso) and the §7 rule table.

    Fitted attributes: `feature_names_`, `model_` (XGBRegressor), `rules_` (list of canonical
    `Rule`), `rule_info_` (DataFrame per rule: max_gain, total_gain, min_rule_coverage,
    n_conditions, tree, leaf — the first leaf the rule came from), `n_candidate_paths_`,
    `problem_type_` ("classification"/"regression"), `feature_weights_` (normalised or None);
    with use_lasso: `coef_` (length M + R: linear terms then rules, original scale),
    `intercept_`, `alpha_`, `column_weights_`."""

    def __init__(
        self,
        random_state: int = 42,
        n_estimators: int = 500,
        max_depth: int = 10,
        colsample_bytree: float = 0.5,
        min_child_weight: float = 2,
        reg_alpha: float = 0.1,
        tree_method: str = "exact",
        use_lasso: bool = False,
        lasso_cv: int = 3,
        n_jobs: int | None = None,
    ) -> None:
        self.random_state = random_state
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.reg_alpha = reg_alpha
        self.tree_method = tree_method
        self.use_lasso = use_lasso
        self.lasso_cv = lasso_cv
        self.n_jobs = n_jobs
        self.coef_: np.ndarray | None = None

    # ----------------------------------------------------------------------------------------
    # data
    # ----------------------------------------------------------------------------------------

    def _prepare(self, X: pd.DataFrame, names: Sequence[str] | None = None) -> pd.DataFrame:
        """The feature columns as float32, NaN → 0, in fitted order (a fresh RangeIndex)."""
        if not isinstance(X, pd.DataFrame):
            raise TypeError(f"X must be a pandas DataFrame, got {type(X).__name__}")
        names = list(self.feature_names_ if names is None else names)
        missing = [c for c in names if c not in X.columns]
        if missing:
            raise KeyError(f"X lacks fitted feature column(s): {', '.join(map(repr, missing[:10]))}")
        cols = {}
        for c in names:
            col = X[c]
            if col.dtype == bool or col.dtype == object:
                col = col.astype("float64")
            arr = pd.to_numeric(col, errors="raise").to_numpy(dtype=np.float32, na_value=np.nan)
            cols[c] = np.nan_to_num(arr, nan=0.0)
        return pd.DataFrame(cols, index=pd.RangeIndex(len(X)))

    @staticmethod
    def _target(y: Any, n: int) -> np.ndarray:
        arr = np.asarray(y, dtype=np.float64).reshape(-1)
        if arr.shape[0] != n:
            raise ValueError(f"y has {arr.shape[0]} values for {n} rows")
        return arr

    # ----------------------------------------------------------------------------------------
    # fit
    # ----------------------------------------------------------------------------------------

    def _xgb_threads(self, n_rows: int) -> int:
        """n_jobs for XGBoost: as given, else 1 thread below 2000 rows (thread start-up dominates
        on small tables: measured ~0.5 s with 1 thread vs 6–16 s with xgboost's default for
        400 rows × 40 features × 500 trees), else all available CPUs. Rules do not depend on it."""
        if self.n_jobs is not None:
            return int(self.n_jobs)
        if n_rows < 2000:
            return 1
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - non-Linux
            return max(1, os.cpu_count() or 1)

    def _xgb(self, n_features: int, n_rows: int, weights: np.ndarray | None):
        from xgboost import XGBRegressor

        params = dict(
            objective="reg:squarederror",
            n_estimators=int(self.n_estimators),
            max_depth=int(self.max_depth),
            subsample=1.0,
            colsample_bytree=float(self.colsample_bytree),
            tree_method=self.tree_method,
            min_child_weight=float(self.min_child_weight),
            reg_alpha=float(self.reg_alpha),
            random_state=int(self.random_state),
            n_jobs=self._xgb_threads(n_rows),
        )
        if weights is not None:
            params["colsample_bylevel"] = 1.0 / n_features
            # xgboost ≥ 3 takes feature_weights in the constructor (fit(feature_weights=) is
            # deprecated); the effect is the same as the original's fit argument
            params["feature_weights"] = weights
        return XGBRegressor(**params)

    def fit(self, X: pd.DataFrame, y: Any, feature_weights: Any = None) -> "RuleSHAP":
        if not isinstance(X, pd.DataFrame):
            raise TypeError(f"X must be a pandas DataFrame, got {type(X).__name__}")
        self.feature_names_ = [str(c) for c in X.columns]
        if len(set(self.feature_names_)) != len(self.feature_names_):
            raise ValueError("X has duplicate column names")
        M = len(self.feature_names_)
        if M == 0:
            raise ValueError("X has no feature columns")
        yv = self._target(y, len(X))
        keep = ~np.isnan(yv)
        Xp = self._prepare(X).loc[keep].reset_index(drop=True)
        yv = yv[keep]
        n = len(Xp)
        if n == 0:
            raise ValueError("no training rows with a non-NaN target")
        self.problem_type_ = "classification" if is_binary_target(yv) else "regression"
        self.feature_weights_ = None if feature_weights is None else sanitize_feature_weights(feature_weights, M)

        model = self._xgb(M, n, self.feature_weights_)
        # numpy input: splits are named f<k> whatever the column names are
        model.fit(Xp.to_numpy(dtype=np.float32), yv, verbose=False)
        self.model_ = model

        rules, info = self._rules_from_trees(model.get_booster().trees_to_dataframe(), n)
        Z = evaluate_many(rules, Xp) if rules else np.zeros((n, 0), dtype=bool)
        fires = Z.any(axis=0)
        self.rules_ = [r for r, f in zip(rules, fires) if f]
        self.rule_info_ = info.loc[fires].reset_index(drop=True)
        Z = Z[:, fires]

        self.coef_ = None
        if self.use_lasso:
            self._fit_lasso(Xp, yv, Z)
        return self

    def _rules_from_trees(self, trees: pd.DataFrame, n_rows: int) -> tuple[list[Rule], pd.DataFrame]:
        """Every root→leaf path as a canonical Rule, deduplicated (first occurrence kept)."""
        names = self.feature_names_
        seen: dict[Rule, int] = {}
        rules: list[Rule] = []
        rows: list[tuple] = []
        n_paths = 0
        for tree_id, t in trees.groupby("Tree", sort=True):
            nodes = {
                nid: (feat, split, yes, no, gain, cover)
                for nid, feat, split, yes, no, gain, cover in zip(
                    t["ID"], t["Feature"], t["Split"], t["Yes"], t["No"], t["Gain"], t["Cover"]
                )
            }
            root = f"{tree_id}-0"
            # iterative DFS; path = list of (atom, gain, support)
            stack: list[tuple[str, list]] = [(root, [])]
            while stack:
                nid, path = stack.pop()
                feat, split, yes, no, gain, cover = nodes[nid]
                if feat == "Leaf":
                    n_paths += 1
                    if not path:
                        continue  # single-leaf tree: the TRUE rule carries no information
                    rule = Rule(tuple(a for a, _, _ in path)).canonical()
                    if rule in seen:
                        continue
                    kept = set(rule.atoms)
                    gains, supports, used = [], [], set()
                    for a, g, s in path:  # the first condition of each kept atom
                        if a in kept and a not in used:
                            used.add(a)
                            gains.append(g)
                            supports.append(s)
                    seen[rule] = len(rules)
                    rules.append(rule)
                    rows.append((max(gains), sum(gains), min(supports), len(rule.atoms), int(tree_id), nid))
                    continue
                if not (isinstance(feat, str) and feat.startswith("f") and feat[1:].isdigit()):
                    raise ValueError(f"unexpected split feature {feat!r} in tree {tree_id}")
                name = names[int(feat[1:])]
                support = float(cover) / n_rows
                # push "no" first so the "yes" subtree is walked first (stable, tree order)
                stack.append((no, path + [(Atom.from_split(name, float(split), False), float(gain), support)]))
                stack.append((yes, path + [(Atom.from_split(name, float(split), True), float(gain), support)]))
        self.n_candidate_paths_ = n_paths
        info = pd.DataFrame(
            rows, columns=["max_gain", "total_gain", "min_rule_coverage", "n_conditions", "tree", "leaf"]
        )
        return rules, info

    # ----------------------------------------------------------------------------------------
    # sparse linear stage
    # ----------------------------------------------------------------------------------------

    def _linear_fit_params(self, Xp: pd.DataFrame) -> None:
        A = Xp.to_numpy(dtype=np.float64)
        lo = np.quantile(A, 0.025, axis=0)
        hi = np.quantile(A, 0.975, axis=0)
        W = np.clip(A, lo, hi)
        scale = np.ones(A.shape[1])
        for j in range(A.shape[1]):
            if np.unique(W[:, j]).size > 2:
                scale[j] = 0.4 / (1e-12 + W[:, j].std())
        self.lin_lower_, self.lin_upper_, self.lin_scale_ = lo, hi, scale

    def _linear_terms(self, Xp: pd.DataFrame) -> np.ndarray:
        A = Xp.to_numpy(dtype=np.float64)
        return np.clip(A, self.lin_lower_, self.lin_upper_) * self.lin_scale_

    def _fit_lasso(self, Xp: pd.DataFrame, y: np.ndarray, Z: np.ndarray) -> None:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LassoCV

        M = Xp.shape[1]
        self._linear_fit_params(Xp)
        L = self._linear_terms(Xp)
        fw = np.full(M, 1.0) if self.feature_weights_ is None else self.feature_weights_
        index = {name: j for j, name in enumerate(self.feature_names_)}
        rule_w = np.array(
            [np.mean([fw[index[f]] for f in sorted({a.feature for a in r.atoms})]) for r in self.rules_],
            dtype=np.float64,
        )
        s = np.concatenate([fw, rule_w])
        D = np.hstack([L, Z.astype(np.float64)]) * s
        cv = max(2, min(int(self.lasso_cv), len(y)))
        lasso = LassoCV(alphas=10, cv=cv, random_state=self.random_state, max_iter=1000, tol=1e-4, n_jobs=self.n_jobs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            lasso.fit(D, y)
        self.column_weights_ = s
        self.coef_ = lasso.coef_ * s
        self.intercept_ = float(lasso.intercept_)
        self.alpha_ = float(lasso.alpha_)

    # ----------------------------------------------------------------------------------------
    # application
    # ----------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "rules_"):
            raise RuntimeError("RuleSHAP is not fitted; call fit() first")

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        """Rule activation matrix Z (n_rows × n_rules, bool) via lib.rules.evaluation.evaluate_many."""
        self._check_fitted()
        Xp = self._prepare(X)
        if not self.rules_:
            return np.zeros((len(Xp), 0), dtype=bool)
        return evaluate_many(self.rules_, Xp)

    def get_rules(self, X: pd.DataFrame, y: Any) -> pd.DataFrame:
        """The §7 per-rule table on (X, y) (rows with NaN y dropped). Columns: BASE_COLUMNS, then
        CLASSIFICATION_METRIC_COLUMNS when y ⊆ {0,1} (sorted by MCC desc) or else
        REGRESSION_METRIC_COLUMNS (sorted by importance_weighted_by_gain desc); stable sorts.
        Every literal is oriented to be positively associated with y (NOT(rule) when
        mean(y|fire) − mean(y|¬fire) < 0); `rule_expression` evaluates exactly to its fire mask.
        With the Lasso stage only nonzero components are listed, importance = |coef|, and linear
        terms appear as `component_type='linear'` rows (rule_index −1, fire = |coef·x| ≥ its 75th
        percentile, coefficient_sign = sign of coef, path columns NaN)."""
        self._check_fitted()
        yv = self._target(y, len(X))
        keep = ~np.isnan(yv)
        Xp = self._prepare(X).loc[keep].reset_index(drop=True)
        yv = yv[keep]
        n = len(yv)
        classification = is_binary_target(yv)
        metric_cols = CLASSIFICATION_METRIC_COLUMNS if classification else REGRESSION_METRIC_COLUMNS
        columns = list(BASE_COLUMNS) + list(metric_cols)

        Z = evaluate_many(self.rules_, Xp) if self.rules_ else np.zeros((n, 0), dtype=bool)
        rule_idx = np.arange(Z.shape[1])
        info = self.rule_info_
        if self.use_lasso:
            if self.coef_ is None:
                raise RuntimeError("use_lasso=True but the Lasso stage did not run")
            rule_coef = self.coef_[len(self.feature_names_):]
            rule_idx = np.flatnonzero(rule_coef != 0)
        Zs = Z[:, rule_idx]

        # orientation by the mean difference (0 when the rule fires on all or no rows)
        nf = Zs.sum(axis=0)
        Zf = Zs.astype(np.float64)
        sum_f = yv @ Zf
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_f = sum_f / np.maximum(nf, 1)
            mean_nf = (yv.sum() - sum_f) / np.maximum(n - nf, 1)
        score = np.where((nf > 0) & (nf < n), mean_f - mean_nf, 0.0)
        negated = score < 0
        F = np.where(negated[None, :], ~Zs, Zs)

        if self.use_lasso:
            importance = np.abs(rule_coef[rule_idx])
        else:
            importance = np.abs(score)
        max_gain = info["max_gain"].to_numpy(dtype=np.float64)[rule_idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_gain = np.log(np.abs(max_gain))
        iwg = (1.0 + importance) * np.maximum(1.0, np.where(np.isfinite(log_gain), log_gain, 1.0))
        texts = [format_expression(Literal(self.rules_[j], bool(neg))) for j, neg in zip(rule_idx, negated)]
        parts = {
            "rule_index": rule_idx.astype(np.int64),
            "is_negated": negated.astype(bool),
            "rule_expression": texts,
            "component_type": ["rule"] * len(rule_idx),
            "dataset_coverage": F.mean(axis=0) if n else np.full(len(rule_idx), np.nan),
            "coefficient_sign": ["positive"] * len(rule_idx),
            "importance": importance,
            "min_condition_coverage": info["min_rule_coverage"].to_numpy(dtype=np.float64)[rule_idx],
            "path_gain_sum": info["total_gain"].to_numpy(dtype=np.float64)[rule_idx],
            "path_gain_max": max_gain,
            "importance_weighted_by_gain": iwg,
        }
        table = pd.DataFrame(parts)
        fire_all = F

        if self.use_lasso:  # nonzero linear terms
            lin_coef = self.coef_[: len(self.feature_names_)]
            lin_idx = np.flatnonzero(lin_coef != 0)
            if lin_idx.size:
                L = self._linear_terms(Xp)[:, lin_idx] * lin_coef[lin_idx]
                mag = np.abs(L)
                thr = np.percentile(mag, 75, axis=0) if n else np.zeros(lin_idx.size)
                FL = mag >= thr[None, :]
                imp = np.abs(lin_coef[lin_idx])
                lin = pd.DataFrame(
                    {
                        "rule_index": np.full(lin_idx.size, -1, dtype=np.int64),
                        "is_negated": np.zeros(lin_idx.size, dtype=bool),
                        "rule_expression": [format_feature(self.feature_names_[j]) for j in lin_idx],
                        "component_type": ["linear"] * lin_idx.size,
                        "dataset_coverage": FL.mean(axis=0) if n else np.full(lin_idx.size, np.nan),
                        "coefficient_sign": np.where(lin_coef[lin_idx] > 0, "positive", "negative"),
                        "importance": imp,
                        "min_condition_coverage": np.nan,
                        "path_gain_sum": np.nan,
                        "path_gain_max": np.nan,
                        "importance_weighted_by_gain": 1.0 + imp,
                    }
                )
                table = pd.concat([table, lin], ignore_index=True) if len(table) else lin
                fire_all = np.hstack([F, FL])

        if classification:
            m = binary_rule_metrics_matrix(fire_all, yv)
            for col, key in _CLASSIFICATION:
                v = np.asarray(m[key], dtype=np.float64)
                table[col] = np.where(np.isfinite(v), v, np.nan)
        else:
            m = segmentation_stats_matrix(fire_all, yv, TAIL_Q)
            for col, key in _REGRESSION:
                table[col] = np.asarray(m[key], dtype=np.float64)

        sort_key = MCC_COLUMN if classification else "importance_weighted_by_gain"
        if len(table):
            order = np.argsort(-table[sort_key].fillna(-np.inf).to_numpy(), kind="stable")
            table = table.iloc[order].reset_index(drop=True)
        round_cols = [
            "dataset_coverage",
            "importance",
            "min_condition_coverage",
            "path_gain_sum",
            "path_gain_max",
            "importance_weighted_by_gain",
        ]
        if classification:
            round_cols += list(CLASSIFICATION_METRIC_COLUMNS)
        for c in round_cols:
            table[c] = table[c].astype(np.float64).round(2)
        if not len(table):
            table = pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
        return table[columns]

    def literal_masks(self, X: pd.DataFrame, table: pd.DataFrame) -> np.ndarray:
        """Fire masks (n × rows) of the `component_type == 'rule'` rows of a get_rules table:
        transform() column `rule_index`, complemented where `is_negated` (NaN-target rows kept)."""
        Z = self.transform(X)
        rows = table[table["component_type"] == "rule"]
        idx = rows["rule_index"].to_numpy(dtype=np.int64)
        neg = rows["is_negated"].to_numpy(dtype=bool)
        M = Z[:, idx]
        return np.where(neg[None, :], ~M, M)
