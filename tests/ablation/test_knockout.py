"""Knockout validation on the simulated fragile model (known ground truth): the planted high-impact
units removed together take away the behaviour on the slice they drive, random same-size sets of the
same layer mix do not, and the random sets keep the layer mix and never contain the found units."""

from __future__ import annotations

import numpy as np
import pytest

from lib.ablation.knockout import knockout_validation, random_like
from tests.ablation.test_sequential_cha import N_MAX, FragileModel


def test_random_sets_keep_the_layer_mix_and_leave_the_found_units_out():
    units = {0: [3, 9], 1: [5]}
    pool = {0: list(range(12)), 1: list(range(8))}
    sets = random_like(units, pool, 50, np.random.default_rng(0))
    assert len(sets) == 50
    for g in sets:
        assert {L: len(v) for L, v in g.items()} == {0: 2, 1: 1}
        assert not set(g[0]) & {3, 9} and 5 not in g[1]
        assert set(g[0]) <= set(pool[0]) and set(g[1]) <= set(pool[1])
    assert len({tuple(g[0]) for g in sets}) > 10  # they are drawn, not fixed


def test_a_layer_whose_only_candidate_is_the_agonist_draws_from_the_whole_layer():
    units, pool = {21: [4]}, {21: [4], 3: [1, 2]}
    with pytest.raises(ValueError, match="layer 21: 0 units outside the set"):
        random_like(units, pool, 3, np.random.default_rng(0))
    sets = random_like(units, pool, 30, np.random.default_rng(0), layer_width=8)
    assert all(len(g[21]) == 1 and g[21][0] != 4 and 0 <= g[21][0] < 8 for g in sets)
    assert len({g[21][0] for g in sets}) > 3


def test_planted_units_knocked_out_remove_the_behaviour_random_sets_do_not():
    model = FragileModel(seed=5, n_planted=3)
    found: dict[int, list[int]] = {}
    for L, i in model.planted:
        found.setdefault(L, []).append(i)
    ko = knockout_validation(model.tester, found, model.units, N_MAX, (model.base[0], model.base[1]), 20,
                             np.random.default_rng(1))
    assert ko["n_units"] == 3 and ko["n_random_sets"] == 20
    assert ko["removal_associated"] >= 0.6  # each planted unit flips 30-70 % of the associated prompts
    assert ko["random_removal_associated_mean"] < 0.25
    assert ko["p_value_associated"] <= 1 / 21 + 1e-9
    assert ko["margin_drop_associated"] > ko["random_margin_drop_associated_mean"]


def test_no_agonist_no_knockout():
    model = FragileModel(seed=0)
    ko = knockout_validation(model.tester, {}, model.units, N_MAX, (model.base[0], model.base[1]), 20,
                             np.random.default_rng(0))
    assert ko["n_units"] == 0 and ko["n_random_sets"] == 0 and model.calls == 0
