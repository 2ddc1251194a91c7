"""Small synthetic `data/` + `cache/` trees in the original artifact layout, with hand-checkable numbers.

`build_tree(root)` writes two experiments (arithmetic and bon_jailbreaking on Qwen2-7B). The numbers
that the tests check by hand are spelled out in `EXPECTED`. `ours=True` adds what our stage 6 writes on
top (per-circuit `cost` blocks, `n_candidates`, `cost_summary.json`) and drops the brute-force
`rule_knockout.json`, so the budget falls back to the candidate count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lib.runs.layout import ExperimentLayout, canonical_run_mode, parse_run_mode

MODEL = "Qwen/Qwen2-7B-Instruct"
MAIN = canonical_run_mode("main")
MAIN_NO_DECODE = canonical_run_mode("main", decode_only=False)
SPECTRAL = canonical_run_mode("spectral_split")
FAKE = canonical_run_mode("fake")
BF = canonical_run_mode("bruteforce")

EXPECTED = {
    "arith_units": 3,
    "arith_hq_t": 2,  # test_selected: m1_5 (0.80; its 0.90 row is below the coverage floor) and m2_7 (0.72)
    "arith_hq_heldout": 1,  # test: m2_7 (its TRAIN-chosen target `any`, 0.72); picking on TEST would give 2
    "arith_hq_f": 1,  # m1_5 (0.75); m3_9's 0.95 row is below the floor
    "arith_c2i_pct": 50.0,  # rows {0,1,2} of 6 baseline-correct rows
    "arith_i2c_pct": 25.0,  # row {6} of 4 baseline-incorrect rows
    "recall": "3/4 (75.0%)",
    "recall_bins": ["1/2 (50.0%)", "1/1 (100.0%)", "1/1 (100.0%)"],
    "budget": "30/1000 (3.00%)",
    "budget_ours": "30/500 (6.00%)",
    "jaccard": 0.2,
}


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)


def _rule_row(scope: str, unit: str, target_kind: str, mcc: float, cov: float) -> dict:
    lk, nid = unit.rsplit("_", 1)
    target = f"flip_{unit}" if target_kind == "any" else f"flip_{target_kind}_{unit}"
    return {"rule_target_dir": "is_correct_mean_positional_decode_only", "layer_key": lk, "neuron_id": int(nid),
            "neuron_key": unit, "flip_target": target, "computed_on": scope, "score_scope": scope,
            "MCC": mcc, "F1(target=1|fire)": mcc, "BalancedAcc": (1 + mcc) / 2, "dataset_coverage": cov,
            "expression": "(a >= 0.5)", "rule_len_atoms": 1}


def _stats_run(stats: Path, rows: list[dict], signed: bool, scores: pd.DataFrame | None = None,
               fsn: pd.DataFrame | None = None) -> None:
    """One stage-7 stats folder: rule metrics (+ manifest), optional scores and flip stats."""
    stats.mkdir(parents=True, exist_ok=True)
    _write_csv(stats / "rule_combo_metrics_all_scopes.csv", pd.DataFrame(rows))
    if signed:
        _write_json(stats / "rule_combo_metrics_manifest.json", {"signature": "rule_combo_metrics_from_raw_v1"})
    if scores is not None:
        _write_csv(stats / "scores.csv", scores)
    if fsn is not None:
        _write_csv(stats / "flip_stats_by_neuron.csv", fsn)
    _write_json(stats / "flip_stats_global.json", {"n_neurons": 0 if fsn is None else len(fsn),
                                                   "union_c2i_unique_rate": 0.1, "union_i2c_unique_rate": 0.05,
                                                   "union_any_unique_rate": 0.15})
    _write_json(stats / "high_quality_neuron_flip_coverage.json",
                {"quality_threshold": 0.7, "quality_thresholds_by_scope": {"test_selected": 0.7, "all_fit": 0.7}})
    _write_json(stats / "rule_metrics_summary_all_fit.json", {"n_neurons_with_rules": 0})


def _arith_scores() -> pd.DataFrame:
    """10 rows; 6 baseline-correct; c2i flips on rows 0-2, i2c flip on row 6."""
    t, f, na = True, False, None
    df = pd.DataFrame({"prompt": [f"{i}+1=" for i in range(10)],
                       "is_correct": [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
                       "is_test": [f, f, f, f, f, f, f, f, t, t]})
    cols = {
        "flip_c2i_m1_5": [t, t, f, f, f, f, f, f, f, f],
        "flip_i2c_m1_5": [f, f, f, f, f, f, t, f, f, f],
        "flip_c2i_m2_7": [f, t, t, f, f, f, f, f, f, f],
        "flip_i2c_m2_7": [f] * 10,
        "flip_c2i_m3_9": [f] * 9 + [na],
        "flip_i2c_m3_9": [f] * 9 + [na],
    }
    for unit in ("m1_5", "m2_7", "m3_9"):
        c2i, i2c = cols[f"flip_c2i_{unit}"], cols[f"flip_i2c_{unit}"]
        df[f"flip_{unit}"] = [None if a is None else (a or b) for a, b in zip(c2i, i2c)]
        df[f"flip_c2i_{unit}"] = c2i
        df[f"flip_i2c_{unit}"] = i2c
    return df


def _fsn(scores: pd.DataFrame) -> pd.DataFrame:
    """flip_stats_by_neuron.csv computed from the flip columns (counts over evaluated rows)."""
    rows = []
    for unit in ("m1_5", "m2_7", "m3_9"):
        lk, nid = unit.rsplit("_", 1)
        n_eval = int(scores[f"flip_{unit}"].notna().sum())
        c2i = int(scores[f"flip_c2i_{unit}"].fillna(False).astype(bool).sum())
        i2c = int(scores[f"flip_i2c_{unit}"].fillna(False).astype(bool).sum())
        rows.append({"layer_label": lk, "layer_key": lk, "neuron_id": int(nid), "neuron": f"{lk}:{nid}",
                     "n_eval": n_eval, "c2i_count": c2i, "i2c_count": i2c, "flip_any_count": c2i + i2c,
                     "c2i_rate": c2i / n_eval, "i2c_rate": i2c / n_eval, "flip_any_rate": (c2i + i2c) / n_eval})
    return pd.DataFrame(rows)


def _agonists(spec: dict[str, tuple[float, int]]) -> dict:
    """Bucket file with non-catastrophic agonists {key: (max_effect, circuit_id)}."""
    agon = {}
    for key, (eff, cid) in spec.items():
        layer, nid = key.split(":")
        agon[key] = {"best_abs_gap": eff, "last_record": {
            "circuit_id": cid, "baseline_subset": "positive", "layer_label": layer, "neuron_id": int(nid),
            "max_effect": eff, "accuracy_gap": eff / 2, "accuracy_on_associated": 0.5, "accuracy_on_unrelated": 0.9}}
    return {"catastrophic_zero": {"candidates": {}, "confirmed": {}, "not_always": {}},
            "non_catastrophic_agonists": agon}


def _knockout(groups: dict[int, int], skipped: tuple[int, ...] = ()) -> list[dict]:
    out = [{"circuit_id": cid, "circuit_label": f"rule {cid}", "rule_target": "is_correct", "status": "ok",
            "baseline_subset": "positive", "n_ablation_groups": n} for cid, n in groups.items()]
    out += [{"circuit_id": cid, "status": "skipped", "reason": "Insufficient associated or unrelated prompts"}
            for cid in skipped]
    return out


def _stage6(layout: ExperimentLayout, run: str, subset: str, agonists: dict, groups: dict[int, int] | None,
            cost: dict[int, dict] | None = None) -> Path:
    """A stage-6 regime folder: buckets, knockout summary, optional per-circuit JSONs with cost blocks."""
    d = layout.baseline_dir(parse_run_mode(run), subset)
    _write_json(d / "neuron_buckets.json", _agonists(agonists))
    if groups is not None:
        _write_json(d / "rule_knockout.json", _knockout(groups, skipped=(2,)))
    for cid, block in (cost or {}).items():
        _write_json(d / "is_correct" / f"rule_{cid:04d}.json",
                    {"circuit_id": cid, "status": "ok", "baseline_subset": subset, "ablations": [], "cost": block})
    return d


def build_tree(root: Path, ours: bool = False) -> tuple[Path, Path]:
    """Write `root/data` and `root/cache`; returns (data_root, cache_root)."""
    data, cache = root / "data", root / "cache"
    # ---------------- arithmetic × Qwen2-7B (decode-only run names)
    a = ExperimentLayout(data, "arithmetic", MODEL, cache)
    fr = a.feature_report_dir
    _write_csv(fr / "scores.csv", pd.DataFrame({"prompt": ["1+1="], "is_correct": [1]}))
    _write_json(fr / "features.json", [])
    _write_json(fr / "dataset_stats.json", {"accuracy": 0.6, "n_examples": 10})
    (a.cache_dir).mkdir(parents=True, exist_ok=True)
    (a.cache_dir / "llm_io_data.pkl").write_bytes(b"\x80\x04N.")
    scores = _arith_scores()
    main_rows = [
        _rule_row("train", "m1_5", "any", 0.99, 0.5),
        _rule_row("test_selected", "m1_5", "any", 0.80, 0.10),
        _rule_row("test_selected", "m1_5", "c2i", 0.90, 0.003),
        _rule_row("test_selected", "m2_7", "any", 0.72, 0.20),
        _rule_row("test_selected", "m3_9", "any", 0.65, 0.50),
        _rule_row("all_fit", "m1_5", "any", 0.75, 0.10),
        _rule_row("all_fit", "m2_7", "any", 0.60, 0.20),
        _rule_row("all_fit", "m3_9", "any", 0.95, 0.004),
        _rule_row("all_fit", "m3_9", "i2c", 0.50, 0.30),
        _rule_row("test", "m1_5", "any", 0.40, 0.10),
        # TRAIN picks each unit's target; the TEST score of that target is reported, even where another
        # target scores higher on TEST (m2_7's c2i, m3_9's i2c: picking on TEST would count both as HQ)
        _rule_row("train", "m2_7", "any", 0.90, 0.2),
        _rule_row("train", "m2_7", "c2i", 0.50, 0.2),
        _rule_row("test", "m2_7", "any", 0.72, 0.2),
        _rule_row("test", "m2_7", "c2i", 0.95, 0.2),
        _rule_row("train", "m3_9", "any", 0.80, 0.3),
        _rule_row("train", "m3_9", "i2c", 0.30, 0.3),
        _rule_row("test", "m3_9", "any", 0.50, 0.3),
        _rule_row("test", "m3_9", "i2c", 0.90, 0.3),
    ]
    _stats_run(a.stats_dir(MAIN), main_rows, True, scores, _fsn(scores))
    _stats_run(a.stats_dir(SPECTRAL), [_rule_row("test_selected", "m1_5", "any", 0.71, 0.1)], True, scores, _fsn(scores))
    _stats_run(a.stats_dir(FAKE), [_rule_row("test_selected", "m1_5", "any", 0.95, 0.1)], False, scores, _fsn(scores))
    main_cost = {0: {"n_candidates": 500, "n_agonists": 3, "n_evaluations": 30,
                     "bound_k_log2_N_over_k_plus_k": 24.0, "exhaustive_evaluations": 500}} if ours else None
    _stage6(a, MAIN, "positive", {"m1:5": (0.6, 0), "m2:7": (0.25, 0), "m3:9": (0.35, 0), "m4:1": (0.4, 1),
                                  "m5:2": (0.1, 0)}, {0: 30, 1: 50}, main_cost)
    _stage6(a, BF, "positive", {"m1:5": (0.55, 0), "m2:7": (0.22, 0), "m3:9": (0.45, 0), "m6:3": (0.28, 0),
                                "m7:1": (0.15, 0)}, None if ours else {0: 1000})
    if ours:
        _write_json(a.baseline_dir(parse_run_mode(MAIN), "positive") / "cost_summary.json",
                    {"n_evaluations": 80, "n_candidates": 500})
    circuits = a.circuits_dir(parse_run_mode(MAIN))
    _write_json(circuits / "manifest.json", [
        {"status": "ok", "circuit_id": 0, "metadata_topn": {"neuron_label_score": {
            "('m1', 5)": -0.9, "('m2', 7)": 0.5, "('a3.h1', 2)": 5.0}}},
        {"status": "ok", "circuit_id": 1, "metadata_topn": {"neuron_label_score": {"('m1', 5)": 0.2, "('m3', 1)": 0.7}}},
        {"status": "skipped", "circuit_id": 2},
    ])
    # ---------------- bon_jailbreaking × Qwen2-7B (run names without -decode_only: tests the fallback)
    b = ExperimentLayout(data, "bon_jailbreaking", MODEL, cache)
    _write_csv(b.feature_report_dir / "scores.csv",
               pd.DataFrame({"prompt": list("abcd"), "is_jailbroken": [True, False, False, False]}))
    _write_json(b.feature_report_dir / "features.json", [])
    b.cache_dir.mkdir(parents=True, exist_ok=True)
    (b.cache_dir / "llm_io_data.pkl").write_bytes(b"\x80\x04N.")
    _stats_run(b.stats_dir(MAIN_NO_DECODE), [_rule_row("train", "m8_8", "any", 0.9, 0.2),
                                             _rule_row("test", "m8_8", "any", 0.85, 0.2),
                                             _rule_row("test_selected", "m8_8", "any", 0.9, 0.2),
                                             _rule_row("all_fit", "m8_8", "any", 0.9, 0.2)], True)
    _stage6(b, MAIN_NO_DECODE, "positive", {"m1:5": (0.3, 0), "m8:8": (0.5, 0)}, {0: 12})
    return data, cache
