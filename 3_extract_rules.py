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

from lib.pipeline.cli import recorded_stage, run_main
from lib.pipeline.config import build_parser as config_parser, parse_config


def build_parser() -> argparse.ArgumentParser:
    from lib.pipeline.stage3_rules import Stage3Config

    return config_parser(Stage3Config, __doc__)


def main(argv: list[str] | None = None) -> int:
    from lib.pipeline.stage3_rules import Stage3Config, run_stage3

    cfg = parse_config(Stage3Config, argv, __doc__)
    with recorded_stage("stage3", cfg, lambda: [cfg.rules_dir]):
        run_stage3(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
