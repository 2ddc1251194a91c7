"""Scripts 8-11 and clean_results_for_export.py on synthetic trees, with hand-checked numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from lib.runs.layout import ExperimentLayout
from tests.synthetic_artifacts import MAIN, MODEL, SPECTRAL, build_tree


def _run(repo_root, *args):
    res = subprocess.run([sys.executable, *map(str, args)], cwd=repo_root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    data, cache = build_tree(root)
    return root, data


def test_script8_single_stats_folder(tree, repo_root):
    root, data = tree
    stats = ExperimentLayout(data, "arithmetic", MODEL).stats_root
    _run(repo_root, "8_compare_experiments.py", "--stats_path", stats, "--out_dir", root / "o8")
    sweep = pd.read_csv(root / "o8" / "threshold_sweep_summary.csv")
    main = sweep[(sweep["stats_dirname"] == MAIN) & (sweep["threshold"].round(2) == 0.70)].iloc[0]
    # HQ at 0.70 = {m1_5, m2_7}; their c2i flips cover rows {0,1,2} of the 10 evaluated rows
    assert (main["n_high_quality_neurons"], main["union_c2i_count"], main["eval_c2i_rows"]) == (2, 3, 10)
    assert main["union_c2i_pct"] == 30.0 and main["union_i2c_pct"] == 10.0
    assert sweep["stats_dirname"].nunique() == 2  # the unsigned fake run has no test_selected scope
    assert (root / "o8" / "compare_rule_metrics_distributions_ecdf.pdf").is_file()


def test_script8_several_roots_aggregate(tree, repo_root):
    root, data = tree
    _run(repo_root, "8_compare_experiments.py", "--stats_path", data, "--out_dir", root / "o8b")
    agg = pd.read_csv(root / "o8b" / "aggregated_by_task" / "threshold_sweep_all_tasks_all_llms.csv")
    row = agg[(agg["task"] == "arithmetic") & (agg["stats_dirname"] == MAIN) & (agg["threshold"].round(2) == 0.7)]
    assert row["net_acc_pp"].iloc[0] == pytest.approx(10.0 - 30.0)
    assert (root / "o8b" / "arithmetic" / "Qwen" / "Qwen2-7B-Instruct" / "leaf_stats_dir_outputs"
            / "threshold_sweep_summary.csv").is_file()


def test_script9_models(tree, repo_root):
    root, data = tree
    _run(repo_root, "9_compare_models.py", "--task_dir", data / "arithmetic", "--out_dir", root / "o9")
    df = pd.read_csv(root / "o9" / "run_summary_by_model.csv").set_index("run")
    main = df.loc[MAIN]
    assert (main["n_rules"], main["rule_mcc_median"]) == (3, 0.72)
    assert main["n_tau_agonists"] == 4  # m1:5, m2:7, m3:9, m4:1 (m5:2 has max_effect 0.1)
    assert main["median_abs_acc_gap"] == pytest.approx(0.1875)  # gaps 0.125, 0.175, 0.2, 0.3
    assert main["frac_eps_selective"] == pytest.approx(0.5)
    assert (main["median_n_ablation_groups"], main["n_circuits"]) == (40.0, 2)
    assert (root / "o9" / "agg_summary_by_run.csv").is_file()


def test_script10_paired_tests(tree, repo_root):
    root, data = tree
    _run(repo_root, "make_paper_tables.py", "--data_root", data, "--out_dir", root / "pt", "--which", "table2")
    _run(repo_root, "10_compute_threshold_sweep_stats.py", "--csv", root / "pt" / "table2_threshold_sweep_per_run_long.csv",
         "--out_dir", root / "o10", "--data-root", data, "--n-boot", "20")
    tests = pd.read_csv(root / "o10" / "test_selected" / "method_comparison_primary_threshold_exact_tests.csv")
    row = tests[tests["B"] == "Spectral split (no rule)"].iloc[0]
    # arithmetic: MAIN 2 HQ-T units vs spectral split 1 → one positive difference
    assert (row["n_pairs"], row["n_pos"], row["mean_diff"], row["sign_p"]) == (1, 1, 1.0, 0.5)
    assert "Fake rule split + spectral coverage" not in set(tests["B"])  # unavailable scope is not a zero
    units = pd.read_csv(root / "o10" / "test_selected" / "per_unit_metrics.csv")
    assert units[units["Method"] == "Spectral split (no rule)"]["mean"].tolist() == [0.71]


def test_script11_sensitivity(tmp_path, repo_root):
    data, _ = build_tree(tmp_path)
    stats = ExperimentLayout(data, "arithmetic", MODEL).stats_root
    (stats / SPECTRAL).rename(stats / (MAIN.replace("-agonist_neurons", "-M25000-agonist_neurons")))
    _run(repo_root, "11_summarize_sensitivity_analysis.py", "--stats_root", stats, "--out_dir", tmp_path / "o11")
    df = pd.read_csv(tmp_path / "o11" / "sensitivity_summary.csv").set_index("run")
    base = df.loc[MAIN]
    assert (base["M"], base["tau"], base["n_quality_ge_0.70"], base["n_quality_ge_0.50"]) == (43008, 0.2, 1, 3)
    assert (base["cha_groups_mean"], base["cha_groups_sem"]) == (40.0, 10.0)
    assert df.loc[MAIN.replace("-agonist_neurons", "-M25000-agonist_neurons"), "M"] == 25000
    assert (tmp_path / "o11" / "plots" / "cha_budget_vs_tau.pdf").is_file()
    assert (tmp_path / "o11" / "README.md").is_file()


def test_clean_results_for_export(tmp_path, repo_root):
    data, _ = build_tree(tmp_path)
    (data / "arithmetic" / "Qwen" / "Qwen2-7B-Instruct" / "rule_extraction_results" / "neuron_flip_rules"
     / "is_correct_mean_positional_decode_only" / "ablation_cache").mkdir(parents=True)
    junk = (data / "arithmetic" / "Qwen" / "Qwen2-7B-Instruct" / "rule_extraction_results" / "neuron_flip_rules"
            / "is_correct_mean_positional_decode_only" / "ablation_cache" / "m1_5_0.pkl")
    junk.write_bytes(b"x")
    _run(repo_root, "clean_results_for_export.py", data, tmp_path / "export", "--manifest")
    manifest = json.loads((tmp_path / "export" / "export_manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    main_stats = f"arithmetic/Qwen/Qwen2-7B-Instruct/rule_extraction_results/neuron_flip_rules/stats/{MAIN}/"
    assert main_stats + "flip_stats_by_neuron.csv" in paths
    assert main_stats + "scores.csv" not in paths  # large per-row table is not exported
    assert not any(p.endswith(".pkl") for p in paths)
    assert "arithmetic/Qwen/Qwen2-7B-Instruct/feature_report/scores.csv" not in paths
    assert manifest["n_files"] == 32
    # a second run into the same folder needs --force
    res = subprocess.run([sys.executable, "clean_results_for_export.py", str(data), str(tmp_path / "export")],
                         cwd=repo_root, capture_output=True, text=True)
    assert res.returncode == 2 and "--force" in res.stderr
