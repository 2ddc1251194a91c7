"""Recall against the exhaustive reference on the simulated fragile model (known ground truth), and
the interval and cost arithmetic checked against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from lib.ablation.recall import (binomial_interval, cost_report, high_impact_units, recall_report,
                                 singleton_agonists)
from lib.ablation.sequential_cha import SequentialSettings, run_sequential_cha, run_sequential_exhaustive
from tests.ablation.test_sequential_cha import N_MAX, FragileModel


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (17, 40)])
def test_interval_is_clopper_pearson(k, n):
    lo, hi = binomial_interval(k, n)
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)
    assert binomial_interval(0, 0) == (None, None)


def test_recall_by_bin_and_precision():
    ref = {(0, 1): 0.25, (0, 2): 0.4, (1, 3): 0.9, (1, 4): 0.6}
    rep = recall_report(ref, {(0, 2), (1, 3), (1, 4), (0, 9)}, 0.2)
    assert rep["recall"] == 0.75 and rep["precision"] == 0.75 and rep["n_found"] == 4
    assert rep["recall_by_bin"]["[0.2,0.3)"] == {"n_reference": 1, "recalled": 0, "recall": 0.0}
    assert rep["recall_by_bin"]["[0.5,1]"]["recalled"] == 2
    assert recall_report({}, set(), 0.2)["recall"] is None


def test_cost_report_ratios_and_bound():
    c = cost_report(512, 4, 64, 64 * 40, 512 * 40)
    assert c["evaluations_over_n"] == 0.125 and c["evaluations_over_2n_minus_1"] == pytest.approx(64 / 1023)
    assert c["forward_rows_ratio"] == 0.125
    assert c["bound_k_log2_n_over_k_plus_k"] == pytest.approx(4 * np.log2(128) + 4)


def test_effect_cha_recalls_the_reference_high_impact_units_of_a_fragile_model():
    model = FragileModel(seed=11, n_planted=4)
    st = SequentialSettings(tau=0.2)
    reference, ref_cost = run_sequential_exhaustive(model.units, model.tester, N_MAX, st)
    hi = high_impact_units(reference)
    assert {u for u in hi} >= set(model.planted)  # the planted units are high-impact in the reference
    recs, cost = run_sequential_cha(model.units, model.tester, N_MAX, (model.base[0], model.base[1]), "positive", st,
                                    np.random.default_rng(0))
    rep = recall_report(hi, singleton_agonists(recs, st.tau), st.tau)
    assert rep["recall"] == 1.0 and rep["precision"] == 1.0
    cr = cost_report(512, len(hi), cost["evaluations"], cost["forward_rows"], ref_cost["forward_rows"])
    assert cr["forward_rows_ratio"] < 0.15
