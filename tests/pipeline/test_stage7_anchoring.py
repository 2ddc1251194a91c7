"""Stage 7 (neuron-anchored rules): candidate units from stage-6 buckets, flip columns through the
batched engine on the embedded SmolLM2 with a planted unit, held-out TEST scope integrity, the
summary files the reporting loaders read, resumability from content-keyed caches, bad input."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.core.files_and_cache import ArtifactError
from lib.anchoring.units import Unit, load_candidate_units
from lib.runs.layout import RunOptions, run_mode
from lib.tasks.arithmetic_task import TASK_SPEC as ARITH
from tests.conftest import SMOLLM2, serve_loaded_model

FEW_SHOT = "3+5=8\n9-4=5\n6*7=42\n8/2=4\n"
PLANT = {10: [33]}
RUN = run_mode(RunOptions(discovery_sampling="random", anchoring="random", intervention="zero"))
FLIP_STATS_COLUMNS = ["layer_label", "layer_key", "neuron_id", "neuron", "n_eval", "c2i_count", "i2c_count",
                      "flip_any_count", "c2i_rate", "i2c_rate", "flip_any_rate", "c2i_pct", "i2c_pct", "flip_any_pct",
                      "semantic_wrong_count", "flip_semantic_wrong_count", "flip_empty_count", "flip_unparseable_count",
                      "flip_semantic_wrong_share"]
RULE_SUMMARY_COLUMNS = ["rule_target_dir", "layer_key", "neuron_id", "neuron_key", "flip_target", "computed_on",
                        "score_scope", "P(target=1|fire)", "Precision", "R(fire|target=1)", "F1", "MCC", "TPR", "TNR",
                        "BalancedAcc", "Acc", "dataset_coverage", "n_eval", "n_pos", "n_neg", "n_fire",
                        "target_prevalence", "rule_fire_rate", "expression", "rule_len_atoms", "rule_len_disjuncts",
                        "rule_len_max_atoms_in_disjunct", "rule_combo_path", "source_filename",
                        "source_scope_from_filename", "neuron_rank", "baseline_subset"]


def _stage7():
    return importlib.import_module("7_refine_neuron_anchored_rules")


def _run(argv):
    from lib.pipeline.cli import run_main

    return run_main(_stage7().main, argv)


def pdf_pages(path: Path) -> int:
    """Pages of a PDF file (matplotlib writes uncompressed page objects); 0 if it is not a whole PDF."""
    data = Path(path).read_bytes()
    if not data.startswith(b"%PDF-") or b"%%EOF" not in data[-64:]:
        return 0
    return len(re.findall(rb"/Type\s*/Page(?![s\w])", data))


def _agonist(layer: str, nid: int, eff: float, regime: str) -> dict:
    last = {"circuit_id": 0, "baseline_subset": regime, "layer_label": layer, "neuron_id": nid, "max_effect": eff,
            "max_effect_hat": eff / 2, "accuracy_gap": 0.1, "accuracy_on_associated": 0.5, "accuracy_on_unrelated": 0.6}
    return {"best_abs_gap": eff, "best_max_effect": eff, "last_record": last}


def write_buckets(root: Path) -> Path:
    """Stage-6 style output: positive and negative regimes, one catastrophic unit, one below τ."""
    pos = {"catastrophic_zero": {"candidates": {}, "confirmed": {"m26:1": {"n_trials": 3, "n_zero_zero": 3, "history": []}},
                                 "not_always": {}},
           "non_catastrophic_agonists": {"m10:33": _agonist("m10", 33, 0.9, "positive"),
                                         "m28:5": _agonist("m28", 5, 0.5, "positive"),
                                         "m27:7": _agonist("m27", 7, 0.1, "positive"),
                                         "m26:1": _agonist("m26", 1, 0.9, "positive")}}
    neg = {"catastrophic_zero": {"candidates": {}, "confirmed": {}, "not_always": {}},
           "non_catastrophic_agonists": {"m28:5": _agonist("m28", 5, 0.6, "negative"),
                                         "m29:100": _agonist("m29", 100, 0.3, "negative")}}
    for regime, obj in (("positive", pos), ("negative", neg)):
        d = root / f"{regime}_baseline"
        d.mkdir(parents=True)
        (d / "neuron_buckets.json").write_text(json.dumps(obj))
    return root


def test_candidate_units_from_buckets(tmp_path):
    units = load_candidate_units(write_buckets(tmp_path / "bag"), 0.2)
    assert [u.key for u in units] == ["m29:100", "m28:5", "m10:33"]  # (layer, id) descending; τ and catastrophic out
    m28 = next(u for u in units if u.key == "m28:5")
    assert m28.baseline_subset == "all" and m28.max_effect == 0.6 and len(m28.sources) == 2
    assert [u.key for u in load_candidate_units(tmp_path / "bag", 0.2, max_neurons=1)] == ["m29:100"]
    import shutil

    shutil.make_archive(str(tmp_path / "bag"), "zip", tmp_path / "bag")
    assert [u.key for u in load_candidate_units(tmp_path / "bag.zip", 0.2)] == [u.key for u in units]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no neuron_buckets.json"):
        load_candidate_units(tmp_path / "empty", 0.2)


def test_rule_length_counts_atoms_and_disjuncts():
    from lib.anchoring.rules import rule_length

    assert rule_length("(a < 3 & b >= 0.5) OR (NOT(c == 1))") == (3, 2, 2)
    assert rule_length("FALSE") == (0, 0, 0)


# ---- held-out integrity (no model) ---------------------------------------------------------

def _args(extra=()):
    from lib.pipeline.config import parse_config
    from lib.pipeline.stage7_anchoring import Stage7Config

    return parse_config(Stage7Config, ["--circuit_agonists_path", "x", "--features_scores_dir", "y",
                                       "--search_epsilon", "0.2", "--npermutations", "1", *extra])


def _synthetic_frame(seed=0, n=200):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x1": rng.integers(0, 10, n).astype(float), "x2": rng.integers(0, 4, n).astype(float),
                       "x3": rng.random(n).round(2)})
    flip = (df.x1 >= 6) | ((df.x2 == 3) & (rng.random(n) < 0.5))
    df["is_test"] = np.arange(n) % 5 == 0
    df["_evaluated"] = True
    df["flip_m5_1"] = pd.array(flip.to_numpy(), dtype="boolean")
    df["flip_c2i_m5_1"] = pd.array(flip.to_numpy(), dtype="boolean")
    df["flip_i2c_m5_1"] = pd.array(np.zeros(n, bool), dtype="boolean")
    return df


def test_heldout_test_scope_never_sees_test_labels(tmp_path):
    from lib.anchoring.rules import extract_unit_rules

    unit = Unit("m5", 1, 0.5)
    args = _args(["--rule_targets", "flip_m5_1,flip_i2c_m5_1"])
    df = _synthetic_frame()
    res = extract_unit_rules(df, ["x1", "x2", "x3"], unit, args, tmp_path / "a", "f", echo=lambda m: None)
    assert res["targets"] == ["flip_m5_1"]  # --rule_targets; i2c has no positives on TRAIN
    assert "flip_i2c_m5_1" in res["skipped"]
    perm = df.copy()
    test = np.flatnonzero(perm["is_test"].to_numpy())
    vals = perm.loc[test, "flip_m5_1"].to_numpy()
    perm.loc[test, "flip_m5_1"] = np.random.default_rng(1).permutation(vals[::-1])
    assert (perm["flip_m5_1"] != df["flip_m5_1"]).any()
    extract_unit_rules(perm, ["x1", "x2", "x3"], unit, args, tmp_path / "b", "f", echo=lambda m: None)
    for t in res["targets"]:
        a_tr = pd.read_csv(tmp_path / "a" / f"rule_combo_train_{t}.csv").iloc[0]
        b_tr = pd.read_csv(tmp_path / "b" / f"rule_combo_train_{t}.csv").iloc[0]
        assert a_tr["expression"] == b_tr["expression"] and a_tr["selected_literals"] == b_tr["selected_literals"]
        assert a_tr["MCC"] == b_tr["MCC"]
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / f"association_rules_{t}.csv"),
                                      pd.read_csv(tmp_path / "b" / f"association_rules_{t}.csv"))
        a_te = pd.read_csv(tmp_path / "a" / f"rule_combo_{t}.csv").iloc[0]
        b_te = pd.read_csv(tmp_path / "b" / f"rule_combo_{t}.csv").iloc[0]
        assert a_te["computed_on"] == "test" and a_te["n_eval"] == len(test)
        assert a_te["expression"] == b_te["expression"]  # the frozen TRAIN combo
        assert a_te["MCC"] != b_te["MCC"]  # ... scored on the (permuted) test labels
        assert a_te["MCC"] > 0.5
        assert (tmp_path / "a" / f"rule_combo_all_fit_{t}.csv").is_file()
    # unchanged inputs: the unit's files are reused; changed labels: recomputed (signature)
    again = extract_unit_rules(df, ["x1", "x2", "x3"], unit, args, tmp_path / "a", "f", echo=lambda m: None)
    assert again["reused"] is True


def test_best_target_per_unit_is_chosen_on_train_not_test(tmp_path):
    """Two targets of one unit: `flip_m5_1` is the better one on TRAIN. Scrambling its TEST labels makes
    `flip_c2i_m5_1` the better one on TEST; the unit's reported target stays `flip_m5_1` (chosen on TRAIN)
    and only its TEST score drops — choosing on TEST would have switched."""
    from lib.anchoring.rules import collect_rule_rows, extract_unit_rules, write_rule_summaries

    rng = np.random.default_rng(3)
    n = 400
    df = pd.DataFrame({"x1": rng.integers(0, 10, n).astype(float), "x2": rng.integers(0, 4, n).astype(float)})
    clean = (df.x1 >= 6).to_numpy()
    noisy = np.where(rng.random(n) < 0.15, ~clean, clean)
    df["is_test"] = np.arange(n) % 4 == 0
    df["_evaluated"] = True
    df["flip_m5_1"] = pd.array(clean, dtype="boolean")
    df["flip_c2i_m5_1"] = pd.array(noisy, dtype="boolean")
    df["flip_i2c_m5_1"] = pd.array(np.zeros(n, bool), dtype="boolean")
    perm = df.copy()
    test = np.flatnonzero(perm["is_test"].to_numpy())
    perm.loc[test, "flip_m5_1"] = pd.array(np.random.default_rng(0).permutation(clean[test]), dtype="boolean")
    unit = Unit("m5", 1, 0.5)
    args = _args(["--rule_targets", "flip_m5_1,flip_c2i_m5_1"])
    best = {}
    for name, frame in (("a", df), ("b", perm)):
        res = extract_unit_rules(frame, ["x1", "x2"], unit, args, tmp_path / name / "tag" / unit.neuron_key, "f",
                                 echo=lambda m: None)
        rows = collect_rule_rows([unit], {unit.neuron_key: res["targets"]}, tmp_path / name, "tag")
        best[name] = write_rule_summaries(rows, tmp_path / name, "run", args)["test"].set_index("neuron_key")
        test_rows = rows[rows.score_scope == "test"].set_index("flip_target")["MCC"]
        if name == "b":  # on TEST the other target now wins
            assert test_rows["flip_c2i_m5_1"] > test_rows["flip_m5_1"]
    assert best["a"].loc["m5_1", "flip_target"] == best["b"].loc["m5_1", "flip_target"] == "flip_m5_1"
    assert best["a"].loc["m5_1", "MCC"] > 0.9 > 0.3 > best["b"].loc["m5_1", "MCC"]


# ---- the embedded model with a planted unit ------------------------------------------------

@pytest.fixture(scope="module")
def planted_rows(smollm2):
    """Few-shot additions the model answers correctly; planted flips = results whose first digit is 2."""
    from lib.ablation.engine import AblationEngine

    cands = [FEW_SHOT + f"{a}+{b}=" for a in range(10, 18) for b in range(1, 20, 2)
             if 11 <= a + b <= 36 and "2" not in str(a + b)[1:]]
    eng = AblationEngine(smollm2, ARITH.MAX_NEW_TOKENS, 256, ("\n",))
    answers = eng.generate(eng.prepare(cands), [None])[0]
    ok = ARITH.is_answer_positive([{"prompt": p} for p in cands], answers)
    rows = [(p, a) for p, a, good in zip(cands, answers, ok) if good]
    df = pd.DataFrame({"prompt": [p for p, _ in rows], "raw_output": [a for _, a in rows], "is_correct": True})
    res = df.prompt.map(lambda p: sum(int(x) for x in p.rsplit("\n", 1)[-1].rstrip("=").split("+")))
    df["result_first_digit_2"] = (res // 10 == 2).astype(float)
    df["first_operand"] = df.prompt.map(lambda p: float(p.rsplit("\n", 1)[-1].split("+")[0]))
    df["second_is_even"] = df.prompt.map(lambda p: float(int(p.rsplit("\n", 1)[-1].split("+")[1].rstrip("=")) % 2 == 0))
    rank = df.groupby("result_first_digit_2").cumcount()
    df["is_test"] = rank % 4 == 3
    n2 = int(df.result_first_digit_2.sum())
    assert n2 >= 8 and len(df) - n2 >= 8, f"too few correct prompts: {n2} with 2x, {len(df) - n2} without"
    return df


def _gate_token(model) -> int:
    ids = model.tokenizer("2", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    return ids[0]


def _write_stage2(tmp_path: Path, df: pd.DataFrame) -> Path:
    d = tmp_path / "feature_report"
    d.mkdir()
    df.to_csv(d / "scores.csv", index=False)
    (d / "features.json").write_text(json.dumps([{"label": "result first digit 2"}, {"label": "first operand"},
                                                 {"label": "second is even"}]))
    return d


def test_stage7_cli_planted_unit_flips_and_rule(tmp_path, smollm2, planted_rows, monkeypatch, capsys):
    from tests.planted import planted_model

    import lib.models.loading as mab

    feats = _write_stage2(tmp_path, planted_rows)
    bag = write_buckets(tmp_path / "bag")
    rules = tmp_path / "neuron_flip_rules"
    argv = ["--circuit_agonists_path", str(bag), "--features_scores_dir", str(feats), "--ai_model", SMOLLM2,
            "--search_epsilon", "0.2", "--stats_dirname", RUN, "--rules_dir", str(rules), "--intervention", "zero",
            "--decode_only", "--batch_size", "256", "--neuron_batch_size", "4", "--extract_rules",
            "--rule_targets", "flip_m10_33,flip_m28_5,flip_m29_100",
            "--summarize_rule_metrics", "--npermutations", "1", "--n_estimators", "200", "--device", "cpu",
            "--no_tqdm_batches"]
    serve_loaded_model(monkeypatch, mab, smollm2)
    with planted_model(smollm2, PLANT, gate_token=_gate_token(smollm2)):
        assert _run(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"1 unit\(s\) with an HQ\(TEST\) rule", out), out
    stats = rules / "stats" / RUN
    scores = pd.read_csv(stats / "scores.csv")
    assert len(scores) == len(planted_rows)
    expected = planted_rows["result_first_digit_2"].to_numpy() > 0.5
    assert scores["flip_m10_33"].astype(bool).tolist() == expected.tolist()
    assert scores["flip_c2i_m10_33"].astype(bool).tolist() == expected.tolist()
    assert not scores["flip_i2c_m10_33"].astype(bool).any()
    for u in ("m28_5", "m29_100"):
        assert {f"flip_{u}", f"flip_c2i_{u}", f"flip_i2c_{u}"} <= set(scores.columns)
    assert "flip_m26_1" not in scores.columns and "flip_m27_7" not in scores.columns

    unit_dir = rules / "is_correct_zero_decode_only" / "m10_33"
    test_row = pd.read_csv(unit_dir / "rule_combo_flip_m10_33.csv").iloc[0]
    assert test_row["computed_on"] == "test" and test_row["n_eval"] == int(planted_rows.is_test.sum())
    assert "result_first_digit_2" in test_row["expression"] and test_row["MCC"] >= 0.99
    assert (unit_dir / "rule_combo_all_fit_flip_m10_33.csv").is_file()

    fsn = pd.read_csv(stats / "flip_stats_by_neuron.csv")
    assert set(FLIP_STATS_COLUMNS) <= set(fsn.columns) and len(fsn) == 3
    assert fsn.loc[fsn.neuron == "m10:33", "flip_any_count"].item() == int(expected.sum())
    glob = json.loads((stats / "flip_stats_global.json").read_text())
    assert glob["n_neurons"] == 3 and glob["union_any_unique_count"] >= int(expected.sum())
    best = pd.read_csv(stats / "rule_combo_metrics_test_best_per_neuron.csv")
    assert set(RULE_SUMMARY_COLUMNS) <= set(best.columns)
    assert best.loc[best.neuron_key == "m10_33", "MCC"].item() >= 0.99
    cov = json.loads((stats / "high_quality_neuron_flip_coverage.json").read_text())
    assert cov["primary_score_scope"] == "test" and cov["n_neurons_total"] == 3
    assert "m10_33" in cov["score_scopes"]["test"]["high_quality_neurons"]
    assert "m10_33" in cov["score_scopes"]["all_fit"]["high_quality_neurons"]
    for pdf in ("high_quality_neuron_flip_coverage.pdf", "high_quality_neuron_flip_coverage_by_layer.pdf",
                "flip_stats_top3.pdf", "rule_metrics_distributions_test.pdf", "rule_metrics_distributions_all_fit.pdf"):
        assert pdf_pages(stats / pdf) >= 1, pdf

    from lib.runs.results import RunResults

    rr = RunResults(stats)
    assert rr.units() == ["m10_33", "m28_5", "m29_100"]
    assert rr.rule_metrics_signed and rr.best("test_selected") is not None
    assert "m10_33" in set(rr.best("test")["neuron_key"]) and rr.hq_threshold("all_fit") == 0.70

    # a rerun is served from the content-keyed caches: no model is needed
    def no_model(*a, **k):
        raise AssertionError("the model was loaded although every answer is cached")

    monkeypatch.setattr(mab, "load_analysed_model", no_model)
    assert _run(argv) == 0
    assert pd.read_csv(stats / "scores.csv")["flip_m10_33"].astype(bool).tolist() == expected.tolist()


def test_batched_flip_counts_equal_one_unit_at_a_time(tmp_path, smollm2, planted_rows):
    from lib.anchoring.flips import AblationContext, compute_flip_columns
    from lib.anchoring.eval_rows import mark_rows
    from tests.planted import planted_model

    frame = mark_rows(planted_rows.head(16), np.arange(min(16, len(planted_rows))), np.zeros(0, np.int64), False)
    units = [Unit("m10", 33, 0.9), Unit("m29", 100, 0.3), Unit("m20", 77, 0.3), Unit("m2", 9, 0.3)]
    counts = []
    with planted_model(smollm2, PLANT, gate_token=_gate_token(smollm2)):
        for nbs in (4, 1):
            ctx = AblationContext(SMOLLM2, ARITH, "lib.tasks.arithmetic_task", True, "zero", 32, "auto", lambda: smollm2)
            flips, rep = compute_flip_columns(frame, units, "prompt", "is_correct", ctx, None, "zero",
                                              tmp_path / f"cache{nbs}", nbs, progress=False, echo=lambda m: None)
            assert rep["n_unit_generations"] == len(units) * len(frame)
            counts.append(flips.astype("Int64").sum().to_dict())
    assert counts[0] == counts[1]
    assert counts[0]["flip_m10_33"] == int(frame.result_first_digit_2.sum()) > 0


def test_no_agonist_means_nothing_to_ablate_and_no_model(tmp_path, capsys, monkeypatch):
    """Stage 6 found no unit above τ: stage 7 exits 0 without loading a model and writes empty flip statistics."""
    import lib.models.loading as mab

    def no_model(*a, **k):
        raise AssertionError("a model was loaded although there is no unit to ablate")

    monkeypatch.setattr(mab, "load_analysed_model", no_model)
    df = pd.DataFrame({"prompt": [f"{i}+1=" for i in range(20)], "answer": [str(i + 1) for i in range(20)],
                       "is_correct": [True] * 20, "is_test": [i % 5 == 0 for i in range(20)],
                       "result_first_digit_2": [float(str(i + 1)[0] == "2") for i in range(20)]})
    feats = _write_stage2(tmp_path, df)
    bag = write_buckets(tmp_path / "bag")
    rules = tmp_path / "rules"
    argv = ["--circuit_agonists_path", str(bag), "--features_scores_dir", str(feats), "--ai_model", SMOLLM2,
            "--search_epsilon", "0.99", "--stats_dirname", RUN, "--rules_dir", str(rules), "--extract_rules",
            "--summarize_rule_metrics", "--decode_only", "--no_tqdm_batches"]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert "0 candidate unit(s)" in out and "nothing is ablated" in out
    fsn = pd.read_csv(rules / "stats" / RUN / "flip_stats_by_neuron.csv")
    assert len(fsn) == 0


def test_stage7_bad_input(tmp_path, capsys):
    feats = tmp_path / "fr"
    feats.mkdir()
    (tmp_path / "bag").mkdir()
    base = ["--circuit_agonists_path", str(tmp_path / "bag"), "--features_scores_dir", str(feats),
            "--rules_dir", str(tmp_path / "r")]
    assert _run(base + ["--search_epsilon", "0.2"]) == 2
    assert "no neuron_buckets.json" in capsys.readouterr().err
    write_buckets(tmp_path / "bag2")
    base[1] = str(tmp_path / "bag2")
    assert _run(base + ["--search_epsilon", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "scores" in err and "--features_scores_dir" in err
    assert _run(base) == 2
    assert "--search_epsilon is required" in capsys.readouterr().err
    assert _run(base + ["--search_epsilon", "0.2", "--input_only", "--decode_only"]) == 2
    assert "mutually exclusive" in capsys.readouterr().err
    assert _run(base + ["--search_epsilon", "0.2", "--n_estimators", "0"]) == 2
    assert "--n_estimators must be >= 1" in capsys.readouterr().err
    pd.DataFrame({"prompt": ["1+1="], "is_correct": [True]}).to_csv(feats / "scores.csv", index=False)
    assert _run(base + ["--search_epsilon", "0.2"]) == 2
    assert "features.json" in capsys.readouterr().err
