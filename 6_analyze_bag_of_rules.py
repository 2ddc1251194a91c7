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

from lib.pipeline.cli import recorded_stage, run_main
from lib.pipeline.config import build_parser as build_config_parser, parse_config
from lib.pipeline.stage6_cha import Stage6Config, output_folders, run_stage6


def build_parser() -> argparse.ArgumentParser:
    return build_config_parser(Stage6Config, __doc__)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Stage6Config, argv, __doc__)
    with recorded_stage("stage6", cfg, lambda: output_folders(cfg)):
        totals = run_stage6(cfg)
    for total in totals:
        print(f"[{total['regime']}] {total['n_ok']}/{total['n_circuits']} circuits analysed; "
              f"{total['n_evaluations']} group tests for {total['n_candidates']} candidate units "
              f"({total['evaluations_over_exhaustive']} of exhaustive); {total['unique_agonists']} agonist unit(s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
