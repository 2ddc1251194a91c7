"""Rule options chosen by cross-validation inside TRAIN, never on TEST.

Stage 3 splits its TRAIN rows into stratified validation folds, fits every candidate setting of the
rule generator (SHAP-weighted trees or not, tree depth) on the other folds, and keeps the setting and
the OR-combo size whose combo scores the best mean MCC on the held-out folds; the caller then refits
that setting on the whole TRAIN. TEST labels play no part. One split of ~200 rows was too noisy to
choose on (fold-to-fold MCC spread 0.05–0.14 on the main job), hence folds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from lib.rules.combos import find_best_or_combo, score_frozen_combo

__all__ = ["RuleOptions", "Fold", "VALIDATION_GRID_CHOICES", "parse_validation_grid", "parse_int_list",
           "candidate_options", "carve_validation_folds", "scaled_min_support", "choose_rule_options"]

VALIDATION_GRID_CHOICES = ("shap_weights", "max_depth", "combo_size")
"""What the folds may choose: SHAP-weighted column sampling on or off, the trees' depth (shallow trees
give short, better-supported rules, as in RuleFit), and the number of literals of the OR-combo."""

MAX_COMBO_SIZE = 20
"""Longest greedy prefix scored per fold when choosing the combo size."""


@dataclass(frozen=True)
class RuleOptions:
    """One candidate setting of the rule generator."""

    use_shap_in_xgb: bool
    max_depth: int

    def label(self) -> str:
        return f"{'SHAP-weighted' if self.use_shap_in_xgb else 'uniform'} trees of depth {self.max_depth}"


@dataclass(frozen=True)
class Fold:
    """One validation fold: the fitting rows and the held-out rows of TRAIN."""

    X_fit: pd.DataFrame
    y_fit: np.ndarray
    X_val: pd.DataFrame
    y_val: np.ndarray


def parse_validation_grid(spec: str) -> tuple[str, ...]:
    """Comma list of `VALIDATION_GRID_CHOICES` (empty = choose nothing); ValueError naming the bad item."""
    items = tuple(dict.fromkeys(p.strip() for p in str(spec).split(",") if p.strip()))
    bad = [p for p in items if p not in VALIDATION_GRID_CHOICES]
    if bad:
        raise ValueError(f"--validation_grid: unknown item {bad[0]!r}; expected a comma list of "
                         f"{', '.join(VALIDATION_GRID_CHOICES)}")
    return items


def parse_int_list(spec: str, flag: str) -> tuple[int, ...]:
    """Comma list of positive integers; ValueError naming `flag`."""
    try:
        vals = tuple(dict.fromkeys(int(p) for p in str(spec).split(",") if p.strip()))
    except ValueError:
        raise ValueError(f"{flag}: expected a comma list of integers, got {spec!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag}: expected positive integers, got {spec!r}")
    return vals


def candidate_options(grid: Sequence[str], use_shap: bool, max_depth: int,
                      depths: Sequence[int]) -> list[RuleOptions]:
    """The settings to try: the flags as given first (they win ties), then the grid's alternatives."""
    shap_vals = [use_shap, not use_shap] if "shap_weights" in grid else [use_shap]
    depth_vals = list(dict.fromkeys([max_depth, *depths])) if "max_depth" in grid else [max_depth]
    return [RuleOptions(s, d) for s, d in itertools.product(shap_vals, depth_vals)]


def carve_validation_folds(y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id (0..n_folds-1) of every TRAIN row: stratified by `y` (NaN its own stratum) when each
    stratum has `n_folds` rows, else plain shuffled folds; seeded."""
    from sklearn.model_selection import KFold, StratifiedKFold

    n = len(y)
    if n_folds < 2 or n < 2 * n_folds:
        raise ValueError(f"{n_folds} validation folds need at least {2 * n_folds} TRAIN rows, got {n}")
    strata = pd.Series(y).astype(str).to_numpy()
    stratified = bool((pd.Series(strata).value_counts() >= n_folds).all())
    splitter = (StratifiedKFold(n_folds, shuffle=True, random_state=seed) if stratified
                else KFold(n_folds, shuffle=True, random_state=seed))
    fold = np.empty(n, dtype=np.int64)
    for i, (_, val_idx) in enumerate(splitter.split(np.zeros(n), strata if stratified else None)):
        fold[val_idx] = i
    return fold


def scaled_min_support(min_support: int, n_part: int, n_whole: int) -> int:
    """The support minimum for a subset of the rows, in proportion (so a literal that would pass on the
    whole TRAIN is not dropped on the fitting part for lack of rows)."""
    if min_support <= 0 or n_whole <= 0:
        return 0
    return max(1, int(math.floor(min_support * n_part / n_whole)))


def choose_rule_options(candidates: Sequence[RuleOptions], fit_rules: Callable[[RuleOptions, int], pd.DataFrame],
                        folds: Sequence[Fold], *, min_gain: float, min_supports: Sequence[int],
                        choose_size: bool) -> dict[str, Any]:
    """Mean held-out-fold MCC of every candidate (and, with `choose_size`, of every greedy prefix
    length); returns the trials and the winner: best mean MCC, ties to fewer literals, then to the
    earlier candidate. `fit_rules(option, fold index)` must fit on that fold's fitting rows only."""
    trials: list[dict[str, Any]] = []
    for ci, opt in enumerate(candidates):
        per_fold: list[dict[int | None, float]] = []
        sizes_seen: list[int] = []
        for fi, fold in enumerate(folds):
            rules = fit_rules(opt, fi)
            kw = dict(min_gain=min_gain, min_support=int(min_supports[fi]))
            full = find_best_or_combo(rules, fold.X_fit, fold.y_fit, **kw)
            n_full = len(full.get("selected_literals") or [])
            sizes_seen.append(n_full)
            scores: dict[int | None, float] = {None: _val_mcc(full, rules, fold)}
            if choose_size:
                for k in range(1, min(n_full, MAX_COMBO_SIZE) + 1):
                    rec = full if k == n_full else find_best_or_combo(rules, fold.X_fit, fold.y_fit,
                                                                      max_literals=k, **kw)
                    scores[k] = _val_mcc(rec, rules, fold)
            per_fold.append(scores)
        sizes: list[int | None] = [None]
        if choose_size:
            sizes = list(range(1, min(max(sizes_seen, default=0), MAX_COMBO_SIZE) + 1)) or [None]
        by_size = []
        for k in sizes:
            vals = [s.get(k, s[None]) if k is not None else s[None] for s in per_fold]
            by_size.append({"max_literals": k, "mean_validation_MCC": _mean(vals), "per_fold_MCC": vals})
        best = max(by_size, key=lambda r: (_num(r["mean_validation_MCC"]), -(r["max_literals"] or 0)))
        trials.append({"candidate": ci, "options": asdict(opt), "label": opt.label(),
                       "combo_literals_per_fold": sizes_seen, "by_size": by_size, "best": best})
    win = max(trials, key=lambda t: (_num(t["best"]["mean_validation_MCC"]), -(t["best"]["max_literals"] or 0),
                                     -t["candidate"]))
    return {"trials": trials, "chosen_candidate": win["candidate"], "chosen_options": win["options"],
            "chosen_label": win["label"], "chosen_max_literals": win["best"]["max_literals"],
            "validation_MCC": win["best"]["mean_validation_MCC"]}


def _val_mcc(rec: dict, rules: pd.DataFrame, fold: Fold) -> float:
    """MCC of a frozen combo on the fold's held-out rows (0 for no combo: it fires nowhere)."""
    if not rec.get("found_solution"):
        return 0.0
    return float(score_frozen_combo(rec, rules, fold.X_val, fold.y_val, scope_name="validation")["MCC"])


def _mean(vals: Sequence[float]) -> float:
    good = [v for v in vals if v is not None and not math.isnan(v)]
    return float(np.mean(good)) if good else math.nan


def _num(v: float) -> float:
    return -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
