"""Plan entries (no contamination, skips, pairing), the plan JSON, and the validating reader."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lib.pipeline.feature_table import AnalysisTable, prompts_sha256
from lib.pipeline.stage4_sampling import (PlanError, PlanInputs, PlanOptions, build_rule_entry, build_sampling_plan,
                               load_sampling_plan, write_sampling_plan)
from lib.sampling.spectral import kcenter_farthest_first, spectral_embedding

N = 120


def _inputs(n: int = N, seed: int = 0, clusters: int | None = None) -> PlanInputs:
    rng = np.random.default_rng(seed)
    reps = rng.normal(size=(n, 24)).astype(np.float32)
    Z = spectral_embedding(reps, 6)
    inp = PlanInputs(reps, Z, rng.integers(3, 7, n))
    if clusters:
        inp.clusters = kcenter_farthest_first(Z, clusters, np.random.default_rng(seed))
    return inp


def _rule(rule_id: int = 7, rule: str = "f >= 0.5") -> pd.Series:
    return pd.Series({"rule_id": rule_id, "rule": rule, "coefficient_sign": "positive", "component_type": "rule"})


def _rngs(seed: int = 0):
    return np.random.default_rng(seed), np.random.default_rng(seed + 100)


@pytest.mark.parametrize("opts", [
    PlanOptions(min_points=5, max_points=20),
    PlanOptions(min_points=5, max_points=20, use_global_clusters=True, compute_cover_stats=True),
    PlanOptions(min_points=5, max_points=20, pair_by_similarity=True, pair_len_tolerance=0, pair_metric="euclidean",
                use_global_clusters=True, compute_cover_stats=True),
    PlanOptions(min_points=5, max_points=20, selection="random"),
])
def test_entry_sides_never_mix(opts):
    mask = np.zeros(N, dtype=bool)
    mask[np.random.default_rng(1).choice(N, 30, replace=False)] = True
    e = build_rule_entry(_rule(), "is_correct", mask, _inputs(clusters=8), opts, *_rngs())
    assert e["status"] == "ok" and e["rule_id"] == 7 and e["rule_target"] == "is_correct"
    assert e["n_associated_available"] == 30 and e["n_unrelated_available"] == 90
    assert e["n_associated_selected"] == len(e["associated_indices"]) == 20 == len(e["unrelated_indices"])
    assert mask[e["associated_indices"]].all() and not mask[e["unrelated_indices"]].any()
    assert len(set(e["associated_indices"])) == 20
    assert set(e["pair_stats"]["euclidean_dist"]) >= {"min", "mean", "std", "max", "p50", "p99"}
    if opts.pair_by_similarity:
        assert e["pairing_meta"]["n_source"] == 20 and "unrelated_cover" not in e
    else:
        assert len(set(e["unrelated_indices"])) == 20 and "pairing_meta" not in e
    stats = e["associated_cover"]["stats"]
    if opts.compute_cover_stats:
        assert stats["status"] == "ok" and stats["n_points"] == 30 and stats["n_centers"] == 20
    else:
        assert stats == {"status": "skipped", "reason": "--compute_cover_stats not set"}
    if opts.selection == "random":
        assert e["associated_cover"]["greedy_meta"]["status"] == "random"


def test_small_side_is_skipped_not_contaminated():
    mask = np.zeros(N, dtype=bool)
    mask[:4] = True
    e = build_rule_entry(_rule(), "is_correct", mask, _inputs(), PlanOptions(min_points=5, max_points=20), *_rngs())
    assert e["status"] == "skipped" and "--min_points_per_ablation 5" in e["reason"]
    assert e["n_associated_available"] == 4 and e["associated_indices"] == [] and e["unrelated_indices"] == []
    e = build_rule_entry(_rule(), "is_correct", np.ones(N, bool), _inputs(), PlanOptions(min_points=5), *_rngs())
    assert e["status"] == "skipped" and e["reason"].startswith("Empty side")
    # max below min is raised to min; all rows taken when a side is small
    mask[:10] = True
    e = build_rule_entry(_rule(), "is_correct", mask, _inputs(), PlanOptions(min_points=10, max_points=3), *_rngs())
    assert e["status"] == "ok" and sorted(e["associated_indices"]) == list(range(10))


def _table(n: int = N) -> AnalysisTable:
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"prompt": [f"{i}+{i % 7}=" for i in range(n)], "is_correct": rng.random(n) < 0.5,
                       "f": (np.arange(n) % 3 == 0).astype(float)})
    return AnalysisTable(df, "scores.csv", "prompt", "is_correct", "all", df)


def _plan(tmp_path, seed: int = 0, **kw) -> tuple[dict, str]:
    table = _table()
    rules = pd.DataFrame([_rule(0, "f >= 0.5"), _rule(1, "NOT(f >= 0.5)"), _rule(2, "f >= 5")])
    opts = PlanOptions(min_points=5, max_points=12, use_global_clusters=True, pair_by_similarity=True,
                       compute_cover_stats=True, seed=seed, **kw)
    inputs = _inputs(clusters=8)
    plan = build_sampling_plan(table, rules, "is_correct", inputs, opts,
                               {"scores_path": "scores.csv", "baseline_subset": "all"}, progress=False)
    path = tmp_path / f"plan_{seed}.json"
    write_sampling_plan(path, plan)
    return plan, str(path)


def test_plan_json_round_trip_and_schema(tmp_path):
    plan, path = _plan(tmp_path)
    text = open(path, encoding="utf-8").read()
    assert json.loads(text) == json.loads(json.dumps(plan))
    assert text.startswith('{\n    "scores_path"')  # indent 4
    for k in ("coverage_radius", "min_points_per_ablation", "max_points_per_ablation", "pairing", "stats",
              "dataset_size", "prompts_sha256", "target_col", "rules", "global_clusters"):
        assert k in plan
    assert plan["pairing"] == {"max_pairs_per_rule": 12, "len_tolerance": 0, "method": "exact_dot_product_len_matched"}
    assert plan["prompts_sha256"] == prompts_sha256(_table().prompts) and plan["dataset_size"] == N
    sp = load_sampling_plan(path, expected_dataset_size=N, expected_prompts_sha256=plan["prompts_sha256"],
                            expected_baseline_subset="all")
    assert sp.keys() == [("is_correct", 0), ("is_correct", 1), ("is_correct", 2)]
    assert sp.keys(only_ok=True) == [("is_correct", 0), ("is_correct", 1)]
    e = sp.entry("is_correct", 0)
    assert len(e.associated_indices) == len(e.unrelated_indices) == 12
    assert list(e.associated_indices) == e["associated_indices"] and e["status"] == "ok"
    assert all(i % 3 == 0 for i in e.associated_indices) and all(i % 3 for i in e.unrelated_indices)
    with pytest.raises(PlanError, match="rule_id 2 was 'skipped'"):
        sp.entry("is_correct", 2)
    with pytest.raises(PlanError, match="no entry for rule_target 'is_correct', rule_id 9"):
        sp.entry("is_correct", 9)
    with pytest.raises(PlanError, match="no entry for rule_target 'other'"):
        sp.entry("other", 0)


def test_same_seed_same_bytes(tmp_path):
    _, a = _plan(tmp_path / "a")
    _, b = _plan(tmp_path / "b")
    assert open(a, "rb").read() == open(b, "rb").read()
    _, c = _plan(tmp_path / "c", seed=1)
    assert open(a, "rb").read() != open(c, "rb").read()


def _mutated(tmp_path, fn) -> str:
    plan, path = _plan(tmp_path)
    fn(plan)
    out = tmp_path / "bad.json"
    out.write_text(json.dumps(plan))
    return str(out)


def test_reader_rejects_plans_for_other_tables(tmp_path):
    plan, path = _plan(tmp_path)
    with pytest.raises(PlanError, match=f"made for a table of {N} rows, but this table has {N + 1}"):
        load_sampling_plan(path, expected_dataset_size=N + 1)
    with pytest.raises(PlanError, match="--baseline_subset all, not positive"):
        load_sampling_plan(path, expected_baseline_subset="positive")
    with pytest.raises(PlanError, match="other prompts"):
        load_sampling_plan(path, expected_prompts_sha256="0" * 64)
    with pytest.raises(PlanError, match="does not exist"):
        load_sampling_plan(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(PlanError, match="not readable JSON"):
        load_sampling_plan(tmp_path / "junk.json")
    # an archived plan without the hash is still accepted on its row count
    old = _mutated(tmp_path, lambda p: p.pop("prompts_sha256"))
    assert load_sampling_plan(old, expected_dataset_size=N, expected_prompts_sha256="0" * 64).dataset_size == N


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.pop("dataset_size"), "no 'dataset_size' key"),
    (lambda p: p["rules"][0].pop("rule_target"), r"rules\[0\] has no 'rule_target' key"),
    (lambda p: p["rules"][0].pop("unrelated_indices"), "has no 'unrelated_indices' key"),
    (lambda p: p["rules"][0]["unrelated_indices"].pop(), "equally long"),
    (lambda p: p["rules"][0]["associated_indices"].__setitem__(0, N + 5), "outside the 120-row table"),
    (lambda p: p["rules"][0]["associated_indices"].__setitem__(0, 1.5), "non-integer"),
    (lambda p: p["rules"].append(dict(p["rules"][0])), "duplicate entry"),
    (lambda p: p.__setitem__("dataset_size", "120"), "not a non-negative integer"),
])
def test_reader_rejects_malformed_plans(tmp_path, mutate, message):
    with pytest.raises(PlanError, match=message):
        load_sampling_plan(_mutated(tmp_path, mutate))
