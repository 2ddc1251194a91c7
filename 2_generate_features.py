#!/usr/bin/env python3
"""Stage 2: describe every stage-1 prompt with interpretable features.

Seed features of the task plus features proposed by a feature LLM (as small Python functions,
run in a sandbox) are scored on every prompt, filtered on TRAIN rows, and written as
`scores.csv`, `features.json` and `feature_report.md` in `--features_scores_dir`.
"""

from __future__ import annotations

import argparse
import sys

from lib.pipeline.cli import UsageError, run_main

DEFAULT_FEATURE_LLM = "local:smollm2-135m-instruct-q4_1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts_answers_pkl_file", "-i", required=True, help="stage-1 pickle")
    p.add_argument("--features_scores_dir", "--out_dir", "-o", default="feature_report", help="output folder")
    p.add_argument("--cache_dir", "-c", default="./cache", help="folder of the feature-LLM call cache")
    p.add_argument("--ai_model", "-m", default=DEFAULT_FEATURE_LLM,
                   help="feature LLM: ollama:NAME, openai:NAME, groq:NAME, local:ALIAS, or a bare name routed "
                        f"as in the original (default: {DEFAULT_FEATURE_LLM}, runs offline)")
    p.add_argument("--temperature", "-T", type=float, default=0.3, help="sampling temperature")
    p.add_argument("--max_tokens", type=int, default=0,
                   help="reply length limit of the feature LLM (0 = backend default; local: 512)")
    p.add_argument("--n_features", "-n", type=int, default=16, help="features requested per round")
    p.add_argument("--feature_extraction_steps", "--rounds", "-R", type=int, default=10,
                   help="rounds that must each yield at least one valid feature")
    p.add_argument("--max_proposal_attempts", type=int, default=0,
                   help="upper bound on proposal rounds (0 = 3 x --feature_extraction_steps)")
    p.add_argument("--num_correct_example_prompts", type=int, default=32, help="positive prompts shown per round")
    p.add_argument("--num_incorrect_example_prompts", type=int, default=32, help="negative prompts shown per round")
    p.add_argument("--no_llm_feature_generation", "--no_llm", action="store_true", help="seed features only")
    p.add_argument("--number_of_existing_features_to_show_for_diversity", type=int, default=20,
                   help="earlier LLM features listed as 'do not repeat'")
    p.add_argument("--drop_low_predictive_power_features", "--filter_by_metrics", action="store_true")
    p.add_argument("--drop_near_duplicate_features", "--drop_near_dups", action="store_true")
    p.add_argument("--near_duplicate_features_threshold", "--dup_corr_thresh", type=float, default=0.9999)
    p.add_argument("--drop_high_mad_variance_features", "--drop_high_mad", action="store_true")
    p.add_argument("--train_ratio", "-t", type=float, default=1.0,
                   help="share of TRAIN rows used by the predictive-power filter (0 or 1 = all)")
    p.add_argument("--min_auc", type=float, default=0.0, help="active only if > 0")
    p.add_argument("--min_delta", type=float, default=0.2, help="active only if > 0")
    p.add_argument("--min_ap_above_base", type=float, default=0.0, help="active if > -1")
    p.add_argument("--z_thresh", type=float, default=10.0, help="MAD robust-z cut")
    p.add_argument("--max_number_of_prompts_to_analyze", "--max_prompts", type=int, default=0,
                   help="seeded random subset of rows (0 = all)")
    p.add_argument("--feature_timeout", type=float, default=10.0,
                   help="CPU seconds a feature may use per 5,000 rows (wall clock: twice that)")
    p.add_argument("--sanity_rows", type=int, default=10, help="rows every proposed feature must run on")
    p.add_argument("--seed", type=int, default=42, help="global seed")
    p.add_argument("--task_module", default="lib.tasks.arithmetic_task", help="module exporting TASK_SPEC")
    return p


def main(argv: list[str] | None = None) -> int:
    from lib.pipeline.stage2_features import run_stage2
    from lib.tasks.base import load_task

    args = build_parser().parse_args(argv)
    for flag in ("n_features", "feature_extraction_steps", "num_correct_example_prompts",
                 "num_incorrect_example_prompts"):
        if getattr(args, flag) < 1 and not args.no_llm_feature_generation:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_number_of_prompts_to_analyze", "max_proposal_attempts",
                 "number_of_existing_features_to_show_for_diversity"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not 0 <= args.train_ratio <= 1:
        raise UsageError(f"--train_ratio must be in [0, 1], got {args.train_ratio}")
    if not 0 < args.near_duplicate_features_threshold <= 1:
        raise UsageError("--near_duplicate_features_threshold must be in (0, 1]")
    if args.feature_timeout <= 0:
        raise UsageError("--feature_timeout must be > 0")
    task = load_task(args.task_module)
    run_stage2(task, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
