#!/usr/bin/env python3
"""Stage 7: neuron-anchored rules. Every τ-agonist of the stage-6 `neuron_buckets.json` files is
ablated alone on the evaluation rows (batched engine, many units per forward pass); its flip
columns (any, correct→incorrect, incorrect→correct) are explained by rules over the prompt
features with stage 3's RuleSHAP + OR-combo.

Scopes: TEST = combo selected on TRAIN rows only and scored on `is_test` rows only (held out,
`rule_combo_<t>.csv`); ALL-FIT = a descriptive fit selected and scored on all evaluated rows
(`rule_combo_all_fit_<t>.csv`). A unit is HQ when its best rule reaches --rule_quality_threshold
(MCC by default) with dataset coverage ≥ --min_rule_dataset_coverage.

Outputs: `<rules_dir>/stats/<stats_dirname>/` (scores.csv with flip columns, flip_stats_*,
rule_combo_metrics_*, rule_metrics_*, high_quality_neuron_flip_coverage*), raw rule files in
`<rules_dir>/<policy_tag>/<layer>_<id>/`, caches keyed by prompt content and settings. Use
`python -m lib.runs.layout run_mode ...` for the pipeline's --stats_dirname.
"""

from __future__ import annotations

import argparse
import sys

from lib.pipeline.cli import UsageError, run_main
from lib.ablation.interventions import INTERVENTIONS

_METRICS = ("balanced_accuracy", "mcc", "tpr", "tnr", "f1")


def build_parser() -> argparse.ArgumentParser:
    from lib.models.loading import add_model_arguments
    from lib.sampling.spectral import add_spectral_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--circuit_agonists_path", required=True,
                   help="stage-6 output folder (scanned recursively for neuron_buckets.json) or a .zip of it")
    p.add_argument("--features_scores_dir", required=True, help="folder with stage 2's scores.csv and features.json")
    core = p.add_argument_group("core")
    core.add_argument("--search_epsilon", type=float, default=None,
                      help="τ: keep agonists whose stage-6 max_effect reaches τ (required; the pipeline uses 0.2)")
    core.add_argument("--ai_model", default=None, help="analysed model (default: ai_model of dataset_info.json)")
    core.add_argument("--ai_model_cache_dir", default=None, help="Hugging Face cache folder")
    core.add_argument("--stats_dirname", default=None, help="run mode: outputs go to <rules_dir>/stats/<stats_dirname>/")
    core.add_argument("--task_module", default="lib.tasks.arithmetic_task", help="module exporting TASK_SPEC")
    core.add_argument("--seed", type=int, default=42, help="global seed (mean pool, spectral sampling)")
    core.add_argument("--batch_size", type=int, default=16, help="rows (unit × prompt generations) per forward pass")
    core.add_argument("--neuron_batch_size", type=int, default=4,
                      help="units evaluated together: each pass holds this many units × batch_size/this prompts "
                           "(≤1 = one unit at a time)")
    core.add_argument("--no_tqdm_batches", action="store_true", help="no progress bars")
    core.add_argument("--max_neurons", type=int, default=None, help="keep only the first N units (layer, id descending)")
    iv = p.add_argument_group("intervention")
    iv.add_argument("--intervention", choices=INTERVENTIONS, default="zero", help="replacement of the ablated unit")
    iv.add_argument("--points_to_use_for_mean_ablation", type=int, default=256, help="TRAIN prompts for mean values")
    iv.add_argument("--last_pos_only", action="store_true",
                    help="intervene only from the last prompt position on (what --decode_only does here)")
    iv.add_argument("--decode_only", action="store_true",
                    help="prefill the prompt unhooked once; intervene on the last prompt position and every decode step")
    iv.add_argument("--input_only", action="store_true", help="not supported (hooks during the prefill only)")
    iv.add_argument("--semantic_quality_policy", choices=("none", "filter"), default="filter",
                    help="drop semantic-wrong rows before rule fitting (no task here has semantic columns)")
    iv.add_argument("--no_rescore_cached_answers", action="store_true",
                    help="accepted; cached answers are always rescored with the task (cheap)")
    iv.add_argument("--recompute_missing_semantic_cache", action="store_true", help="accepted; no semantic evaluator")
    md = p.add_argument_group("modes")
    md.add_argument("--stats_only", action="store_true", help="reload stats/<run>/scores.csv and redo the statistics")
    md.add_argument("--summarize_rule_metrics_only", action="store_true",
                    help="only the rule-metric summaries and HQ coverage from existing rule files")
    md.add_argument("--skip_agonist_metric_stats", action="store_true", help="accepted (diagnostics not computed)")
    md.add_argument("--agonist_metric_topk", type=int, default=30, help="accepted (diagnostics not computed)")
    md.add_argument("--exclude_discovery_rows_from_final_stats", action="store_true",
                    help="drop stage-6 discovery rows from the flip statistics")
    rs = p.add_argument_group("row sampling")
    rs.add_argument("--use_spectral_sampling", action="store_true", help="evaluate a spectral sample of the rows")
    rs.add_argument("--global_n_clusters", type=int, default=-1, help=">0: k-center branch with this many clusters")
    rs.add_argument("--keep_unsampled_rows", action="store_true", help="keep unsampled rows (flip columns NA)")
    add_spectral_arguments(rs)
    rs.add_argument("--coverage_radius", type=float, default=0.5, help="greedy-cover radius")
    rs.add_argument("--sampling_max_points", type=int, default=512, help="rows to evaluate at most")
    rs.add_argument("--sampling_min_points", type=int, default=64, help="rows to evaluate at least")
    rs.add_argument("--sampling_chunk_size", type=int, default=8192, help="rows per nearest-center chunk")
    rs.add_argument("--points_per_centroid", type=int, default=1, help="greedy cover: rows per center")
    rs.add_argument("--centroid_sampling_mode", choices=("random", "nearest"), default="random")
    rx = p.add_argument_group("rule extraction")
    rx.add_argument("--extract_rules", action="store_true", help="fit rules to every unit's flip columns")
    rx.add_argument("--rules_dir", default="xai_analyses_results", help="output root (pipeline: .../neuron_flip_rules)")
    rx.add_argument("--rule_targets", default=None, help="comma list of exact flip columns to fit")
    rx.add_argument("--random_seed", type=int, default=42, help="RuleSHAP / SHAP seed")
    rx.add_argument("--fast_shap_estimate", action="store_true", help="accepted: SHAP always uses the permutation estimator")
    rx.add_argument("--npermutations", type=int, default=5, help="SHAP antithetic orderings per row")
    rx.add_argument("--n_estimators", type=int, default=500, help="trees of the rule ensemble (stage 3's hidden flag)")
    rx.add_argument("--only_unique_datapoints_in_shap", action="store_true")
    rx.add_argument("--epsilon", type=float, default=0.1, help="SHAP background = feature minimum − epsilon")
    rx.add_argument("--use_shap_in_xgb", action="store_true", help="SHAP-weighted column sampling in XGBoost")
    rx.add_argument("--use_shap_in_lasso", action="store_true", help="accepted; stage 7 never filters rules with LASSO")
    rx.add_argument("--only_unique_datapoints_in_rule_extraction", action="store_true")
    rx.add_argument("--no_emit_all_fit_rules", dest="emit_all_fit_rules", action="store_false",
                    help="skip the descriptive ALL-FIT scope")
    rx.add_argument("--force_all_fit_recompute", action="store_true")
    sm = p.add_argument_group("summaries")
    sm.add_argument("--summarize_rule_metrics", action="store_true", help="write rule-metric summaries and HQ coverage")
    sm.add_argument("--rule_metrics_quantiles", default="0.1,0.5,0.9")
    sm.add_argument("--rule_length_cap", type=int, default=30)
    sm.add_argument("--rule_metrics_topk", type=int, default=50)
    sm.add_argument("--threshold_metric", choices=_METRICS, default="mcc")
    sm.add_argument("--rule_quality_metric", choices=_METRICS, default=None, help="default: --threshold_metric")
    sm.add_argument("--rule_quality_threshold", type=float, default=0.70, help="HQ threshold, TEST scopes")
    sm.add_argument("--rule_quality_threshold_all_fit", type=float, default=0.70, help="HQ threshold, ALL-FIT")
    sm.add_argument("--min_rule_dataset_coverage", type=float, default=0.005, help="coverage floor (≤0 disables)")
    add_model_arguments(p)
    return p


def validate(args: argparse.Namespace) -> None:
    """Flag checks that need no files."""
    from lib.sampling.spectral import check_spectral_arguments

    if args.search_epsilon is None:
        raise UsageError("--search_epsilon is required (τ of stage 6; the pipeline passes 0.2)")
    if args.input_only and args.decode_only:
        raise UsageError("--input_only and --decode_only are mutually exclusive")
    if args.input_only:
        raise UsageError("--input_only (intervening during the prefill only) is not supported by the batched engine")
    if args.last_pos_only and not args.decode_only:
        raise UsageError("--last_pos_only is supported only with --decode_only (which intervenes from the last "
                         "prompt position on)")
    for flag in ("batch_size", "points_to_use_for_mean_ablation", "npermutations", "n_estimators", "rule_length_cap",
                 "rule_metrics_topk", "sampling_max_points", "sampling_chunk_size", "points_per_centroid"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.sampling_min_points < 0:
        raise UsageError("--sampling_min_points must be >= 0")
    if args.max_neurons is not None and args.max_neurons < 1:
        raise UsageError("--max_neurons must be >= 1")
    try:
        qs = [float(x) for x in args.rule_metrics_quantiles.split(",")]
    except ValueError:
        raise UsageError(f"--rule_metrics_quantiles must be three numbers, got '{args.rule_metrics_quantiles}'") from None
    if len(qs) != 3 or not all(0 <= q <= 1 for q in qs):
        raise UsageError("--rule_metrics_quantiles must be three numbers in [0, 1]")
    if args.stats_only and args.summarize_rule_metrics_only:
        raise UsageError("--stats_only and --summarize_rule_metrics_only are mutually exclusive")
    check_spectral_arguments(args)
    args.rule_targets_list = [t.strip() for t in args.rule_targets.split(",") if t.strip()] if args.rule_targets else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    from lib.core.files_and_cache import set_deterministic
    from lib.pipeline.stage7_anchoring import run_stage7

    set_deterministic(args.seed)
    res = run_stage7(args)
    msg = f"[stage7] {res['n_units']} unit(s) in {res['seconds']} s; outputs in {res['stats_dir']}"
    if "n_hq_test" in res:
        msg += (f"\n[stage7] {res['n_rule_bearing']} rule-bearing unit(s); {res['n_hq_test']} unit(s) with an HQ(TEST) "
                f"rule (held out: selected on TRAIN, scored on is_test rows); {res['n_hq_all_fit']} with an "
                f"HQ(ALL-FIT) rule (descriptive)")
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
