"""Sequential effect CHA on a simulated fragile model with known ground truth: planted units with
realistic effects (< 1 flip rate), background units whose effects add up so that big random groups
flip many prompts, and a handful of units that flip a few prompts each."""

from __future__ import annotations

import numpy as np
import pytest

from lib.ablation.cha import run_cha
from lib.ablation.sequential_cha import (
    SequentialSettings,
    SliceResult,
    agonist_decision,
    clopper_pearson_lower,
    min_agonist_excess,
    relative_effect,
    run_sequential_cha,
    run_sequential_exhaustive,
    sprt_decision,
)

N_MAX = 160


class FragileModel:
    """Per-unit, per-prompt margin drops that add up within a group; a prompt flips when the summed
    drop removes its baseline margin. Two slices of N_MAX prompts; `planted` units are high-impact."""

    def __init__(self, seed: int, layers=(0, 1), width=256, n_planted=3):
        rng = np.random.default_rng(seed)
        self.units = {L: list(range(width)) for L in layers}
        n_units = len(layers) * width
        self.base = [rng.gamma(2.0, 1.0, N_MAX) + 0.1, rng.gamma(2.0, 1.0, N_MAX) + 0.1]  # margins per slice
        # background: every unit moves every prompt a little (sum over 256 units ≈ 2.5 margins)
        self.eff = [np.abs(rng.normal(0.0, 0.012, (n_units, N_MAX))) for _ in range(2)]
        # fragile units: a few prompts each get a large drop (a flip or two per unit)
        for s in range(2):
            for u in rng.choice(n_units, n_units // 5, replace=False):
                p = rng.choice(N_MAX, 2, replace=False)
                self.eff[s][u, p] += self.base[s][p] * rng.uniform(0.6, 1.3, 2)
        self.planted = []
        for u in rng.choice(n_units, n_planted, replace=False):
            rate = rng.uniform(0.3, 0.7)
            hit = rng.random(N_MAX) < rate  # flips on the associated slice only
            self.eff[0][u] = np.where(hit, self.base[0] * 1.3 + 0.2, 0.3 * self.base[0])
            self.planted.append((int(u) // width, int(u) % width))
        self.width = width
        self.calls = 0

    def effects(self, group, s, lo, hi):
        rows = [L * self.width + i for L, ids in group.items() for i in ids]
        return self.eff[s][rows, lo:hi].sum(axis=0)

    def tester(self, groups, lo, hi):
        self.calls += len(groups)
        out = []
        for g in groups:
            res = []
            for s in range(2):
                e = self.effects(g, s, lo, hi)
                res.append(SliceResult(e >= self.base[s][lo:hi], e))
            out.append(tuple(res))
        return out


def _found(records):
    return {(int(next(iter(r["layers_neurons_dict"]))[1:]), r["layers_neurons_dict"][next(iter(r["layers_neurons_dict"]))][0])
            for r in records if r.get("is_agonist")}


def test_clopper_pearson_lower_bound_matches_the_definition():
    from scipy.stats import binom

    for k, n in [(1, 20), (7, 64), (30, 100), (64, 64)]:
        lo = clopper_pearson_lower(k, n, 0.025)
        assert abs(binom.sf(k - 1, n, lo) - 0.025) < 1e-6 or (k == n and abs(lo**n - 0.025) < 1e-9)
    assert clopper_pearson_lower(0, 50, 0.025) == 0.0


def test_agonist_decision_uses_the_lower_bound_of_one_slice():
    assert agonist_decision(np.array([1] * 40 + [0] * 60, bool), 0.2, 0.05)[0] == "agonist"
    assert agonist_decision(np.array([1] * 1 + [0] * 19, bool), 0.2, 0.05)[0] == "more"  # one flip of 20
    assert agonist_decision(np.array([0] * 160, bool), 0.2, 0.05)[0] == "not"


def test_delta_is_what_a_unit_flipping_tau_of_the_prompts_adds_to_the_background():
    assert min_agonist_excess(np.zeros(10), 0.2) == pytest.approx(0.2)
    assert min_agonist_excess(np.array([1.0] * 5 + [0.0] * 5), 0.2) == pytest.approx(0.1)  # half already flipped
    assert min_agonist_excess(np.array([-0.5, 1.5]), 0.3) == pytest.approx(0.15)  # background clipped to [0, 1]
    np.testing.assert_allclose(relative_effect(np.array([0.5, 3.0, -9.0]), np.array([1.0, 1.0, 3.0])), [0.5, 1.0, -1.0])


def test_sprt_keeps_clear_excess_prunes_clear_null_and_waits_when_unsure():
    rng = np.random.default_rng(0)
    assert sprt_decision(rng.normal(1.0, 0.2, 16), 0.5, 0.05, 0.01, 1e-3)[0] == "keep"
    assert sprt_decision(rng.normal(0.0, 0.2, 16), 0.5, 0.05, 0.01, 1e-3)[0] == "prune"
    assert sprt_decision(rng.normal(0.25, 2.0, 16), 0.5, 0.05, 0.01, 1e-3)[0] == "more"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_units_are_found_at_a_fraction_of_exhaustive_forward_rows(seed):
    m = FragileModel(seed)
    st = SequentialSettings(tau=0.2)
    ref, ref_cost = run_sequential_exhaustive(m.units, m.tester, N_MAX, st)
    truth = {(r["layer"], r["unit"]) for r in ref if r["high_impact"]}
    assert set(m.planted) <= truth, "every planted unit is high-impact in the exhaustive reference"
    assert ref_cost["evaluations"] == 512 and ref_cost["forward_rows"] == 512 * 2 * N_MAX
    recs, cost = run_sequential_cha(m.units, m.tester, N_MAX, tuple(m.base), "positive", st, np.random.default_rng(seed))
    found = _found(recs)
    assert truth <= found, f"missed {truth - found}"
    assert found <= truth | {(r["layer"], r["unit"]) for r in ref if r["flip_lcb_associated"] >= 0.1}
    assert cost["forward_rows"] <= 0.15 * ref_cost["forward_rows"], cost


def test_the_effect_statistic_prunes_null_groups_that_the_flip_ucb_rule_keeps():
    m = FragileModel(5, n_planted=0)
    st = SequentialSettings(tau=0.2)
    recs, cost = run_sequential_cha(m.units, m.tester, N_MAX, tuple(m.base), "positive", st, np.random.default_rng(0))
    assert not _found(recs)
    tested = [r for r in recs if r["depth"] == st.always_split_depth + 1]
    pruned = [r for r in tested if r["split"] is False and r["stop_reason"] == "effect_not_above_background"]
    assert len(pruned) >= 0.5 * len(tested) > 0  # the rest hold several fragile units (real, sub-τ excess)
    # the original rule at the old pipeline's 20 prompts per slice: one flip lifts the bound past τ,
    # so it tests many more groups and calls null units agonists
    def flip_tester(groups):
        return [(list(~a.flips), list(~u.flips)) for a, u in m.tester(groups, 0, 20)]

    old = run_cha(m.units, flip_tester, 0.2, 0.05, "positive", np.random.default_rng(0))
    false_agonists = [r for r in old if r["group_size"] == 1 and r["max_effect"] >= 0.2 and r["max_effect_hat"] > 0]
    assert len(false_agonists) >= 5 and len(old) > 3 * len(recs)


def test_sequential_prompting_stops_early_on_clear_cases_and_agrees_with_the_full_batch():
    m = FragileModel(3)
    st = SequentialSettings(tau=0.2)
    recs, _ = run_sequential_cha(m.units, m.tester, N_MAX, tuple(m.base), "positive", st, np.random.default_rng(3))
    full, _ = run_sequential_cha(m.units, m.tester, N_MAX, tuple(m.base), "positive",
                                 SequentialSettings(tau=0.2, n_start=N_MAX), np.random.default_rng(3))
    assert _found(recs) == _found(full)
    assert min(r["n_associated_eval"] for r in recs) == st.n_start
    assert sum(r["n_associated_eval"] for r in recs) < 0.5 * sum(r["n_associated_eval"] for r in full)
