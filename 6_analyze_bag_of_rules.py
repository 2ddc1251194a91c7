#!/usr/bin/env python3
"""Stage 6: Contrastive Hierarchical Ablation (CHA) of every circuit of a stage-5 manifest.

For each rule circuit, prompts the rule covers (associated) and prompts it does not (unrelated)
are sampled from the regime's TRAIN rows; the model's baseline answers are checked; then groups
of candidate `hook_mlp_out` units are ablated on the batched engine: a group whose flip-rate
upper bound (Clopper–Pearson, α/2 per slice) on either slice reaches τ = --search_epsilon is
split, down to single units (agonists). Without --fast_ablation every unit is ablated alone (the
exhaustive reference). Outputs per circuit `<target>/rule_XXXX.json`, and `rule_knockout.json`,
`neuron_buckets.json`, `neuron_bucket_stats.json`, `cost_summary.json`.
"""

from __future__ import annotations

import argparse
import sys

from lib.pipeline.cli import UsageError, run_main
from lib.ablation.interventions import INTERVENTIONS


def build_parser() -> argparse.ArgumentParser:
    from lib.models.loading import add_model_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_data_dir", required=True, help="stage-5 folder holding manifest.json (and dataset_info.json)")
    p.add_argument("--output_data_dir", required=True, help="output root")
    p.add_argument("--scores_path", default=None, help="scores table (default: dataset_info.json's scores_path)")
    p.add_argument("--ai_model", default=None, help="analysed model (default: dataset_info.json's ai_model)")
    p.add_argument("--ai_model_cache_dir", default=None, help="Hugging Face cache folder")
    p.add_argument("--seed", type=int, default=42, help="seed of every random choice")
    p.add_argument("--search_epsilon", type=float, default=0.2,
                   help="τ: a group is split, and a single unit is an agonist, when its flip-rate UCB reaches τ "
                        "(≤0: always split)")
    p.add_argument("--prune_alpha", type=float, default=0.05,
                   help="error budget per node; each slice's one-sided Clopper–Pearson bound uses α/2 (≤0: no pruning)")
    p.add_argument("--catastrophic_acc_tol", type=float, default=1e-12, help="tolerance for an accuracy of 0 (or 1)")
    p.add_argument("--catastrophic_n_runs", type=int, default=3,
                   help="trials that decide whether a catastrophic unit is confirmed")
    p.add_argument("--n_associated", type=int, default=100, help="associated prompts per circuit")
    p.add_argument("--n_unrelated", type=int, default=100, help="unrelated prompts per circuit")
    p.add_argument("--decode_only", action="store_true",
                   help="intervene only where answer tokens are produced (last prompt position and every decode "
                        "step); the prompt's KV cache is computed once and shared by every group test")
    p.add_argument("--intervention", choices=INTERVENTIONS, default="zero", help="replacement of ablated units")
    p.add_argument("--points_to_use_for_mean_ablation", type=int, default=256,
                   help="TRAIN prompts used to estimate mean replacement values")
    p.add_argument("--top_k_neurons", type=int, default=None, help="keep the K units with the largest |score| per circuit")
    p.add_argument("--last_k_layers", type=int, default=None, help="keep only units of the last K MLP layers")
    p.add_argument("--mlp_neurons_only", action="store_true",
                   help="drop non-MLP units (always the case here: only hook_mlp_out units are ablated)")
    p.add_argument("--batch_size", type=int, default=16, help="rows (group × prompt generations) per forward pass")
    p.add_argument("--fast_ablation", action="store_true", help="run CHA; without it every unit is ablated alone")
    p.add_argument("--sign_split_first", action="store_true",
                   help="CHA: split each layer's root by the sign of the stage-5 score")
    p.add_argument("--baseline_subset", choices=["all", "positive", "negative"], default="all",
                   help="regime; 'all' runs positive and negative into <out>/{positive,negative}_baseline")
    p.add_argument("--sampling_strategy", choices=["random", "plan"], default="random",
                   help="random: rule-covered vs other rows; plan: the stage-4 plan's lists")
    p.add_argument("--sampling_plan_path", default=None, help="stage-4 plan (required with --sampling_strategy plan)")
    p.add_argument("--exclude_known_agonists", action="store_true",
                   help="the original's behaviour: units found in an earlier circuit are not searched again "
                        "(results then depend on circuit order)")
    p.add_argument("--cluster_by_spectral", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--global_n_clusters", type=int, default=32, help=argparse.SUPPRESS)
    for flag, kw in (("--spectral_space", dict(default="hidden")), ("--rep_hook_name", dict(default="ln_final.hook_normalized")),
                     ("--rep_pooling", dict(default="mean")), ("--max_seq_len", dict(type=int, default=None)),
                     ("--spectral_dim", dict(type=int, default=16)), ("--spectral_cache_dir", dict(default=None))):
        p.add_argument(flag, help=argparse.SUPPRESS, **kw)
    for name in ("activation", "margin", "saliency"):
        p.add_argument(f"--skip_agonist_{name}_stats", action="store_true",
                       help="accepted for compatibility; the diagnostic suites are not computed (docs/DEVIATIONS.md)")
    p.add_argument("--agonist_saliency_metrics", default="wanda,gradient,activation_x_gradient",
                   help="accepted for compatibility (see --skip_agonist_saliency_stats)")
    p.add_argument("--task_module", default="lib.tasks.arithmetic_task", help="module exporting TASK_SPEC")
    add_model_arguments(p)
    return p


def validate(args: argparse.Namespace) -> None:
    """Flag checks that need no files."""
    if args.n_associated < 1 or args.n_unrelated < 1:
        raise UsageError("--n_associated and --n_unrelated must be >= 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.points_to_use_for_mean_ablation < 1:
        raise UsageError("--points_to_use_for_mean_ablation must be >= 1")
    if args.catastrophic_n_runs < 1:
        raise UsageError("--catastrophic_n_runs must be >= 1")
    if not args.prune_alpha < 1:
        raise UsageError("--prune_alpha must be < 1")
    if args.sampling_strategy == "plan" and not args.sampling_plan_path:
        raise UsageError("--sampling_strategy plan needs --sampling_plan_path")
    if args.cluster_by_spectral:
        raise UsageError("--cluster_by_spectral (spectral-cluster circuits) is not supported; "
                         "analyse rule circuits (docs/DEVIATIONS.md, stage 6)")
    for flag in ("top_k_neurons", "last_k_layers"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UsageError(f"--{flag} must be >= 1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    from lib.core.files_and_cache import set_deterministic
    from lib.pipeline.stage6_cha import run_stage6

    set_deterministic(args.seed)
    for total in run_stage6(args):
        print(f"[{total['regime']}] {total['n_ok']}/{total['n_circuits']} circuits analysed; "
              f"{total['n_evaluations']} group tests for {total['n_candidates']} candidate units "
              f"({total['evaluations_over_exhaustive']} of exhaustive); {total['unique_agonists']} agonist unit(s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
