"""Stage 3 through its command line on a planted table (scores.csv + features.json of stage 2).

Planted behaviour: is_correct = (f1 > 3) & (f2 <= 0.5), 5 % of labels flipped, ten distractor
features, 600 rows, stratified 20 % `is_test` split. The train-selected combo must recover the
planted rule well enough to score MCC ≥ 0.85 on the held-out test rows.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO
from lib.rules.combos import score_frozen_combo

SCRIPT = REPO / "3_extract_rules.py"
FAMILY = ("association_rules_{t}.csv", "rule_combo_train_{t}.csv", "rule_combo_{t}.csv", "optimal_rule_set_{t}.csv",
          "rule_combo_test_selected_{t}.csv", "optimal_rule_set_test_selected_{t}.csv",
          "association_rules_all_fit_{t}.csv", "rule_combo_all_fit_{t}.csv", "optimal_rule_set_all_fit_{t}.csv")
FAST = ("--npermutations", "5", "--only_unique_datapoints_in_shap", "--use_shap_in_xgb")


# The 5 % label noise caps what any rule can score on 120 test rows; with seed 8 the planted
# rule itself scores MCC 0.93 there (0.75–0.98 over seeds 0–9), so the checks test recovery.
PLANTED_SEED = 8
PLANTED_LITERAL = "f1 >= 3.5 & f2 < 0.5"     # (f1 > 3) & (f2 <= 0.5) on integer features, XGBoost form


def planted_dir(path: Path, n: int = 600, seed: int = PLANTED_SEED, *, with_split: bool = True) -> Path:
    """scores.csv + features.json of stage 2 with a planted rule.

    All features are small integers on comparable ranges: split thresholds are then exact
    (x.5), and the SHAP stage's unscaled nearest-neighbour distance (spec §5) does not starve a
    small-range planted feature of weight under --use_shap_in_xgb.
    """
    rng = np.random.default_rng(seed)
    f1 = rng.integers(0, 8, n).astype(float)
    f2 = rng.integers(-3, 4, n).astype(float)
    y = (f1 > 3) & (f2 <= 0.5)
    flip = rng.random(n) < 0.05
    y = np.where(flip, ~y, y)
    df = pd.DataFrame({"prompt": [f"p{i}" for i in range(n)], "answer": ["x"] * n, "is_correct": y})
    labels = ["F1", "f2"]
    df["f1"], df["f2"] = f1, f2
    for k in range(10):
        label = f"Distractor #{k}"
        labels.append(label)
        df[f"distractor_{k}"] = rng.integers(0, 2 if k % 2 else 3, n).astype(float)
    # A repeated label: stage 2 names the second one `f2_1`.
    labels.append("F2")
    df["f2_1"] = rng.integers(0, 2, n).astype(float)
    if with_split:
        is_test = np.zeros(n, dtype=bool)
        for cls in (False, True):
            idx = np.flatnonzero(y == cls)
            is_test[rng.choice(idx, size=int(round(0.2 * len(idx))), replace=False)] = True
        df["is_test"] = is_test
        df["split"] = np.where(is_test, "test", "train")
    path.mkdir(parents=True, exist_ok=True)
    df.to_csv(path / "scores.csv", index=False)
    (path / "features.json").write_text(json.dumps([{"label": lb, "description": ""} for lb in labels]))
    return path


def stage3(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return planted_dir(tmp_path_factory.mktemp("stage2_out"))


@pytest.fixture(scope="module")
def real_run(planted, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("rules")
    res = stage3("--features_scores_dir", str(planted), "--rules_dir", str(out), *FAST)
    return out, res


@pytest.mark.slow
def test_real_targets_write_all_scopes_and_recover_planted_rule(planted, real_run):
    out, res = real_run
    assert res.returncode == 0, res.stderr
    for pat in FAMILY:
        assert (out / pat.format(t="is_correct")).is_file(), pat
    assert (out / "global_shap_stats_train.pkl").is_file()
    scores = pd.read_csv(planted / "scores.csv")
    combo = pd.read_csv(out / "rule_combo_is_correct.csv").iloc[0]
    assert combo["score_scope"] == "test" and combo["computed_on"] == "test"
    assert combo["chosen_from"] == "frozen_train_combo_scored_on_test"
    assert int(combo["n_eval"]) == int(scores["is_test"].sum())
    train = pd.read_csv(out / "rule_combo_train_is_correct.csv").iloc[0]
    assert train["expression"] == combo["expression"]
    selected = ast.literal_eval(train["selected_literals"])
    # Recovery: the planted rule is the first literal the train-only selection picks …
    assert selected[0] == PLANTED_LITERAL, selected
    opt = pd.read_csv(out / "optimal_rule_set_is_correct.csv")
    assoc = pd.read_csv(out / "association_rules_is_correct.csv")
    assert list(opt.columns) == list(assoc.columns)
    assert sorted(opt["rule_expression"]) == sorted(selected)
    # … and, frozen, it scores MCC ≥ 0.85 on the held-out test rows.
    test = scores[scores["is_test"]].reset_index(drop=True)
    alone = score_frozen_combo({"selected_literals": [PLANTED_LITERAL]}, assoc, test, test["is_correct"].astype(float),
                               scope_name="test")
    assert alone["MCC"] >= 0.85 and alone["n_eval"] == int(combo["n_eval"])
    # The full combo: with the minimum MCC gain per added literal, the greedy OR no longer adds
    # leaf literals that memorise the 5 % noisy rows, so the whole optimal rule set holds up.
    assert combo["MCC"] >= 0.85, combo["expression"]
    assert len(selected) <= 3, selected
    ts = pd.read_csv(out / "rule_combo_test_selected_is_correct.csv").iloc[0]
    assert ts["test_selected_cache_signature"] == "test_selected_from_train_rules_v1" and not ts["heldout_valid"]
    af = pd.read_csv(out / "rule_combo_all_fit_is_correct.csv").iloc[0]
    assert af["all_fit_cache_signature"] == "all_fit_selected_scored_on_train_plus_eval_v2"
    assert af["all_fit_source_scope"] == "train_plus_eval" and int(af["n_eval"]) == len(scores)
    assert not list(out.glob("*_fake.csv"))


CHOICE_FILES = ("association_rules_{t}.csv", "rule_combo_train_{t}.csv", "optimal_rule_set_{t}.csv",
                "rule_selection_{t}.json")


@pytest.mark.slow
def test_validation_split_is_carved_from_train_and_recorded(planted, real_run):
    out, res = real_run
    sel = json.loads((out / "rule_selection_is_correct.json").read_text())
    scores = pd.read_csv(planted / "scores.csv")
    n_train = int((~scores["is_test"]).sum())
    assert sel["n_train_rows"] == n_train and sel["validation_folds"] == 4
    folds = np.bincount(sel["fold_of_train_row"])
    assert len(sel["fold_of_train_row"]) == n_train and folds.min() >= n_train // 4 - 1 and len(folds) == 4
    assert {t["options"]["use_shap_in_xgb"] for t in sel["trials"]} == {True, False}
    assert {t["options"]["max_depth"] for t in sel["trials"]} == {10, 2, 3, 4}
    best = max(t["best"]["mean_validation_MCC"] for t in sel["trials"])
    assert sel["validation_MCC"] == best > 0.8
    assert "validation MCC=" in res.stdout and "held-out test MCC=" in res.stdout


@pytest.mark.slow
def test_test_labels_steer_no_choice(planted, real_run, tmp_path):
    """Permuting the TEST labels leaves every choice (rules, combo, validation choice) byte-identical
    and changes only the TEST scores."""
    out, _ = real_run
    shuffled = tmp_path / "stage2_out"
    shuffled.mkdir()
    df = pd.read_csv(planted / "scores.csv")
    test = df["is_test"].to_numpy()
    rng = np.random.default_rng(0)
    labels = df.loc[test, "is_correct"].to_numpy()
    df.loc[test, "is_correct"] = rng.permutation(labels)
    assert (df.loc[test, "is_correct"].to_numpy() != labels).any()
    df.to_csv(shuffled / "scores.csv", index=False)
    (shuffled / "features.json").write_bytes((planted / "features.json").read_bytes())
    out2 = tmp_path / "rules"
    res = stage3("--features_scores_dir", str(shuffled), "--rules_dir", str(out2), *FAST)
    assert res.returncode == 0, res.stderr
    for pat in CHOICE_FILES:
        name = pat.format(t="is_correct")
        assert (out / name).read_bytes() == (out2 / name).read_bytes(), name
    held = [pd.read_csv(d / "rule_combo_is_correct.csv").iloc[0] for d in (out, out2)]
    assert held[0]["expression"] == held[1]["expression"]
    assert held[0]["MCC"] > 0.8 > held[1]["MCC"]


@pytest.mark.slow
def test_rerun_skips_finished_targets(planted, real_run):
    out, _ = real_run
    before = (out / "rule_combo_is_correct.csv").stat().st_mtime_ns
    res = stage3("--features_scores_dir", str(planted), "--rules_dir", str(out), *FAST)
    assert res.returncode == 0, res.stderr
    assert "skipping" in res.stdout
    assert (out / "rule_combo_is_correct.csv").stat().st_mtime_ns == before


@pytest.mark.slow
def test_fake_targets_land_in_fake_files(planted, tmp_path):
    out = tmp_path / "rules"
    res = stage3("--features_scores_dir", str(planted), "--rules_dir", str(out), "--fake_targets",
                 "--fake_target_max_abs_corr", "0.05", "--fake_target_max_tries", "500", *FAST)
    assert res.returncode == 0, res.stderr
    for pat in FAMILY:
        assert (out / pat.format(t="is_correct_fake")).is_file(), pat
    assert not (out / "rule_combo_is_correct.csv").exists()
    report = json.loads((out / "fake_targets_report.json").read_text())
    entry = report["is_correct"]
    assert entry["fake_column"] == "is_correct_fake" and entry["is_binary"] is True
    assert entry["abs_pearson_corr_true_vs_fake"] <= 0.05
    assert entry["seed"] == 42 and entry["max_abs_corr_target"] == 0.05
    for key in ("pearson_corr_true_vs_fake", "tries", "agreement_rate"):
        assert key in entry


def _one_error_line(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0], res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_inputs_name_the_file(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    _one_error_line(stage3("--features_scores_dir", str(d), "--rules_dir", str(tmp_path / "r")), "scores.csv")
    pd.DataFrame({"is_correct": [True, False]}).to_csv(d / "scores.csv", index=False)
    _one_error_line(stage3("--features_scores_dir", str(d), "--rules_dir", str(tmp_path / "r")), "features.json")


def test_missing_target_column(tmp_path):
    d = planted_dir(tmp_path / "in", n=60)
    pd.read_csv(d / "scores.csv").drop(columns=["is_correct"]).to_csv(d / "scores.csv", index=False)
    _one_error_line(stage3("--features_scores_dir", str(d), "--rules_dir", str(tmp_path / "r")), "is_correct")


def test_single_class_target_on_train_rows(tmp_path):
    d = planted_dir(tmp_path / "in", n=60)
    df = pd.read_csv(d / "scores.csv")
    df["is_correct"] = True
    df.to_csv(d / "scores.csv", index=False)
    out = tmp_path / "r"
    res = stage3("--features_scores_dir", str(d), "--rules_dir", str(out))
    assert res.returncode == 0, res.stderr
    assert "single class" in res.stdout
    from lib.rules.rule_files import load_rules

    assert len(load_rules(out / "optimal_rule_set_is_correct.csv")) == 0
    assert "single class" in json.loads((out / "rule_extraction_skipped_is_correct.json").read_text())["reason"]
    entry = json.loads((out / "run_manifest.json").read_text())["stages"]["stage3"]
    assert entry["seed"] == 42 and entry["config"]["rules_dir"] == str(out)


def test_random_seed_is_the_seed_of_the_run(tmp_path):
    d = planted_dir(tmp_path / "in", n=60)
    df = pd.read_csv(d / "scores.csv")
    df["is_correct"] = True
    df.to_csv(d / "scores.csv", index=False)
    for flag in ("--random_seed", "--seed"):
        out = tmp_path / flag.strip("-")
        res = stage3("--features_scores_dir", str(d), "--rules_dir", str(out), flag, "7")
        assert res.returncode == 0, res.stderr
        entry = json.loads((out / "run_manifest.json").read_text())["stages"]["stage3"]
        assert entry["seed"] == 7 and entry["config"]["seed"] == 7 and "random_seed" not in entry["config"]


@pytest.mark.parametrize("extra, needle", [
    (["--npermutations", "0"], "--npermutations must be >= 1, got 0"),
    (["--fake_target_max_abs_corr", "1.5"], "--fake_target_max_abs_corr must be in [0, 1]"),
    (["--n_estimators", "0"], "--n_estimators must be >= 1"),
    (["--random_seed", "x"], "--random_seed"),
])
def test_bad_flag_value_exits_2_naming_the_flag(planted, tmp_path, extra, needle):
    res = stage3("--features_scores_dir", str(planted), "--rules_dir", str(tmp_path / "r"), *extra)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r").exists()


def test_string_feature_column_is_named(tmp_path):
    d = planted_dir(tmp_path / "in", n=60)
    df = pd.read_csv(d / "scores.csv")
    df["distractor_3"] = ["abc"] * len(df)
    df.to_csv(d / "scores.csv", index=False)
    _one_error_line(stage3("--features_scores_dir", str(d), "--rules_dir", str(tmp_path / "r")),
                    "distractor_3", "not numeric")


@pytest.mark.slow
def test_no_is_test_column_warns_and_uses_all_rows_as_train(tmp_path):
    d = planted_dir(tmp_path / "in", n=200, with_split=False)
    out = tmp_path / "r"
    res = stage3("--features_scores_dir", str(d), "--rules_dir", str(out), *FAST)
    assert res.returncode == 0, res.stderr
    assert "no is_test column" in res.stdout and "no held-out" in res.stdout
    combo = pd.read_csv(out / "rule_combo_is_correct.csv").iloc[0]
    assert combo["score_scope"] == "train_selection"
    assert not (out / "rule_combo_test_selected_is_correct.csv").exists()
    af = pd.read_csv(out / "rule_combo_all_fit_is_correct.csv").iloc[0]
    assert af["all_fit_source_scope"] == "train_only_no_eval"


def test_feature_columns_resolved_from_labels_with_stage2_suffixes():
    from lib.pipeline.stage3_rules import resolve_feature_columns

    cols = ["prompt", "operand_a", "is_correct", "f1", "operand_a_1", "f2", "f2_1", "is_test", "split"]
    labels = ["F1", "operand a", "f2", "F2"]
    assert resolve_feature_columns(cols, labels, ["is_correct"]) == ["f1", "operand_a_1", "f2", "f2_1"]


# --------------------------------------------------------------------------------------------
# In-process checks of the orchestration with a stand-in rule model (independent of lib.rules.ruleshap)
# --------------------------------------------------------------------------------------------

class _AtomRules:
    """Stand-in for RuleSHAP: single-feature atoms at three quantiles, oriented like §7."""

    def __init__(self, random_state, n_estimators=500, use_lasso=False, **_):
        self.texts: list[str] = []

    def fit(self, X, y, feature_weights=None):
        for c in X.columns:
            for q in np.unique(np.quantile(X[c], [0.25, 0.5, 0.75])):
                self.texts += [f"{c} < {q:g}", f"{c} >= {q:g}"]
        return self

    def get_rules(self, X, y):
        from lib.rules.evaluation import evaluate_many

        F = evaluate_many(self.texts, X)
        yb = np.asarray(y) >= 0.5
        rows = []
        for j, t in enumerate(self.texts):
            f = F[:, j]
            s = yb[f].mean() - yb[~f].mean() if 0 < f.sum() < len(f) else 0.0
            rows.append({"rule_index": j, "is_negated": s < 0, "rule_expression": t if s >= 0 else f"NOT({t})",
                         "component_type": "rule", "importance": abs(s)})
        return pd.DataFrame(rows).sort_values("importance", ascending=False, kind="stable")


@pytest.fixture()
def stub_models(monkeypatch):
    import types

    rs = types.ModuleType("lib.rules.ruleshap")
    rs.RuleSHAP = _AtomRules
    sh = types.ModuleType("lib.rules.shap_importance")
    sh.compute_global_shap_stats = lambda X, y, **kw: {c: {"upper_importance_bound": 1.0} for c in X.columns}
    sh.shap_feature_weights = lambda stats, names: np.full(len(names), 1.0 / len(names))
    monkeypatch.setitem(sys.modules, "lib.rules.ruleshap", rs)
    monkeypatch.setitem(sys.modules, "lib.rules.shap_importance", sh)


def test_run_rule_extraction_scores_frozen_train_combo_on_eval_rows(stub_models, tmp_path):
    import argparse

    from lib.rules.extraction import run_rule_extraction

    rng = np.random.default_rng(1)
    n = 300
    df = pd.DataFrame({"a": rng.integers(0, 10, n).astype(float), "b": rng.normal(size=n)})
    df["t"] = (df["a"] >= 5).astype(float)
    train, test = df.iloc[:200].reset_index(drop=True), df.iloc[200:].reset_index(drop=True)
    test.loc[:9, "t"] = 1 - test.loc[:9, "t"]          # the eval rows differ from train: 10 flipped labels
    args = argparse.Namespace(random_seed=0, use_shap_in_xgb=True, npermutations=5)
    res = run_rule_extraction(train, ["a", "b"], ["t"], args, eval_df=test, rules_dir=tmp_path, echo=lambda s: None)
    tr = pd.read_csv(tmp_path / "rule_combo_train_t.csv").iloc[0]
    ev = pd.read_csv(tmp_path / "rule_combo_t.csv").iloc[0]
    assert tr["MCC"] == pytest.approx(1.0, abs=1e-9)
    assert ev["score_scope"] == "test" and int(ev["n_eval"]) == 100
    assert ev["tp"] + ev["fp"] + ev["tn"] + ev["fn"] == 100 and ev["fp"] + ev["fn"] == 10
    assert ev["MCC"] < 1.0 and ev["selection_MCC"] == pytest.approx(tr["MCC"])
    af = pd.read_csv(tmp_path / "rule_combo_all_fit_t.csv").iloc[0]
    assert int(af["n_eval"]) == 300 and af["all_fit_n_train_rows"] == 200 and af["all_fit_n_eval_rows"] == 100
    assert res["t"]["status"] == "done"
    # Resume: everything present → skipped; a stale all-fit signature recomputes only ALL-FIT.
    assert run_rule_extraction(train, ["a", "b"], ["t"], args, eval_df=test, rules_dir=tmp_path,
                               echo=lambda s: None)["t"]["status"] == "skipped"
    pd.DataFrame([{"all_fit_cache_signature": "old"}]).to_csv(tmp_path / "rule_combo_all_fit_t.csv", index=False)
    mtime = (tmp_path / "rule_combo_t.csv").stat().st_mtime_ns
    res = run_rule_extraction(train, ["a", "b"], ["t"], args, eval_df=test, rules_dir=tmp_path, echo=lambda s: None)
    assert "all_fit" in res["t"] and "train" not in res["t"]
    assert (tmp_path / "rule_combo_t.csv").stat().st_mtime_ns == mtime


def test_make_fake_targets_binary_and_continuous():
    from lib.rules.extraction import make_fake_targets

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"b": (rng.random(400) < 0.3).astype(float), "c": rng.normal(size=400)})
    df.loc[:4, "c"] = np.nan
    out, rep = make_fake_targets(df, ["b", "c"], seed=3, max_abs_corr=0.05, max_tries=500)
    assert set(rep) == {"b", "c"}
    assert rep["b"]["is_binary"] and set(np.unique(out["b_fake"])) <= {0.0, 1.0}
    assert not rep["c"]["is_binary"] and "agreement_rate" not in rep["c"]
    assert out["c_fake"].isna().sum() == 5 and out["c_fake"][:5].isna().all()
    for e in rep.values():
        assert e["abs_pearson_corr_true_vs_fake"] <= 0.05
    out2, rep2 = make_fake_targets(df, ["b", "c"], seed=3, max_abs_corr=0.05, max_tries=500)
    assert out2.equals(out) and rep2 == rep
