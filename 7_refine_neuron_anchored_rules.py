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

from lib.pipeline.cli import recorded_stage, run_main
from lib.pipeline.config import build_parser as build_config_parser, parse_config
from lib.pipeline.stage7_anchoring import Stage7Config, run_stage7, stats_dir_of


def build_parser() -> argparse.ArgumentParser:
    return build_config_parser(Stage7Config, __doc__)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Stage7Config, argv, __doc__)
    with recorded_stage("stage7", cfg, lambda: [stats_dir_of(cfg), cfg.rules_dir]):
        res = run_stage7(cfg)
    msg = f"[stage7] {res['n_units']} unit(s) in {res['seconds']} s; outputs in {res['stats_dir']}"
    if "n_hq_test" in res:
        msg += (f"\n[stage7] {res['n_rule_bearing']} rule-bearing unit(s); {res['n_hq_test']} unit(s) with an HQ(TEST) "
                f"rule (held out: selected on TRAIN, scored on is_test rows); {res['n_hq_all_fit']} with an "
                f"HQ(ALL-FIT) rule (descriptive)")
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
