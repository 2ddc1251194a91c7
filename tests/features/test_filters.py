"""Stage-2 filters and imputation on hand-built matrices with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from lib.features.filters import (
    drop_constant,
    fit_medians,
    impute,
    mad_high_variance_filter,
    near_duplicate_filter,
    predictive_power_filter,
    predictive_power_metrics,
    sanitize_column_names,
)


def test_sanitize_matches_spec_examples_and_resolves_clashes():
    labels = ["Relative closeness ≤ 10%", "GCD > 1", "Division: q_int in [0,3]", "GCD > 1", "Prompt"]
    assert sanitize_column_names(labels, reserved=["prompt"]) == [
        "relative_closeness_10", "gcd_1", "division_q_int_in_0_3", "gcd_1_1", "prompt_1"]


def test_drop_constant_treats_missing_as_zero():
    X = np.array([[1.0, 0.0, np.nan, 2.0], [1.0, np.nan, 0.0, 3.0], [1.0, 0.0, np.nan, 2.0]])
    res = drop_constant(X)
    assert res.kept == [3] and set(res.dropped) == {0, 1, 2}


def test_mad_filter_drops_only_the_high_variance_outlier():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 12))
    X[:, 5] *= 1e6
    res = mad_high_variance_filter(X, z_thresh=10)
    assert res.kept == [j for j in range(12) if j != 5] and list(res.dropped) == [5]


def test_predictive_metrics_skip_missing_values():
    y = np.array([1, 1, 1, 0, 0, 0])
    x = np.array([5.0, 4.0, np.nan, 1.0, 0.0, 2.0])
    m = predictive_power_metrics(x, y)
    assert m["auc"] == pytest.approx(1.0) and m["n"] == 5
    assert np.isfinite(m["delta_mean_std_units"]) and m["delta_mean_std_units"] > 1


def test_predictive_filter_keeps_signal_drops_noise():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=400)
    signal = y + rng.normal(scale=0.3, size=400)
    noise = rng.normal(size=400)
    res, metrics = predictive_power_filter(np.column_stack([signal, noise]), y, min_delta=0.2,
                                           min_ap_above_base=-1.0)
    assert res.kept == [0] and 1 in res.dropped
    assert metrics[0]["best_auc"] > 0.9


def test_near_duplicate_compares_with_kept_columns_only():
    a = np.arange(10, dtype=float)
    X = np.column_stack([a, 2 * a + 1, np.sin(a), a])
    res = near_duplicate_filter(X, 0.9999, names=["a", "b", "c", "d"])
    assert res.kept == [0, 2] and "'a'" in res.dropped[1] and "'a'" in res.dropped[3]


def test_imputation_uses_train_medians():
    X_train = np.array([[1.0, np.nan], [3.0, np.nan], [100.0, np.nan]])
    med = fit_medians(X_train)
    assert med.tolist() == [3.0, 0.0]
    assert impute(np.array([[np.nan, np.nan]]), med).tolist() == [[3.0, 0.0]]
