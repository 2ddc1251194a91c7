"""Rule options chosen on validation folds of TRAIN (`lib.rules.validation`): folds, the choice, its tie rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.rules.validation import (Fold, RuleOptions, candidate_options, carve_validation_folds, choose_rule_options,
                                  parse_int_list, parse_validation_grid, scaled_min_support)


def _rules(*texts: str) -> pd.DataFrame:
    return pd.DataFrame({"rule_index": range(len(texts)), "is_negated": [False] * len(texts),
                         "rule_expression": list(texts), "component_type": ["rule"] * len(texts)})


def test_folds_partition_train_rows_stratified_and_seeded():
    y = np.array([1.0] * 40 + [0.0] * 160)
    fold = carve_validation_folds(y, 4, seed=3)
    assert sorted(np.bincount(fold)) == [50, 50, 50, 50]
    assert all((y[fold == i] == 1).sum() == 10 for i in range(4))  # stratified
    assert (carve_validation_folds(y, 4, seed=3) == fold).all()
    assert not (carve_validation_folds(y, 4, seed=4) == fold).all()
    with pytest.raises(ValueError, match="at least 8 TRAIN rows"):
        carve_validation_folds(y[:7], 4, seed=0)


def test_grid_parsing_and_candidates():
    assert parse_validation_grid("combo_size, shap_weights") == ("combo_size", "shap_weights")
    with pytest.raises(ValueError, match="unknown item 'depth'"):
        parse_validation_grid("depth")
    with pytest.raises(ValueError, match="--validation_max_depths"):
        parse_int_list("2,x", "--validation_max_depths")
    cands = candidate_options(("shap_weights", "max_depth"), True, 10, (2, 10))
    assert cands == [RuleOptions(True, 10), RuleOptions(True, 2), RuleOptions(False, 10), RuleOptions(False, 2)]
    assert candidate_options((), False, 10, (2,)) == [RuleOptions(False, 10)]
    assert scaled_min_support(32, 600, 800) == 24 and scaled_min_support(0, 600, 800) == 0


def _planted_folds(n: int = 400, seed: int = 0) -> tuple[list[Fold], pd.DataFrame, np.ndarray, np.ndarray]:
    """y = a, 10 % label noise; `noise_<i>` columns each mark one noisy positive row of the data."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, n)
    y = np.where(rng.random(n) < 0.1, 1 - a, a).astype(float)
    X = pd.DataFrame({"a": a.astype(float)})
    noisy = np.flatnonzero((y == 1) & (a == 0))
    for i, r in enumerate(noisy):
        col = np.zeros(n)
        col[r] = 1.0
        X[f"noise_{i}"] = col
    fold = carve_validation_folds(y, 4, seed)
    folds = [Fold(X[fold != i].reset_index(drop=True), y[fold != i], X[fold == i].reset_index(drop=True),
                  y[fold == i]) for i in range(4)]
    return folds, X, y, fold


def test_choice_prefers_the_generalising_candidate_and_cuts_memorising_literals():
    """Candidate 0 memorises the noisy rows of its fitting part (perfect on them, useless elsewhere);
    candidate 1 offers the planted literal. The folds pick candidate 1 and one literal, although the
    memorising literals raise the fitting MCC."""
    folds, X, y, fold = _planted_folds()
    calls = []

    def fit(opt: RuleOptions, i: int) -> pd.DataFrame:
        calls.append((opt, i))
        fit_rows = folds[i].X_fit
        memo = [c for c in fit_rows.columns if c.startswith("noise_") and fit_rows[c].sum() > 0]
        if opt.max_depth == 10:
            return _rules(*[f"{c} >= 0.5" for c in memo])
        return _rules("a >= 0.5", *[f"{c} >= 0.5" for c in memo])

    cands = [RuleOptions(False, 10), RuleOptions(False, 2)]
    out = choose_rule_options(cands, fit, folds, min_gain=0.0, min_supports=[0] * 4, choose_size=True)
    assert sorted(calls, key=lambda c: (c[0].max_depth, c[1])) == [(o, i) for o in sorted(cands, key=lambda o: o.max_depth)
                                                                   for i in range(4)]
    assert out["chosen_options"] == {"use_shap_in_xgb": False, "max_depth": 2}
    assert out["chosen_max_literals"] == 1
    trial = out["trials"][1]
    assert trial["combo_literals_per_fold"][0] > 1  # the full greedy path adds memorising literals
    full_val = trial["by_size"][-1]["mean_validation_MCC"]
    assert out["validation_MCC"] == trial["by_size"][0]["mean_validation_MCC"] >= full_val
    assert out["validation_MCC"] > 0.7 > out["trials"][0]["best"]["mean_validation_MCC"]


def test_ties_go_to_fewer_literals_then_the_first_candidate():
    folds, *_ = _planted_folds()
    same = choose_rule_options([RuleOptions(True, 3), RuleOptions(False, 3)], lambda o, i: _rules("a >= 0.5"), folds,
                               min_gain=0.0, min_supports=[0] * 4, choose_size=True)
    assert same["chosen_candidate"] == 0 and same["chosen_max_literals"] == 1
