#!/usr/bin/env python3
"""Stage 3: extract behavioural rules (RuleSHAP-style) from stage 2's features.

Reads `scores.csv` and `features.json` from `--features_scores_dir`; for every target of the task
spec fits a tree ensemble on the TRAIN rows (`is_test` false), turns its leaf paths into rule
literals (`association_rules_<t>.csv`), selects an OR-combination on TRAIN
(`rule_combo_train_<t>.csv`, `optimal_rule_set_<t>.csv`) and scores it frozen on the held-out
`is_test` rows (`rule_combo_<t>.csv`, `score_scope=test`). Descriptive extras:
`rule_combo_test_selected_<t>.csv` (re-selected on test rows) and the ALL-FIT family
(`*_all_fit_<t>.csv`, refit on all rows). Without an `is_test` column every row is train and no
held-out scope exists (a warning says so).

Hidden flag (for tests and quick runs): `--n_estimators N` (default 500) sets the number of trees.
"""

from __future__ import annotations

import argparse
import sys

from lib.rules.combos import DEFAULT_MIN_MCC_GAIN
from lib.pipeline.cli import UsageError, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features_scores_dir", required=True, help="folder holding scores.csv and features.json")
    p.add_argument("--rules_dir", default="xai_analyses_results", help="output folder")
    p.add_argument("--random_seed", type=int, default=42, help="global seed")
    p.add_argument("--fake_targets", action="store_true",
                   help="incorrect-rules control: explain random <t>_fake targets instead")
    p.add_argument("--fake_target_max_abs_corr", type=float, default=0.05,
                   help="accept a fake target once |Pearson r| with the real one is <= this")
    p.add_argument("--fake_target_max_tries", type=int, default=500, help="resampling attempts per target")
    p.add_argument("--fast_shap_estimate", action="store_true", help="force the permutation SHAP estimator")
    p.add_argument("--npermutations", type=int, default=10, help="antithetic feature orderings per row in the SHAP permutation estimator")
    p.add_argument("--only_unique_datapoints_in_shap", action="store_true",
                   help="deduplicate (features, target) rows before SHAP")
    p.add_argument("--epsilon", type=float, default=0.1, help="SHAP background = per-feature minimum - epsilon")
    p.add_argument("--use_shap_in_xgb", action="store_true", help="SHAP-weighted column sampling in the trees")
    p.add_argument("--use_shap_in_lasso", action="store_true", help="SHAP-weighted Lasso over the rules")
    p.add_argument("--only_unique_datapoints_in_rule_extraction", action="store_true",
                   help="deduplicate (features, target) rows before tree fitting and selection")
    p.add_argument("--task_module", default="lib.tasks.arithmetic_task", help="module exporting TASK_SPEC")
    p.add_argument("--min_combo_mcc_gain", type=float, default=DEFAULT_MIN_MCC_GAIN,
                   help="the greedy OR-combo stops when adding a literal raises MCC by this much or less "
                        "(0 = the original's rule)")
    p.add_argument("--n_estimators", type=int, default=500, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.npermutations < 1:
        raise UsageError(f"--npermutations must be >= 1, got {args.npermutations}")
    if args.fake_target_max_tries < 1:
        raise UsageError(f"--fake_target_max_tries must be >= 1, got {args.fake_target_max_tries}")
    if not 0 <= args.fake_target_max_abs_corr <= 1:
        raise UsageError("--fake_target_max_abs_corr must be in [0, 1]")
    if args.epsilon < 0:
        raise UsageError("--epsilon must be >= 0")
    if args.n_estimators < 1:
        raise UsageError("--n_estimators must be >= 1")

    from lib.pipeline.stage3_rules import run_stage3

    run_stage3(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
