"""make_paper_tables.py on a synthetic tree in the original layout; numbers computed by hand."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from tests.synthetic_artifacts import EXPECTED, build_tree


def _run_tables(repo_root, data, out, *extra):
    res = subprocess.run([sys.executable, "make_paper_tables.py", "--data_root", str(data), "--out_dir", str(out),
                          *extra], cwd=repo_root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def tables(tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("tree")
    data, _ = build_tree(root)
    out = root / "out"
    _run_tables(repo_root, data, out)
    return out


def test_table1_hq_counts_and_coverage(tables):
    t1 = pd.read_csv(tables / "table1_main_high_quality_neurons.csv")
    arith = t1[t1["Task"] == "Arithmetic"].iloc[0]
    assert arith["# Loc."] == EXPECTED["arith_units"]
    # HQ-T and HQ are the held-out scope (TRAIN combo and TRAIN-chosen target, scored on TEST rows)
    assert arith["HQ-T"] == arith["HQ"] == EXPECTED["arith_hq_heldout"]
    assert arith["HQ-F"] == EXPECTED["arith_hq_f"]
    assert arith["∪(1→0) (elig. %)"] == EXPECTED["arith_c2i_pct"]
    assert arith["∪(0→1) (elig. %)"] == EXPECTED["arith_i2c_pct"]
    jail = t1[t1["Task"] == "Jailbreaking"].iloc[0]  # found through the non-decode-only fallback
    assert (jail["HQ-T"], jail["∪(1→0) (elig. %)"]) == (1, 10.0)
    assert (tables / "table1_main_high_quality_neurons.md").read_text().count("Qwen2-7B") == 2
    assert "\\begin{tabular}" in (tables / "table1_main_high_quality_neurons.tex").read_text()


@pytest.mark.parametrize("scopes", ["test,all_fit", "test_selected,all_fit", "all_fit", "test"])
def test_table1_reads_held_out_scope_for_any_scope_pair(tmp_path, repo_root, scopes):
    """Table 1's HQ-T/HQ-F come from the held-out and ALL-FIT scopes whatever --score_scopes names: no NA."""
    data, _ = build_tree(tmp_path)
    out = tmp_path / "out"
    _run_tables(repo_root, data, out, "--which", "table1", "--score_scopes", scopes)
    t1 = pd.read_csv(out / "table1_main_high_quality_neurons.csv")
    arith = t1[t1["Task"] == "Arithmetic"].iloc[0]
    assert (arith["HQ-T"], arith["HQ-F"], arith["HQ"]) == (EXPECTED["arith_hq_heldout"], EXPECTED["arith_hq_f"],
                                                           EXPECTED["arith_hq_heldout"])
    assert not t1[["HQ-T", "HQ-F", "HQ"]].isna().any().any()


def test_table2_totals(tables):
    tot = pd.read_csv(tables / "table2_threshold_sweep_totals.csv")
    main_t = tot[(tot["Method"] == "Rule split + spectral coverage") & (tot["Score scope"] == "TEST-selected (descriptive)")].iloc[0]
    # arithmetic best MCCs 0.80, 0.72, 0.65 (+ bon 0.90) → counts ≥ 0.70/0.75/0.80/0.85/0.90
    assert [main_t[c] for c in ("All", "t = 0.70", "t = 0.75", "t = 0.80", "t = 0.85", "t = 0.90")] == [4, 3, 2, 2, 1, 1]
    long = pd.read_csv(tables / "table2_threshold_sweep_per_run_long.csv")
    fake = long[long["Method"] == "Fake rule split + spectral coverage"]
    assert not fake["scope_available"].any() and fake["n_high_quality_neurons"].isna().all()


def test_table3_recall_bins_and_like_for_like_budget(tables):
    t3 = pd.read_csv(tables / "table3_compact_bf_vs_cha.csv")
    row = t3[t3["Level"] == "model+baseline"].iloc[0]
    assert row["Recall"] == EXPECTED["recall"]
    assert [row["Recall [0.2,0.3)"], row["Recall [0.3,0.5)"], row["Recall [0.5,1]"]] == EXPECTED["recall_bins"]
    assert row["Budget"] == EXPECTED["budget"]  # circuit 1 (50 groups) is not in the brute-force run
    e2 = pd.read_csv(tables / "table3_e2_recall_budget.csv").iloc[0]
    assert e2["original_style_denominator"] == 2 * 100000 - 1 and e2["original_style_cha_evaluations"] == 80


def test_table3_falls_back_to_candidate_count(tmp_path, repo_root):
    data, _ = build_tree(tmp_path, ours=True)
    _run_tables(repo_root, data, tmp_path / "out", "--which", "table3")
    row = pd.read_csv(tmp_path / "out" / "table3_compact_bf_vs_cha.csv").iloc[0]
    assert row["Budget"] == EXPECTED["budget_ours"]


def test_other_tables(tables):
    t9 = pd.read_csv(tables / "table9_baseline_performance.csv")
    assert t9["Value (%)"].tolist() == [60.0, 25.0]
    t11 = pd.read_csv(tables / "table11_top_units_eap_vs_cha.csv")
    assert t11["EAP-IG neuron"].tolist() == ["m1:5", "m3:1", "m2:7"]  # attention unit a3.h1 excluded
    assert t11["CHA neuron"].tolist() == ["m1:5", "m2:7", "m3:9"]  # c2i tie broken by flip-any rate
    t12 = pd.read_csv(tables / "table12_cha_budget.csv")
    assert t12.iloc[0][["#rules", "Mean", "Median", "Min–Max"]].tolist() == [2, 40.0, 40.0, "30–50"]
    t13 = pd.read_csv(tables / "table13_agonist_overlap.csv").iloc[0]
    assert (t13["|A|"], t13["|J|"], t13["|A ∩ J|"], t13["Jaccard"]) == (4, 2, 1, EXPECTED["jaccard"])
    assert (tables / "unsupported_tables_note.txt").is_file()
    assert (tables / "paper_tables_manifest.json").is_file()


def test_empty_data_root_gives_header_only_tables(tmp_path, repo_root):
    (tmp_path / "data").mkdir()
    _run_tables(repo_root, tmp_path / "data", tmp_path / "out")
    t3 = pd.read_csv(tmp_path / "out" / "table3_compact_bf_vs_cha.csv")
    assert t3.empty and "Budget" in t3.columns


def test_bad_flag_is_one_error_line(tmp_path, repo_root):
    res = subprocess.run([sys.executable, "make_paper_tables.py", "--data_root", str(tmp_path), "--which", "table7"],
                         cwd=repo_root, capture_output=True, text=True)
    assert res.returncode == 2 and "table7" in res.stderr and len(res.stderr.strip().splitlines()) == 1
