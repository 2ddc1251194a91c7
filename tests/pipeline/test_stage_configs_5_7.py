"""Typed stage configs of stages 5–7: each script's parser is built from its `StageNConfig`, keeps
every flag of the hand-written parser it replaced (names, defaults, hidden status, choices), the
configs check their values on construction, and each script records its run in the folders it
writes (`run_manifest.json`), without a model."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.core.choices import CIRCUIT_LEVELS, DEFAULT_SEED
from lib.core.errors import UsageError
from lib.pipeline.config import build_parser, parse_config
from lib.pipeline.stage5_circuits import Stage5Config
from lib.pipeline.stage6_cha import Stage6Config
from lib.pipeline.stage7_anchoring import Stage7Config
from lib.runs.manifest import MANIFEST_NAME
from tests.conftest import REPO

SCRIPTS = {5: "5_discover_circuits", 6: "6_analyze_bag_of_rules", 7: "7_refine_neuron_anchored_rules"}
CONFIGS = {5: Stage5Config, 6: Stage6Config, 7: Stage7Config}
REQUIRED_ARGV = {5: ["--rules_dir", "r", "--features_scores_dir", "f"],
                 6: ["--input_data_dir", "i", "--output_data_dir", "o"],
                 7: ["--circuit_agonists_path", "c", "--features_scores_dir", "f", "--search_epsilon", "0.2"]}
REQUIRED_KW = {5: dict(rules_dir="r", features_scores_dir="f"), 6: dict(input_data_dir="i", output_data_dir="o"),
               7: dict(circuit_agonists_path="c", features_scores_dir="f", search_epsilon=0.2)}

# ---- the hand-written parsers before the typed configs (copied from them) --------------------

_DEVICE = {"device": "auto", "dtype": "auto"}
_SPECTRAL = {"spectral_space": "hidden", "rep_hook_name": "ln_final.hook_normalized", "rep_pooling": "mean",
             "max_seq_len": None, "spectral_dim": 16, "spectral_cache_dir": None}
TODAY_DEFAULTS = {
    5: {"rules_glob": "association_rules_*.csv", "fake_targets": False, "max_answer_tokens": 16,
        "stop_regex": r"\n{2,}|</s>|<\|endoftext\|>", "intervention": "zero", "eval_intervention": "mean-positional",
        "absolute_value_attributions": False, "include_zero_scores": False, "mlp_neurons_only": False,
        "ai_model": "Qwen/Qwen2-7B-Instruct", "ai_model_cache_dir": None, "cache_dir": "./cache", "seed": 0,
        "max_n_of_rules_to_analyze": -1, "temporal_agg": "mean", "decode_only": False, "decode_mode": "after_prompt",
        "method": "EAP", "max_ig_steps": 3, "circuit_size": 20, "circuit_level": "node", "max_pairs_per_circuit": 512,
        "pair_similarity_metric": "cosine", "points_to_use_for_mean_ablation": 512, "batch_size": 8,
        "sampling_strategy": "random", "sampling_plan_path": None, "cluster_by_spectral": False,
        "cluster_base_subset": "all", **_SPECTRAL, "global_n_clusters": 32,
        "output_data_dir": "neural_circuit_discovery_results", "task_module": "lib.tasks.arithmetic_task",
        "attribution_metric": "answer_logprob", "keep_going": False, "num_threads": 0, "no_progress": False,
        **_DEVICE},
    6: {"scores_path": None, "ai_model": None, "ai_model_cache_dir": None, "seed": 42, "search_epsilon": 0.2,
        "prune_alpha": 0.05, "catastrophic_acc_tol": 1e-12, "catastrophic_n_runs": 3, "n_associated": 100,
        "n_unrelated": 100, "decode_only": False, "intervention": "zero", "points_to_use_for_mean_ablation": 256,
        "top_k_neurons": None, "last_k_layers": None, "mlp_neurons_only": False, "batch_size": 16,
        "fast_ablation": False, "sign_split_first": False, "baseline_subset": "all", "sampling_strategy": "random",
        "sampling_plan_path": None, "exclude_known_agonists": False, "cluster_by_spectral": False,
        "global_n_clusters": 32, **_SPECTRAL, "skip_agonist_activation_stats": False,
        "skip_agonist_margin_stats": False, "skip_agonist_saliency_stats": False,
        "agonist_saliency_metrics": "wanda,gradient,activation_x_gradient", "task_module": "lib.tasks.arithmetic_task",
        **_DEVICE},
    7: {"search_epsilon": None, "ai_model": None, "ai_model_cache_dir": None, "stats_dirname": None,
        "task_module": "lib.tasks.arithmetic_task", "seed": 42, "batch_size": 16, "neuron_batch_size": 4,
        "no_tqdm_batches": False, "max_neurons": None, "intervention": "zero", "points_to_use_for_mean_ablation": 256,
        "last_pos_only": False, "decode_only": False, "input_only": False, "semantic_quality_policy": "filter",
        "no_rescore_cached_answers": False, "recompute_missing_semantic_cache": False, "stats_only": False,
        "summarize_rule_metrics_only": False, "skip_agonist_metric_stats": False, "agonist_metric_topk": 30,
        "exclude_discovery_rows_from_final_stats": False, "use_spectral_sampling": False, "global_n_clusters": -1,
        "keep_unsampled_rows": False, **_SPECTRAL, "coverage_radius": 0.5, "sampling_max_points": 512,
        "sampling_min_points": 64, "sampling_chunk_size": 8192, "points_per_centroid": 1,
        "centroid_sampling_mode": "random", "extract_rules": False, "rules_dir": "xai_analyses_results",
        "rule_targets": None, "random_seed": 42, "fast_shap_estimate": False, "npermutations": 5,
        "n_estimators": 500, "only_unique_datapoints_in_shap": False, "epsilon": 0.1, "use_shap_in_xgb": False,
        "use_shap_in_lasso": False, "only_unique_datapoints_in_rule_extraction": False, "emit_all_fit_rules": True,
        "force_all_fit_recompute": False, "summarize_rule_metrics": False, "rule_metrics_quantiles": "0.1,0.5,0.9",
        "rule_length_cap": 30, "rule_metrics_topk": 50, "threshold_metric": "mcc", "rule_quality_metric": None,
        "rule_quality_threshold": 0.70, "rule_quality_threshold_all_fit": 0.70, "min_rule_dataset_coverage": 0.005,
        **_DEVICE},
}
CHANGED_DEFAULTS = {(5, "seed"): DEFAULT_SEED}  # the one seed default of every stage (was 0 on stage 5)
# flags whose name differs from the attribute read (store_false switches)
FLAG_OF = {"emit_all_fit_rules": "--no_emit_all_fit_rules", "cache_dir": "--cache_dir"}
TODAY_HIDDEN = {5: set(), 6: {"--cluster_by_spectral", "--global_n_clusters", *(f"--{k}" for k in _SPECTRAL)},
                7: set()}
TODAY_ALIASES = {5: {"-c"}, 6: set(), 7: set()}
_DTYPES = {"auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"}
_ATTR_IV = {"patching", "zero", "mean", "mean-positional"}
_IV = {"zero", "mean", "mean-positional", "mean-donor", "mean-donor-positional"}
_QUALITY = {"balanced_accuracy", "mcc", "tpr", "tnr", "f1"}
TODAY_CHOICES = {
    5: {"--intervention": _ATTR_IV, "--eval_intervention": _ATTR_IV, "--temporal_agg": {"none", "mean", "max", "min"},
        "--decode_mode": {"auto", "span", "after_prompt", "all"}, "--sampling_strategy": {"random", "plan"},
        "--cluster_base_subset": {"positive", "negative", "all"}, "--spectral_space": {"hidden", "logits"},
        "--rep_pooling": {"last", "mean"}, "--attribution_metric": {"answer_logprob", "kl"},
        "--circuit_level": set(CIRCUIT_LEVELS),  # free text before, checked by validate()
        "--device": {"auto", "cpu", "cuda", "mps"}, "--dtype": _DTYPES},
    6: {"--intervention": _IV, "--baseline_subset": {"all", "positive", "negative"},
        "--sampling_strategy": {"random", "plan"}, "--device": {"auto", "cpu", "cuda", "mps"}, "--dtype": _DTYPES,
        "--cha_statistic": {"flip_ucb", "effect_sprt"}, "--cha_scope": {"candidates", "all_units"}},  # new (issue 16)
    7: {"--intervention": _IV, "--semantic_quality_policy": {"none", "filter"}, "--spectral_space": {"hidden", "logits"},
        "--rep_pooling": {"last", "mean"}, "--centroid_sampling_mode": {"random", "nearest"},
        "--threshold_metric": _QUALITY, "--rule_quality_metric": _QUALITY, "--device": {"auto", "cpu", "cuda", "mps"},
        "--dtype": _DTYPES},
}


def _script(n: int):
    return importlib.import_module(SCRIPTS[n])


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _flag(name: str) -> str:
    return FLAG_OF.get(name, f"--{name}")


@pytest.mark.parametrize("n", [5, 6, 7])
def test_parser_flags_are_the_config_fields(n):
    parser = _script(n).build_parser()
    cli = {f.name for f in dataclasses.fields(CONFIGS[n]) if f.metadata.get("cli", True) and not f.name.startswith("_")}
    assert {a.dest for a in _actions(parser)} == cli
    for a in _actions(parser):
        assert f"--{a.dest}" in a.option_strings


@pytest.mark.parametrize("n", [5, 6, 7])
def test_every_flag_of_the_old_parser_is_accepted_with_its_default(n):
    parser = _script(n).build_parser()
    flags = {s for a in _actions(parser) for s in a.option_strings}
    wanted = {_flag(k) for k in TODAY_DEFAULTS[n]} | {f"--{k}" for k in REQUIRED_KW[n]} | TODAY_ALIASES[n]
    assert wanted <= flags, sorted(wanted - flags)
    cfg = parse_config(CONFIGS[n], REQUIRED_ARGV[n])
    for name, today in TODAY_DEFAULTS[n].items():
        if n == 7 and name == "search_epsilon":
            continue  # required: the check of --search_epsilon rejects None
        want = CHANGED_DEFAULTS.get((n, name), today)
        assert getattr(cfg, name) == want, name
    # required flags stay required
    required = {a.option_strings[0] for a in _actions(parser) if a.required}
    assert required == {f"--{k}" for k in REQUIRED_KW[n] if k != "search_epsilon"}


@pytest.mark.parametrize("n", [5, 6, 7])
def test_hidden_flags_choices_and_help(n):
    parser = _script(n).build_parser()
    hidden = {a.option_strings[0] for a in _actions(parser) if a.help == argparse.SUPPRESS}
    assert hidden == TODAY_HIDDEN[n]
    choices = {a.option_strings[0]: set(a.choices) for a in _actions(parser) if a.choices}
    assert choices == TODAY_CHOICES[n]
    text = parser.format_help()
    for a in _actions(parser):
        if a.help != argparse.SUPPRESS:
            assert a.option_strings[0] in text
    for flag in TODAY_HIDDEN[n]:
        assert flag not in text


def test_stage7_switch_and_derived_values():
    cfg = parse_config(Stage7Config, REQUIRED_ARGV[7] + ["--no_emit_all_fit_rules", "--rule_targets", "a, b,,"])
    assert cfg.emit_all_fit_rules is False and cfg.rule_targets_list == ["a", "b"]
    assert parse_config(Stage7Config, REQUIRED_ARGV[7]).rule_targets_list is None
    cfg5 = parse_config(Stage5Config, REQUIRED_ARGV[5] + ["-c", "cc", "--no_progress", "--method", "EAP-IG"])
    assert cfg5.cache_dir == "cc" and cfg5.progress is False and cfg5.attribution_intervention == "patching"


# ---- seeds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [5, 6])
def test_random_seed_is_an_alias_of_seed(n):
    assert parse_config(CONFIGS[n], REQUIRED_ARGV[n]).seed == DEFAULT_SEED
    assert parse_config(CONFIGS[n], REQUIRED_ARGV[n] + ["--random_seed", "7"]).seed == 7
    assert parse_config(CONFIGS[n], REQUIRED_ARGV[n] + ["--seed", "8"]).seed == 8


def test_stage7_seed_and_random_seed_are_two_settings():
    """--seed: mean pool, spectral sampling, torch; --random_seed: RuleSHAP / SHAP (lib.anchoring.rules)."""
    cfg = parse_config(Stage7Config, REQUIRED_ARGV[7] + ["--random_seed", "7"])
    assert (cfg.seed, cfg.random_seed) == (DEFAULT_SEED, 7)
    cfg = parse_config(Stage7Config, REQUIRED_ARGV[7] + ["--seed", "3"])
    assert (cfg.seed, cfg.random_seed) == (3, DEFAULT_SEED)
    seed_action = next(a for a in _actions(build_parser(Stage7Config)) if a.dest == "seed")
    assert seed_action.option_strings == ["--seed"]


# ---- checks on construction ----------------------------------------------------------------

CHECKS = [
    (5, dict(method="EAP-XYZ"), "unknown --method 'EAP-XYZ'"),
    (5, dict(method="exact"), "--method exact is not implemented"),
    (5, dict(circuit_level="edge"), "--circuit_level edge is not supported"),
    (5, dict(circuit_level="layer"), "--circuit_level must be one of neuron, node, not 'layer'"),
    (5, dict(cluster_by_spectral=True), "--cluster_by_spectral is not supported"),
    (5, dict(sampling_strategy="plan"), "--sampling_strategy plan needs --sampling_plan_path"),
    (5, dict(max_ig_steps=0), "--max_ig_steps must be >= 1, got 0"),
    (5, dict(batch_size=0), "--batch_size must be >= 1, got 0"),
    (5, dict(max_pairs_per_circuit=0), "--max_pairs_per_circuit must be >= 1, got 0"),
    (5, dict(circuit_size=-1), "--circuit_size must be >= 0, got -1"),
    (5, dict(num_threads=-1), "--num_threads must be >= 0, got -1"),
    (5, dict(max_seq_len=0), "--max_seq_len must be >= 1"),
    (5, dict(spectral_dim=0), "--spectral_dim must be >= 1, got 0"),
    (5, dict(rep_hook_name=" "), "--rep_hook_name is empty"),
    (5, dict(pair_similarity_metric="nope"), "--pair_similarity_metric 'nope' is not a SciPy cdist metric"),
    (5, dict(seed="1"), "--seed must be an integer"),
    (6, dict(n_associated=0), "--n_associated and --n_unrelated must be >= 1"),
    (6, dict(n_unrelated=0), "--n_associated and --n_unrelated must be >= 1"),
    (6, dict(batch_size=0), "--batch_size must be >= 1, got 0"),
    (6, dict(points_to_use_for_mean_ablation=0), "--points_to_use_for_mean_ablation must be >= 1"),
    (6, dict(catastrophic_n_runs=0), "--catastrophic_n_runs must be >= 1"),
    (6, dict(prune_alpha=1.0), "--prune_alpha must be < 1"),
    (6, dict(sampling_strategy="plan"), "--sampling_strategy plan needs --sampling_plan_path"),
    (6, dict(cluster_by_spectral=True), "--cluster_by_spectral (spectral-cluster circuits) is not supported"),
    (6, dict(top_k_neurons=0), "--top_k_neurons must be >= 1"),
    (6, dict(last_k_layers=0), "--last_k_layers must be >= 1"),
    (6, dict(seed=1.5), "--seed must be an integer"),
    (7, dict(search_epsilon=None), "--search_epsilon is required"),
    (7, dict(input_only=True, decode_only=True), "--input_only and --decode_only are mutually exclusive"),
    (7, dict(input_only=True), "--input_only (intervening during the prefill only) is not supported"),
    (7, dict(last_pos_only=True), "--last_pos_only is supported only with --decode_only"),
    *[(7, {flag: 0}, f"--{flag} must be >= 1, got 0")
      for flag in ("batch_size", "points_to_use_for_mean_ablation", "npermutations", "n_estimators", "rule_length_cap",
                   "rule_metrics_topk", "sampling_max_points", "sampling_chunk_size", "points_per_centroid")],
    (7, dict(sampling_min_points=-1), "--sampling_min_points must be >= 0"),
    (7, dict(max_neurons=0), "--max_neurons must be >= 1"),
    (7, dict(rule_metrics_quantiles="a,b,c"), "--rule_metrics_quantiles must be three numbers, got 'a,b,c'"),
    (7, dict(rule_metrics_quantiles="0.1,0.5"), "--rule_metrics_quantiles must be three numbers in [0, 1]"),
    (7, dict(rule_metrics_quantiles="0.1,0.5,2"), "--rule_metrics_quantiles must be three numbers in [0, 1]"),
    (7, dict(stats_only=True, summarize_rule_metrics_only=True),
     "--stats_only and --summarize_rule_metrics_only are mutually exclusive"),
    (7, dict(spectral_dim=0), "--spectral_dim must be >= 1, got 0"),
    (7, dict(max_seq_len=0), "--max_seq_len must be >= 1"),
    (7, dict(rep_hook_name=""), "--rep_hook_name is empty"),
    (7, dict(seed=True), "--seed must be an integer"),
]


@pytest.mark.parametrize("n, overrides, message", CHECKS, ids=[f"{n}-{'-'.join(o)}" for n, o, _ in CHECKS])
def test_construction_checks_name_their_flag(n, overrides, message):
    with pytest.raises(UsageError) as exc:
        CONFIGS[n](**{**REQUIRED_KW[n], **overrides})
    assert message in str(exc.value)
    CONFIGS[n](**REQUIRED_KW[n])  # the defaults pass


@pytest.mark.parametrize("n, extra, flag", [(5, ["--batch_size", "0"], "--batch_size must be >= 1"),
                                            (6, ["--prune_alpha", "1"], "--prune_alpha must be < 1"),
                                            (7, ["--input_only"], "--input_only"),
                                            (6, ["--intervention", "resample"], "--intervention")])
def test_a_bad_value_through_the_script_exits_2_naming_the_flag(n, extra, flag, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / f"{SCRIPTS[n]}.py"), *REQUIRED_ARGV[n], *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert flag in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("n, extra, flag", [(5, ["--circuit_level", "edge"], "--circuit_level"),
                                            (7, ["--threshold_metric", "auc"], "--threshold_metric"),
                                            (5, ["--dtype", "int8"], "--dtype")])
def test_a_bad_choice_is_an_argparse_error(n, extra, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        _script(n).main(REQUIRED_ARGV[n] + extra)
    assert exc.value.code == 2 and flag in capsys.readouterr().err


# ---- run manifests (runs that need no model) ------------------------------------------------

def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def _scores_table(n: int = 24) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 30, n), rng.integers(0, 20, n)
    return pd.DataFrame({"prompt": [f"3+5=8\n{x}+{y}=" for x, y in zip(a, b)], "raw_output": [f"{x + y}\n" for x, y in zip(a, b)],
                         "is_correct": np.arange(n) % 3 != 0, "op1_small": (a < 10).astype(float),
                         "is_test": np.arange(n) % 6 == 5})


def test_stage5_records_its_run(tmp_path):
    """Only a linear component: every job is skipped before the model is needed."""
    (tmp_path / "features").mkdir()
    _scores_table().to_csv(tmp_path / "features" / "scores.csv", index=False)
    (tmp_path / "rules").mkdir()
    pd.DataFrame({"rule_id": [0], "rule": ["op1_small >= 0.5"], "component_type": ["linear"],
                  "coefficient_sign": ["positive"]}).to_csv(tmp_path / "rules" / "optimal_rule_set_is_correct.csv",
                                                            index=False)
    out = tmp_path / "out"
    argv = ["--rules_dir", str(tmp_path / "rules"), "--rules_glob", "optimal_rule_set", "--features_scores_dir",
            str(tmp_path / "features"), "--output_data_dir", str(out), "--random_seed", "5", "--device", "cpu"]
    assert _script(5).main(argv) == 0
    entry = _manifest(out)["stages"]["stage5"]
    assert entry["seed"] == 5 and entry["config"]["seed"] == 5 and entry["device"] == "cpu"
    assert entry["config"]["rules_glob"] == "optimal_rule_set" and entry["config"]["circuit_level"] == "node"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in manifest] == ["skipped_linear"]
    assert _script(5).main(argv) == 0  # rerun: the job manifest is rewritten, the run manifest updated
    assert set(_manifest(out)["stages"]) == {"stage5"}


def test_stage6_records_its_run_in_the_regime_folders(tmp_path):
    """A circuit without units is skipped before the model is needed."""
    scores = tmp_path / "scores.csv"
    _scores_table().to_csv(scores, index=False)
    disc = tmp_path / "disc"
    disc.mkdir()
    entry = {"status": "ok", "circuit_id": 0, "circuit_label": "op1_small >= 0.5", "target": "is_correct",
             "coefficient_sign": "positive", "sampling_strategy": "random",
             "metadata_topn": {"level": "neuron", "neurons": {}, "d_model": 576}}
    (disc / "manifest.json").write_text(json.dumps([entry]))
    (disc / "dataset_info.json").write_text(json.dumps({"scores_path": str(scores), "prompt_col": "prompt",
                                                        "target_col": "is_correct", "ai_model": "unused"}))
    out = tmp_path / "bag"
    assert _script(6).main(["--input_data_dir", str(disc), "--output_data_dir", str(out), "--seed", "3"]) == 0
    for folder in (out, out / "positive_baseline", out / "negative_baseline"):
        assert _manifest(folder)["stages"]["stage6"]["seed"] == 3, folder
    assert not (disc / MANIFEST_NAME).exists()
    from lib.anchoring.flip_stats import discovery_original_rows
    from lib.anchoring.units import load_candidate_units

    assert discovery_original_rows(out) == set()  # per-circuit JSONs only, never the run manifest
    assert load_candidate_units(out, 0.2) == []
    out1 = tmp_path / "bag1"
    assert _script(6).main(["--input_data_dir", str(disc), "--output_data_dir", str(out1),
                            "--baseline_subset", "negative"]) == 0
    assert _manifest(out1)["stages"]["stage6"]["config"]["baseline_subset"] == "negative"
    assert not (out1 / "negative_baseline").exists()


def test_stage7_records_its_run_in_the_stats_and_rules_folders(tmp_path):
    """--stats_only over an existing stats/<run>/scores.csv needs no model."""
    from lib.runs.discovery import find_run_dirs
    from tests.pipeline.test_stage7_anchoring import write_buckets

    bag = write_buckets(tmp_path / "bag")
    feats = tmp_path / "fr"
    feats.mkdir()
    df = _scores_table()
    df.to_csv(feats / "scores.csv", index=False)
    (feats / "features.json").write_text(json.dumps([{"label": "op1 small"}]))
    rules = tmp_path / "rules"
    stats = rules / "stats" / "run_a"
    stats.mkdir(parents=True)
    frame = df.assign(_evaluated=True)
    for u in ("m29_100", "m28_5", "m10_33"):
        flips = np.arange(len(df)) % 4 == 0
        frame[f"flip_{u}"], frame[f"flip_c2i_{u}"], frame[f"flip_i2c_{u}"] = flips, flips, False
    frame.to_csv(stats / "scores.csv", index=False)
    argv = ["--circuit_agonists_path", str(bag), "--features_scores_dir", str(feats), "--search_epsilon", "0.2",
            "--rules_dir", str(rules), "--stats_dirname", "run_a", "--stats_only", "--random_seed", "9"]
    assert _script(7).main(argv) == 0
    for folder in (stats, rules):
        entry = _manifest(folder)["stages"]["stage7"]
        assert entry["seed"] == DEFAULT_SEED and entry["config"]["random_seed"] == 9, folder
    assert json.loads((stats / "flip_stats_global.json").read_text())["n_neurons"] == 3
    assert find_run_dirs(rules / "stats") == [stats]
