#!/usr/bin/env python3
"""Stage 8: compare stage-7 run modes (threshold sweeps of HQ units, flip unions, metric distributions).

`--stats_path` is one `stats/` folder, a folder holding several (e.g. `data/`), or a `.zip` of them.
One stats folder → outputs directly in `--out_dir`; several → per-LLM outputs under
`<out>/<task>/<org>/<model>/leaf_stats_dir_outputs/` plus `aggregated_by_task/`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from lib.pipeline.cli import UsageError, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stats_path", required=True, help="stats folder, parent of several, or zip")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--rule_quality_metric", default="mcc", choices=("mcc", "f1", "balanced_accuracy", "tpr", "tnr"))
    p.add_argument("--thr_min", type=float, default=0.70)
    p.add_argument("--thr_max", type=float, default=0.99)
    p.add_argument("--thr_step", type=float, default=0.01)
    p.add_argument("--best_mode", default="tail@0.9", help="mean | median | tail@x")
    p.add_argument("--rule_length_cap", type=int, default=30)
    p.add_argument("--min_rule_dataset_coverage", type=float, default=0.005)
    p.add_argument("--run_name_regex", default=None)
    p.add_argument("--score_scope", default="test_selected", choices=("test_selected", "all_fit", "test"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lib.reporting.compare_experiments import CompareOptions, compare_experiments

    if args.thr_step <= 0 or args.thr_max < args.thr_min:
        raise UsageError("--thr_step must be > 0 and --thr_max >= --thr_min")
    if not re.fullmatch(r"mean|median|tail@\d*\.?\d+", args.best_mode):
        raise UsageError(f"--best_mode must be mean, median or tail@<x>, got {args.best_mode!r}")
    if args.run_name_regex:
        try:
            re.compile(args.run_name_regex)
        except re.error as exc:
            raise UsageError(f"--run_name_regex is not a valid regular expression ({exc})") from None
    n = int(round((args.thr_max - args.thr_min) / args.thr_step)) + 1
    thresholds = [round(args.thr_min + i * args.thr_step, 6) for i in range(n)]
    if not Path(args.stats_path).exists():
        raise UsageError(f"--stats_path '{args.stats_path}' does not exist")
    res = compare_experiments(CompareOptions(
        stats_path=Path(args.stats_path), out_dir=Path(args.out_dir), rule_quality_metric=args.rule_quality_metric,
        thresholds=thresholds, best_mode=args.best_mode, rule_length_cap=args.rule_length_cap,
        min_rule_dataset_coverage=args.min_rule_dataset_coverage, run_name_regex=args.run_name_regex,
        score_scope=args.score_scope))
    print(f"compared {res['n_leaves']} stats folder(s); outputs in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
