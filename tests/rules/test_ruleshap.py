"""RuleSHAP (rules from trees, Lasso stage, §7 table), rule metrics and the SHAP stage on a
planted rule: target = (f1 > 3) & (f2 <= 0.5) with 5 % label noise, ten distractors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xgboost

from lib.rules.shap_importance import compute_global_shap_stats, shap_feature_weights
from lib.rules.metrics import binary_rule_metrics, segmentation_stats
from lib.rules.ruleshap import (
    BASE_COLUMNS,
    CLASSIFICATION_METRIC_COLUMNS,
    MCC_COLUMN,
    REGRESSION_METRIC_COLUMNS,
    RuleSHAP,
)
from lib.rules.language import parse_literal
from lib.rules.evaluation import evaluate

N_EST = 50


def planted_table(n: int = 600, seed: int = 2, noise: float = 0.05):
    rng = np.random.default_rng(seed)
    data = {"f1": rng.uniform(0, 6, n), "f2": rng.uniform(0, 1, n)}
    for i in range(3, 13):
        data[f"f{i}"] = rng.uniform(0, 1, n)
    X = pd.DataFrame(data)
    truth = ((X["f1"] > 3) & (X["f2"] <= 0.5)).to_numpy()
    flip = rng.random(n) < noise
    y = np.where(flip, ~truth, truth).astype(float)
    return X, y, truth


@pytest.fixture(scope="module")
def planted():
    return planted_table()


@pytest.fixture(scope="module")
def fitted(planted):
    X, y, _ = planted
    model = RuleSHAP(random_state=42, n_estimators=N_EST).fit(X, y)
    return model, model.get_rules(X, y)


# ------------------------------------------------------------------------------------------
# rules
# ------------------------------------------------------------------------------------------


def test_planted_rule_is_recovered(planted, fitted):
    X, y, truth = planted
    _, table = fitted
    best_agree, best_mcc = -1.0, None
    for text, mcc in zip(table["rule_expression"], table[MCC_COLUMN]):
        agree = float((evaluate(text, X) == truth).mean())
        if agree > best_agree:
            best_agree, best_mcc = agree, mcc
    assert best_agree >= 0.95
    assert best_mcc >= 0.85
    # the best-MCC literal (table is sorted by MCC) is the planted one
    top = evaluate(table["rule_expression"].iloc[0], X)
    assert (top == truth).mean() >= 0.95


def test_table_columns_order_rounding_and_sort(fitted):
    _, table = fitted
    assert list(table.columns) == list(BASE_COLUMNS) + list(CLASSIFICATION_METRIC_COLUMNS)
    assert len(table) > 0
    assert (table["component_type"] == "rule").all()
    assert (table["coefficient_sign"] == "positive").all()
    mcc = table[MCC_COLUMN].fillna(-np.inf).to_numpy()
    assert (np.diff(mcc) <= 0).all()
    rounded = ["dataset_coverage", "importance", "path_gain_max", *CLASSIFICATION_METRIC_COLUMNS]
    for c in rounded:
        v = table[c].dropna().to_numpy()
        np.testing.assert_array_equal(v, np.round(v, 2))
    # importance_weighted_by_gain = (1 + importance) * max(1, ln|max_gain|) (before rounding)
    exp = (1 + table["importance"]) * np.maximum(1, np.log(table["path_gain_max"].abs().clip(lower=1e-300)))
    assert np.allclose(table["importance_weighted_by_gain"], exp, atol=0.05)
    assert table["is_negated"].any() and (~table["is_negated"]).any()


def test_rule_text_evaluates_exactly_to_transform(planted, fitted):
    X, _, _ = planted
    model, table = fitted
    Z = model.transform(X)
    assert Z.dtype == bool and Z.shape == (len(X), len(model.rules_))
    for idx, neg, text in zip(table["rule_index"], table["is_negated"], table["rule_expression"]):
        expected = ~Z[:, idx] if neg else Z[:, idx]
        np.testing.assert_array_equal(evaluate(text, X), expected)
        lit = parse_literal(text)
        assert lit.negated == bool(neg) and lit.rule == model.rules_[idx]
    np.testing.assert_array_equal(model.literal_masks(X, table).mean(axis=0).round(2), table["dataset_coverage"])


def test_rules_follow_xgboost_leaves_exactly(planted, fitted):
    """Each rule fires on exactly the rows XGBoost routes to the leaf it came from."""
    X, _, _ = planted
    model, _ = fitted
    leaves = model.model_.get_booster().predict(xgboost.DMatrix(X.to_numpy(np.float32)), pred_leaf=True)
    Z = model.transform(X)
    info = model.rule_info_
    for j, (tree, leaf) in enumerate(zip(info["tree"], info["leaf"])):
        np.testing.assert_array_equal(Z[:, j], leaves[:, tree] == int(leaf.split("-")[1]))


def test_rules_are_canonical_unique_and_fire(fitted):
    model, _ = fitted
    assert len(set(model.rules_)) == len(model.rules_)
    assert all(r == r.canonical() and r.atoms for r in model.rules_)
    assert list(model.rule_info_.columns[:3]) == ["max_gain", "total_gain", "min_rule_coverage"]
    assert len(model.rule_info_) == len(model.rules_)
    assert (model.rule_info_["max_gain"] <= model.rule_info_["total_gain"] + 1e-9).all()
    assert model.rule_info_["min_rule_coverage"].between(0, 1).all()


def test_fit_is_deterministic(planted, fitted):
    X, y, _ = planted
    model, table = fitted
    again = RuleSHAP(random_state=42, n_estimators=N_EST).fit(X, y)
    assert again.rules_ == model.rules_
    pd.testing.assert_frame_equal(again.rule_info_, model.rule_info_)
    pd.testing.assert_frame_equal(again.get_rules(X, y), table)
    other = RuleSHAP(random_state=7, n_estimators=N_EST).fit(X, y)
    assert other.rules_ != model.rules_


def test_lasso_keeps_a_sparse_nonempty_subset(planted):
    X, y, truth = planted
    weights = np.linspace(1.0, 0.1, X.shape[1])
    model = RuleSHAP(random_state=42, n_estimators=20, use_lasso=True).fit(X, y, feature_weights=weights)
    n_components = len(model.rules_) + X.shape[1]
    assert model.coef_.shape == (n_components,)
    nonzero = int((model.coef_ != 0).sum())
    assert 1 <= nonzero < len(model.rules_)
    table = model.get_rules(X, y)
    assert len(table) == nonzero
    assert set(table["component_type"]) <= {"rule", "linear"}
    rules = table[table["component_type"] == "rule"]
    coef = model.coef_[X.shape[1] :][rules["rule_index"].to_numpy()]
    np.testing.assert_allclose(rules["importance"], np.abs(coef).round(2))
    assert (coef != 0).all()
    # the planted literal survives the sparse stage
    best = max((evaluate(t, X) == truth).mean() for t in rules["rule_expression"])
    assert best >= 0.95


def test_regression_table(planted):
    X, _, truth = planted
    rng = np.random.default_rng(3)
    t = X["f1"].to_numpy() * truth + rng.normal(0, 0.3, len(X))
    model = RuleSHAP(random_state=0, n_estimators=20).fit(X, t)
    assert model.problem_type_ == "regression"
    table = model.get_rules(X, t)
    assert list(table.columns) == list(BASE_COLUMNS) + list(REGRESSION_METRIC_COLUMNS)
    iwg = table["importance_weighted_by_gain"].to_numpy()
    assert (np.diff(iwg) <= 0).all()
    # every literal is positively associated with t
    assert (table["E[ŷ_model | fire] - E[ŷ_model | ~fire]"].dropna() >= 0).all()


def test_nan_target_rows_are_dropped(planted):
    X, y, _ = planted
    y2 = y.copy()
    y2[:10] = np.nan
    model = RuleSHAP(random_state=0, n_estimators=5).fit(X, y2)
    table = model.get_rules(X, y2)
    assert model.problem_type_ == "classification" and len(table) > 0


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------


def test_binary_rule_metrics_against_sklearn():
    from sklearn.metrics import matthews_corrcoef, precision_score, recall_score

    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    fire = (y & (rng.random(200) < 0.8)) | (rng.random(200) < 0.1)
    m = binary_rule_metrics(fire, y.astype(float))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, fire))
    assert m["precision"] == pytest.approx(precision_score(y, fire))
    assert m["recall"] == pytest.approx(recall_score(y, fire))
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == 200
    assert m["lift"] == pytest.approx(m["precision"] / y.mean())
    empty = binary_rule_metrics(np.zeros(200, bool), y)
    assert np.isnan(empty["precision"]) and empty["mcc"] == 0.0


def test_segmentation_stats():
    rng = np.random.default_rng(1)
    fire = rng.random(300) < 0.4
    t = rng.normal(size=300) + 2.0 * fire
    s = segmentation_stats(fire, t)
    assert s["mean_shift"] == pytest.approx(t[fire].mean() - t[~fire].mean())
    between = fire.mean() * (1 - fire.mean()) * s["mean_shift"] ** 2
    assert s["r2_seg"] == pytest.approx(between / t.var(), rel=1e-9)
    assert s["r_pb"] > 0.5 and s["cohen_d"] > 1.5
    assert 0 <= s["prec_tail"] <= 1 and s["event_threshold"] == pytest.approx(np.quantile(t, 0.9))


# ------------------------------------------------------------------------------------------
# SHAP stage
# ------------------------------------------------------------------------------------------


def test_shap_stats_rank_planted_features_first(planted, tmp_path):
    X, y, _ = planted
    plot = tmp_path / "summary_plot" / "shap_summary_plot_y.png"
    stats = compute_global_shap_stats(X, y, seed=42, npermutations=3, plot_path=plot)
    assert list(stats)[:2] in (["f1", "f2"], ["f2", "f1"])
    assert set(stats) == set(X.columns)
    ub = [s["upper_importance_bound"] for s in stats.values()]
    assert ub == sorted(ub, reverse=True)
    for s in stats.values():
        assert set(s) == {"max", "min", "mean", "std", "median", "percentile_75th", "spearman_correlation", "upper_importance_bound"}
        assert s["upper_importance_bound"] == pytest.approx(s["mean"] + s["std"])
        assert 0 <= s["min"] <= s["median"] <= s["max"]
    assert plot.is_file() and plot.stat().st_size > 0
    w = shap_feature_weights(stats, list(X.columns))
    assert w.shape == (12,) and w.sum() == pytest.approx(1.0) and w.argmax() == 0


def test_shap_npermutations_is_the_number_of_orderings(monkeypatch):
    import shap.explainers._permutation as perm

    calls = {"n": 0}
    real = perm.partition_tree_shuffle

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(perm, "partition_tree_shuffle", counting)
    rng = np.random.default_rng(5)
    n = 30
    X = pd.DataFrame({"a": rng.uniform(0, 1, n), "b": rng.integers(0, 3, n).astype(float), "c": rng.normal(size=n)})
    # a huge-valued feature: rows at its minimum count as "at the background" for shap (isclose),
    # so they vary one feature fewer — the count must still be exact
    X["d"] = 1e6 + rng.integers(0, 3, n)
    y = (X["a"] > 0.5).astype(float).to_numpy()
    for k in (1, 3):
        calls["n"] = 0
        stats = compute_global_shap_stats(X, y, seed=0, npermutations=k)
        assert calls["n"] == n * k
        assert len(stats) == 4
    first = compute_global_shap_stats(X, y, seed=0, npermutations=2)
    again = compute_global_shap_stats(X, y, seed=0, npermutations=2)
    assert pd.DataFrame(again).equals(pd.DataFrame(first))
    with pytest.raises(ValueError):
        compute_global_shap_stats(X, y, seed=0, npermutations=0)


def test_shap_feature_weights_zero_handling():
    stats = {"a": {"upper_importance_bound": 0.0}, "b": {"upper_importance_bound": 3.0}}
    w = shap_feature_weights(stats, ["a", "b", "c"])
    assert w.sum() == pytest.approx(1.0)
    assert w[0] == w[2] and 0 < w[0] < 1e-8
    with pytest.raises(ValueError):
        shap_feature_weights({}, ["a"])


def test_nearest_neighbour_model_exact_and_uniform_ties():
    from lib.rules.shap_importance import NearestNeighbourModel

    rng = np.random.default_rng(0)
    for _ in range(20):
        n, m = int(rng.integers(1, 50)), int(rng.integers(1, 6))
        scale = 10.0 ** int(rng.integers(-3, 7))
        D = np.round(rng.uniform(0, 3, (n, m))) * scale
        D = np.vstack([D, D[: n // 3]])  # exact duplicates → ties
        model = NearestNeighbourModel(D, rng.random(len(D)), seed=1)
        Q = np.vstack([D[rng.integers(0, len(D), 10)], np.round(rng.uniform(-1, 4, (10, m))) * scale])
        d = ((Q[:, None, :] - D[None]) ** 2).sum(-1)
        ties = d <= d.min(axis=1, keepdims=True) + 1e-8
        assert ties[np.arange(len(Q)), model._nearest(Q)].all()
    model = NearestNeighbourModel(np.zeros((4, 2)), np.arange(4.0), seed=3)
    counts = np.bincount(model(np.zeros((4000, 2))).astype(int), minlength=4)
    assert counts.min() > 850  # uniform over the 4 tied rows
    again = NearestNeighbourModel(np.zeros((4, 2)), np.arange(4.0), seed=3)
    np.testing.assert_array_equal(again(np.zeros((50, 2))), NearestNeighbourModel(np.zeros((4, 2)), np.arange(4.0), seed=3)(np.zeros((50, 2))))
