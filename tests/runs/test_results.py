"""The shared result loader: scopes, floor, best rows, flip unions, stage-6 cost fields, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.core.files_and_cache import ArtifactError
from lib.runs.checked_io import read_csv_checked
from lib.runs.discovery import resolve_run_dir
from lib.runs.results import (
    BaselineResults,
    RunResults,
    best_per_neuron,
    circuit_evaluations,
    count_at_least,
    expand_score_scopes,
    normalize_scope,
    parse_flip_column,
    scope_from_rule_combo_filename,
    union_flip,
)
from lib.runs.layout import ExperimentLayout, parse_run_mode
from tests.synthetic_artifacts import EXPECTED, FAKE, MAIN, MODEL, build_tree


@pytest.fixture()
def tree(tmp_path):
    return build_tree(tmp_path)


def test_scope_names():
    assert normalize_scope("HQ-T") == "test_selected"
    assert normalize_scope("allfit") == "all_fit"
    assert expand_score_scopes("both") == ["test_selected", "all_fit"]
    assert expand_score_scopes("test,all_fit") == ["test", "all_fit"]
    with pytest.raises(ValueError, match="unknown score scope"):
        normalize_scope("bogus")
    assert scope_from_rule_combo_filename("rule_combo_test_selected_flip_m1_5.csv") == ("test_selected", "flip_m1_5")
    assert scope_from_rule_combo_filename("rule_combo_flip_c2i_m1_5.csv") == (None, "flip_c2i_m1_5")


def test_best_per_neuron_applies_floor_then_ranks():
    rows = pd.DataFrame({"neuron_key": ["a", "a", "b"], "MCC": [0.9, 0.8, 0.6],
                         "dataset_coverage": [0.001, 0.1, 0.2], "score_scope": "test_selected"})
    best = best_per_neuron(rows, "MCC", 0.005)
    assert best.set_index("neuron_key")["MCC"].to_dict() == {"a": 0.8, "b": 0.6}
    assert count_at_least(best, 0.8) == 1
    assert count_at_least(best_per_neuron(rows, "MCC", 0.0), 0.85) == 1


def test_run_results_scopes_and_units(tree):
    data, _ = tree
    lay = ExperimentLayout(data, "arithmetic", MODEL)
    rr = RunResults(resolve_run_dir(lay, MAIN))
    assert rr.units() == ["m1_5", "m2_7", "m3_9"]
    assert count_at_least(rr.best("test_selected"), 0.70) == EXPECTED["arith_hq_t"]
    assert count_at_least(rr.best("all_fit"), 0.70) == EXPECTED["arith_hq_f"]
    # held out: each unit's target is chosen on its TRAIN rows, the TEST row of that target reported
    held = rr.best("test").set_index("neuron_key")
    assert held["MCC"].to_dict() == {"m1_5": 0.40, "m2_7": 0.72, "m3_9": 0.50}
    assert held.loc["m3_9", "flip_target"] == "flip_m3_9"  # its i2c target scores 0.90 on TEST, 0.30 on TRAIN
    assert count_at_least(rr.best("test"), 0.70) == EXPECTED["arith_hq_heldout"]
    # the fake run has no signed manifest → HQ scopes are unavailable, not zero
    assert RunResults(lay.stats_dir(FAKE)).best("test_selected") is None


def test_flip_union_counts(tree):
    data, _ = tree
    rr = RunResults(ExperimentLayout(data, "arithmetic", MODEL).stats_dir(MAIN))
    df = rr.flip_scores
    assert parse_flip_column("flip_c2i_a3_h1_4") == ("c2i", "a3_h1", 4)
    assert parse_flip_column("flip_semantic_wrong_m1_5") is None
    union, evaluated = union_flip(df, ["flip_c2i_m1_5", "flip_c2i_m2_7", "flip_c2i_m3_9"])
    assert (union, evaluated) == (3, 10)
    assert union_flip(df, ["flip_c2i_m3_9"]) == (0, 9)
    base = rr.baseline_labels("is_correct")
    assert np.nansum(base) == 6


def test_stage6_prefers_cost_blocks(tmp_path):
    data, _ = build_tree(tmp_path, ours=True)
    lay = ExperimentLayout(data, "arithmetic", MODEL)
    b = BaselineResults(lay.baseline_dir(parse_run_mode(MAIN), "positive"))
    assert b.evaluations_by_circuit() == {"0": 30, "1": 50}
    assert b.candidates_by_circuit() == {"0": 500}
    assert b.tree_budget("0") == 999
    assert b.cost_summary["n_evaluations"] == 80
    assert circuit_evaluations({"n_ablation_groups": 7}, {"cost": {"n_evaluations": 5}}) == 5
    assert list(b.agonists(0.2)["key"]) == ["m1:5", "m2:7", "m3:9", "m4:1"]


def test_bad_inputs_name_the_file_and_column(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ArtifactError, match="lacks column 'MCC'"):
        read_csv_checked(p, required=("MCC",))
    with pytest.raises(ArtifactError, match="does not exist"):
        read_csv_checked(tmp_path / "missing.csv")
    run = tmp_path / "run"
    run.mkdir()
    (run / "rule_combo_metrics_all_scopes.csv").write_text("neuron_key,MCC\nm1_5,0.5\n")
    with pytest.raises(ArtifactError, match="lacks column 'score_scope'"):
        RunResults(run).rule_rows("test")
    (run / "neuron_buckets.json").write_text("[1, 2")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        _ = BaselineResults(run).buckets
