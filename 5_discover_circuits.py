#!/usr/bin/env python3
"""Stage 5: rank MLP units per rule with neuron-level EAP / EAP-IG-inputs and write circuits for stage 6.

For every rule of `<rules_dir>/<rules_glob>_<target>.csv` (primary target), clean prompts are rows
the rule covers and corrupted prompts are paired rows it does not cover (stage-4 plan with
`--sampling_strategy plan`, else length-matched nearest neighbours). Each text is prompt + the
analysed model's answer (`raw_output`). Units are the coordinates of `blocks.{L}.hook_mlp_out`
(`m{L}:{id}`); scores, the top `--circuit_size` units and a faithfulness evaluation are written to
`<output_data_dir>/<target>/rule_<id>_<slug>/{scores.json, eval.json}` plus `manifest.json`.

Attribution metric (`--attribution_metric`): `answer_logprob` (default) = mean log-probability of
the clean answer tokens, whose gradient is non-zero at the clean input, so EAP works; `kl` = the
original's span KL to the clean logits (`--temporal_agg`), whose clean-point gradient is zero.
EAP-IG integrates at midpoints α = (k − 0.5)/m, m = `--max_ig_steps`.

Random pairing (`--sampling_strategy random`) matches each covered row with the nearest uncovered
row of equal prompt length by TF-IDF bag-of-token similarity (`--pair_similarity_metric`); the
original's MiniLM sentence embedder needs the model hub.

Accepted but unused: `--max_answer_tokens`, `--stop_regex` (as in the original), the spectral flags
except `--max_seq_len` (which caps text length), `--global_n_clusters`, `--cluster_base_subset`;
`--mlp_neurons_only` is implied (only MLP units are scored). Not supported, with an error: `--cluster_by_spectral`, `--circuit_level edge`, methods
other than EAP, EAP-IG(-inputs). A failing rule is recorded as status `error` (error.json) and the
stage exits 1 at the end unless `--keep_going`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lib.pipeline.cli import UsageError, run_main
from lib.pipeline.stage5_circuits import LEVELS, SAMPLING_STRATEGIES, Stage5Config, run_stage5
from lib.models.loading import add_model_arguments
from lib.attribution.eap import DECODE_MODES, INTERVENTIONS, METRICS, TEMPORAL_AGGS, canonical_method
from lib.sampling.spectral import add_spectral_arguments, check_pair_metric, check_spectral_arguments

log = logging.getLogger("5_discover_circuits")


def build_parser() -> argparse.ArgumentParser:
    """Flags of spec §3.1 (same names and defaults) plus --attribution_metric, --keep_going, --device, --dtype."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules_dir", required=True, help="folder with the stage-3 rule files")
    p.add_argument("--rules_glob", default="association_rules_*.csv",
                   help="rule-file prefix: <prefix>_<target>.csv (the pipeline passes optimal_rule_set)")
    p.add_argument("--fake_targets", action="store_true", help="use the <target>_fake rule file")
    p.add_argument("--features_scores_dir", required=True, help="folder with stage 2's scores.csv")
    p.add_argument("--max_answer_tokens", type=int, default=16, help="accepted, unused (as in the original)")
    p.add_argument("--stop_regex", default=r"\n{2,}|</s>|<\|endoftext\|>", help="accepted, unused (as in the original)")
    p.add_argument("--intervention", choices=INTERVENTIONS, default="zero",
                   help="attribution intervention for EAP (EAP-IG methods always use patching)")
    p.add_argument("--eval_intervention", choices=INTERVENTIONS, default="mean-positional",
                   help="value given to non-circuit units in the faithfulness evaluation")
    p.add_argument("--absolute_value_attributions", action="store_true", help="rank units by |score|")
    p.add_argument("--include_zero_scores", action="store_true", help="exact-zero scores may be selected")
    p.add_argument("--mlp_neurons_only", action="store_true",
                   help="keep MLP units only (always the case here: attention units are not scored)")
    p.add_argument("--ai_model", default="Qwen/Qwen2-7B-Instruct", help="analysed model (hub id, folder, .gguf, alias)")
    p.add_argument("--ai_model_cache_dir", default=None, help="model cache folder")
    p.add_argument("--cache_dir", "-c", default="./cache", help="folder for the mean-activation cache")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--max_n_of_rules_to_analyze", type=int, default=-1, help="<=0: all rules, else the first N")
    p.add_argument("--temporal_agg", choices=TEMPORAL_AGGS, default="mean",
                   help="aggregation of answer-span logits for the KL metric and the faithfulness NL")
    p.add_argument("--decode_only", action="store_true", help="intervene only at answer-predicting positions")
    p.add_argument("--decode_mode", choices=DECODE_MODES, default="after_prompt",
                   help="answer positions (auto/span/after_prompt coincide here; all = every real token)")
    p.add_argument("--method", default="EAP", help="EAP, EAP-IG-inputs, or EAP-IG (alias of EAP-IG-inputs)")
    p.add_argument("--max_ig_steps", type=int, default=3, help="EAP-IG interpolation steps m")
    p.add_argument("--circuit_size", type=int, default=20, help="top-M units (or nodes) kept")
    p.add_argument("--circuit_level", default="node", help="neuron (hook_mlp_out coordinates) or node (MLP layers)")
    p.add_argument("--max_pairs_per_circuit", type=int, default=512, help="pairs per rule (random strategy)")
    p.add_argument("--pair_similarity_metric", default="cosine", help="random pairing distance (cosine, euclidean, SciPy)")
    p.add_argument("--points_to_use_for_mean_ablation", type=int, default=512, help="reference texts for mean values")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per forward/backward batch")
    p.add_argument("--sampling_strategy", choices=SAMPLING_STRATEGIES, default="random", help="pair source")
    p.add_argument("--sampling_plan_path", default=None, help="stage-4 plan (required with --sampling_strategy plan)")
    p.add_argument("--cluster_by_spectral", action="store_true", help="not supported (use a stage-4 plan)")
    p.add_argument("--cluster_base_subset", choices=["positive", "negative", "all"], default="all",
                   help="cluster mode only (not supported); recorded in dataset_info.json")
    add_spectral_arguments(p)
    p.add_argument("--global_n_clusters", type=int, default=32, help="cluster mode only (not supported)")
    p.add_argument("--output_data_dir", default="neural_circuit_discovery_results", help="output root")
    p.add_argument("--task_module", default="lib.tasks.arithmetic_task", help="module exporting TASK_SPEC")
    p.add_argument("--attribution_metric", choices=METRICS, default="answer_logprob",
                   help="answer_logprob (non-zero gradient at the clean input) or kl (the original's span KL)")
    p.add_argument("--keep_going", action="store_true", help="exit 0 even when some rule jobs failed")
    p.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    add_model_arguments(p)
    return p


def validate(args: argparse.Namespace) -> None:
    """Reject flag values that cannot work, naming the flag."""
    try:
        method = canonical_method(args.method)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.circuit_level == "edge":
        raise UsageError("--circuit_level edge is not supported: use neuron (hook_mlp_out coordinates) or node")
    if args.circuit_level not in LEVELS:
        raise UsageError(f"--circuit_level must be one of {', '.join(LEVELS)}, not '{args.circuit_level}'")
    if args.cluster_by_spectral:
        raise UsageError("--cluster_by_spectral is not supported; build a stage-4 plan and pass "
                         "--sampling_strategy plan --sampling_plan_path …")
    if args.sampling_strategy == "plan" and not args.sampling_plan_path:
        raise UsageError("--sampling_strategy plan needs --sampling_plan_path")
    for flag in ("max_ig_steps", "batch_size", "max_pairs_per_circuit"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.circuit_size < 0:
        raise UsageError(f"--circuit_size must be >= 0, got {args.circuit_size}")
    if args.num_threads < 0:
        raise UsageError(f"--num_threads must be >= 0, got {args.num_threads}")
    check_spectral_arguments(args)
    check_pair_metric(args.pair_similarity_metric)
    if "EAP-IG" in method and args.intervention != "patching":
        log.info("--method %s interpolates inputs: attribution uses patching (not --intervention %s)",
                 method, args.intervention)


def config_from_args(args: argparse.Namespace) -> Stage5Config:
    """Stage5Config of the parsed flags."""
    fields = Stage5Config.__dataclass_fields__
    cfg = Stage5Config(**{k: getattr(args, k) for k in fields if hasattr(args, k)})
    cfg.progress = not args.no_progress
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    return run_stage5(config_from_args(args))


if __name__ == "__main__":
    sys.exit(run_main(main))
