"""CHA search logic: Clopper–Pearson bounds against scipy, pruning by the bound, recovery of
planted strong units with a known tester, record order and the exhaustive reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from lib.ablation.cha import clopper_pearson_upper, effect_record, group_testing_bound, run_cha, run_exhaustive


@pytest.mark.parametrize("k,n", [(0, 1), (0, 20), (1, 20), (3, 20), (7, 64), (12, 100), (19, 20), (20, 20), (5, 9)])
@pytest.mark.parametrize("alpha", [0.025, 0.05, 0.1])
def test_clopper_pearson_matches_scipy(k, n, alpha):
    hi = binomtest(k, n, alternative="less").proportion_ci(confidence_level=1 - alpha, method="exact").high
    assert clopper_pearson_upper(k, n, alpha) == pytest.approx(hi, abs=1e-9)


def test_spec_thresholds():
    """Spec §5.1: with α=0.025, UCB ≥ 0.2 needs 7 flips of 64; 0 of 64 gives 0.056."""
    assert clopper_pearson_upper(6, 64, 0.025) < 0.2 <= clopper_pearson_upper(7, 64, 0.025)
    assert clopper_pearson_upper(11, 100, 0.025) < 0.2 <= clopper_pearson_upper(12, 100, 0.025)
    assert clopper_pearson_upper(0, 64, 0.025) == pytest.approx(0.0560, abs=1e-4)
    assert clopper_pearson_upper(3, 10, None) == 1.0


def make_tester(strong: set[tuple[int, int]], n: int = 32, flips: int | None = None, log: list | None = None):
    """Positive regime: a group flips `flips` of n associated prompts iff it holds a strong unit."""
    flips = n if flips is None else flips

    def tester(groups):
        out = []
        for g in groups:
            if log is not None:
                log.append(g)
            hit = any((L, i) in strong for L, ids in g.items() for i in ids)
            assoc = [False] * flips + [True] * (n - flips) if hit else [True] * n
            out.append((assoc, [True] * n))
        return out

    return tester


def test_cha_finds_planted_units_with_few_evaluations():
    rng = np.random.default_rng(0)
    units = {3: list(range(512)), 7: list(range(512))}
    strong = {(3, 17), (3, 400), (7, 5)}
    log: list = []
    recs = run_cha(units, make_tester(strong, log=log), tau=0.2, prune_alpha=0.05, regime="positive", rng=rng)
    found = {(int(k[1:]), ids[0]) for r in recs if r["group_size"] == 1 and r["max_effect"] >= 0.2
             for k, ids in r["layers_neurons_dict"].items()}
    assert found == strong
    assert len(recs) == len(log)  # every evaluation is recorded
    n, k = 1024, 3
    assert len(recs) <= 2 * (k * math.ceil(math.log2(n / k)) + k) + 2
    assert len(recs) < n / 10


def test_weak_groups_are_pruned_by_the_bound():
    """A group with 1 flip of 32 has UCB < 0.2 (pruned); with 3 flips UCB ≥ 0.2 (split)."""
    assert clopper_pearson_upper(1, 32, 0.025) < 0.2 <= clopper_pearson_upper(3, 32, 0.025)
    for flips, expect_split in ((1, False), (3, True)):
        recs = run_cha({0: list(range(8))}, make_tester({(0, 2)}, flips=flips), 0.2, 0.05, "positive",
                       np.random.default_rng(1))
        root = recs[0]
        assert root["group_size"] == 8 and root["split"] is expect_split
        assert root["stop_reason" if not expect_split else "split_strategy"] in ("max_effect_below_epsilon", "bisect")
        assert root["delta_on_associated_hat"] == pytest.approx(flips / 32)
        assert root["max_effect"] == pytest.approx(clopper_pearson_upper(flips, 32, 0.025))


def test_records_are_in_depth_first_preorder_per_layer():
    recs = run_cha({1: list(range(16)), 2: list(range(16))}, make_tester({(1, 3), (2, 9)}), 0.2, 0.05, "positive",
                   np.random.default_rng(2))
    for layer in ("m1", "m2"):
        seq = [r for r in recs if layer in r["layers_neurons_dict"]]
        assert seq[0]["depth"] == 0
        # pre-order: each node's first child follows it directly, and depths rise by at most one
        for a, b in zip(seq, seq[1:]):
            assert b["depth"] <= a["depth"] + 1
            if a["split"]:
                assert b["depth"] == a["depth"] + 1
                assert set(b["layers_neurons_dict"][layer]) < set(a["layers_neurons_dict"][layer])
    assert [next(iter(r["layers_neurons_dict"])) for r in recs] == sorted(
        [next(iter(r["layers_neurons_dict"])) for r in recs], key=lambda s: ["m1", "m2"].index(s))


def test_sign_split_first_separates_by_score():
    scores = {0: {i: (1.0 if i % 2 else -1.0) for i in range(10)}}
    recs = run_cha({0: list(range(10))}, make_tester({(0, 3)}), 0.2, 0.05, "positive", np.random.default_rng(3),
                   sign_scores=scores, sign_split_first=True)
    root = recs[0]
    assert root["split_strategy"] == "score_sign"
    assert root["split_left_size"] == 5 and root["split_right_size"] == 5
    left = set(recs[1]["layers_neurons_dict"]["m0"])
    assert left == {1, 3, 5, 7, 9}


def test_tau_zero_splits_everything_and_exhaustive_tests_every_unit():
    units = {0: list(range(8))}
    recs = run_cha(units, make_tester(set()), 0.0, 0.05, "positive", np.random.default_rng(4))
    assert len(recs) == 2 * 8 - 1
    ex = run_exhaustive({0: [5, 1, 3]}, make_tester({(0, 3)}), 0.05, "positive")
    assert [r["layers_neurons_dict"]["m0"] for r in ex] == [[1], [3], [5]]
    assert [r["max_effect"] >= 0.2 for r in ex] == [False, True, False]


def test_negative_regime_counts_positive_answers_as_flips():
    rec = effect_record({0: [1]}, [True, True, False, False], [False] * 4, "negative", 0.025)
    assert rec["k_effect_associated"] == 2 and rec["k_effect_unrelated"] == 0
    assert rec["accuracy_gap"] == pytest.approx(-0.5)


def test_group_testing_bound():
    assert group_testing_bound(1024, 4) == pytest.approx(4 * 8 + 4)
    assert group_testing_bound(0, 0) == 0.0


def test_is_agonist_takes_bound_and_flips_from_the_same_slice():
    from lib.ablation.cha import is_agonist

    # the associated slice has a high UCB but no flip; the unrelated slice flipped once with a low UCB
    mixed = {"group_size": 1, "delta_on_associated_ucb": 0.25, "delta_on_associated_hat": 0.0,
             "delta_on_unrelated_ucb": 0.15, "delta_on_unrelated_hat": 0.02, "max_effect": 0.25, "max_effect_hat": 0.02}
    assert not is_agonist(mixed, 0.2)
    same = {**mixed, "delta_on_unrelated_ucb": 0.21}
    assert is_agonist(same, 0.2)
    effect = {"group_size": 1, "statistic": "effect_sprt", "is_agonist": True, "max_effect": 0.31}
    assert is_agonist(effect, 0.3) and not is_agonist({**effect, "is_agonist": False}, 0.3)
    assert not is_agonist({**same, "group_size": 2}, 0.2)
