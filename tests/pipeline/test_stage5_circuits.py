"""Stage-5 job logic without a model: slugs, jobs, resume states, random pairs, plan pairs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lib.pipeline.feature_table import prompts_sha256
from lib.pipeline.stage5_circuits import job_state, plan_jobs, plan_pairs, random_pairs, slugify
from lib.pipeline.stage4_sampling import PlanError, load_sampling_plan


def test_slugify_matches_spec():
    assert slugify("NOT(a < 0.5 & B >= 3)") == "not-a-0-5-b-3"
    assert slugify("%%%") == "rule"
    assert len(slugify("x" * 200)) == 64


def test_plan_jobs_and_states(tmp_path):
    rules = pd.DataFrame({"rule_id": [3, 7], "rule": ["f >= 1", "g < 2"], "coefficient_sign": ["positive", "negative"],
                          "component_type": ["rule", "linear"]})
    jobs = plan_jobs(rules, tmp_path, "is_correct", max_n=1)
    assert len(jobs) == 1 and jobs[0].folder == tmp_path / "is_correct" / "rule_3_f-1"
    assert job_state(jobs[0].folder) == "missing"
    jobs[0].folder.mkdir(parents=True)
    (jobs[0].folder / "scores.json").write_text("{}")
    assert job_state(jobs[0].folder) == "missing"
    (jobs[0].folder / "eval.json").write_text("{}")
    assert job_state(jobs[0].folder) == "ok"
    assert len(plan_jobs(rules, tmp_path, "is_correct")) == 2


def test_random_pairs_are_covered_uncovered_length_matched_and_seeded():
    rng = np.random.default_rng(0)
    n = 40
    mask = np.arange(n) < 12
    usable = np.ones(n, dtype=bool)
    usable[3] = False
    vecs = rng.normal(size=(n, 5)).astype(np.float32)
    lengths = np.arange(n) % 4
    a = random_pairs(mask, usable, vecs, lengths, 8, "euclidean", np.random.default_rng(1))
    b = random_pairs(mask, usable, vecs, lengths, 8, "euclidean", np.random.default_rng(1))
    assert a.associated == b.associated and a.unrelated == b.unrelated
    assert len(a.associated) == 8 and 3 not in a.associated
    assert all(mask[i] for i in a.associated) and not any(mask[j] for j in a.unrelated)
    assert all(lengths[i] == lengths[j] for i, j in zip(a.associated, a.unrelated))
    assert (a.n_pos, a.n_neg) == (11, 28)
    assert random_pairs(np.zeros(n, bool), usable, vecs, lengths, 8, "cosine", np.random.default_rng(1)) is None


def _plan(path, n, prompts, entries):
    path.write_text(json.dumps({"dataset_size": n, "baseline_subset": "all", "prompts_sha256": prompts_sha256(prompts),
                                "rules": entries}))
    return path


def test_plan_pairs_use_the_entry_and_never_fall_back(tmp_path):
    prompts = [f"p{i}" for i in range(6)]
    ok = {"rule_id": 0, "rule_target": "is_correct", "status": "ok", "associated_indices": [0, 1, 2],
          "unrelated_indices": [3, 4, 4]}
    skipped = {"rule_id": 1, "rule_target": "is_correct", "status": "skipped", "reason": "Too few datapoints"}
    path = _plan(tmp_path / "plan.json", 6, prompts, [ok, skipped])
    plan = load_sampling_plan(path, 6, prompts_sha256(prompts), "all")
    mask = np.array([1, 1, 1, 0, 0, 0], bool)
    usable = np.array([1, 1, 0, 1, 1, 1], bool)
    pairs = plan_pairs(plan, "is_correct", 0, mask, usable)
    assert pairs.associated == [0, 1] and pairs.unrelated == [3, 4]
    assert pairs.pairing_meta["n_dropped_without_answer"] == 1
    with pytest.raises(PlanError, match="skipped"):
        plan_pairs(plan, "is_correct", 1, mask, usable)
    with pytest.raises(PlanError, match="no entry"):
        plan_pairs(plan, "is_correct", 9, mask, usable)
    # stages 5 and 6 record a rule stage 4 skipped as a skip (with stage 4's reason), not an error
    assert "Too few datapoints" in plan.skip_reason("is_correct", 1)
    assert plan.skip_reason("is_correct", 0) is None and plan.skip_reason("is_correct", 9) is None
    with pytest.raises(PlanError, match="6 rows"):
        load_sampling_plan(path, 7)


def test_changed_inputs_invalidate_finished_jobs(tmp_path):
    from lib.pipeline.stage5_circuits import INPUTS_KEY_FILE, Job, _invalidate_stale_jobs

    jobs = [Job("is_correct", i, f"a >= {i}", "positive", "rule", tmp_path / f"rule_{i}") for i in range(2)]
    for job in jobs:
        job.folder.mkdir()
        (job.folder / "scores.json").write_text("{}")
        (job.folder / "eval.json").write_text("{}")
    _invalidate_stale_jobs(tmp_path, jobs, "k1")  # no key yet (older folders): reused, key recorded
    assert [job_state(j.folder) for j in jobs] == ["ok", "ok"]
    assert json.loads((tmp_path / INPUTS_KEY_FILE).read_text()) == {"inputs_key": "k1"}
    _invalidate_stale_jobs(tmp_path, jobs, "k1")  # same inputs: reused
    assert [job_state(j.folder) for j in jobs] == ["ok", "ok"]
    _invalidate_stale_jobs(tmp_path, jobs, "k2")  # new scores / rules / plan / settings: run again
    assert [job_state(j.folder) for j in jobs] == ["missing", "missing"]
