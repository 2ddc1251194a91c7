#!/usr/bin/env python3
"""Stage 10: paired statistics of HQ-unit counts between methods over (task, LLM) units.

Reads a threshold-sweep CSV (`table2_threshold_sweep_per_run_long.csv` from make_paper_tables.py or
script 8's `threshold_sweep_all_tasks_all_llms.csv`). Compares MAIN with the spectral split, the
random coverage and the fake-rule control: exact sign test and sign-flip test (Holm across the three)
at the primary threshold and on the area under the count-vs-threshold curve. With `--data-root`, also
per-neuron best-MCC comparisons with a per-unit bootstrap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.pipeline.cli import UsageError, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True)
    p.add_argument("--metric", default="n_high_quality_neurons")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.70, 0.75, 0.80, 0.85, 0.90])
    p.add_argument("--primary_threshold", type=float, default=0.70)
    p.add_argument("--primary_threshold_all_fit", type=float, default=0.70)
    p.add_argument("--score-scope", dest="score_scope", default="both",
                   choices=("both", "test", "test_selected", "all_fit", "legacy_both"))
    p.add_argument("--alt", default="greater", choices=("greater", "less", "two-sided"))
    p.add_argument("--out_dir", default=None, help="default: <csv folder>/stats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", dest="data_root", default=None)
    p.add_argument("--tasks", default="arithmetic,bon_jailbreaking,jailbreaking")
    p.add_argument("--metric-col", dest="metric_col", default="MCC")
    p.add_argument("--min-rule-dataset-coverage", dest="min_rule_dataset_coverage", type=float, default=0.005)
    p.add_argument("--sample-stat", dest="sample_stat", default="mean",
                   choices=("mean", "median", "prop_ge_threshold", "n_ge_threshold"))
    p.add_argument("--sample-size", dest="sample_size", type=int, default=0)
    p.add_argument("--n-boot", dest="n_boot", type=int, default=10000)
    p.add_argument("--skip-sample-stats", dest="skip_sample_stats", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lib.reporting.threshold_sweeps import SweepStatsOptions, threshold_sweep_stats

    csv = Path(args.csv)
    if not csv.is_file():
        raise UsageError(f"--csv '{csv}' does not exist")
    if args.n_boot < 1 or args.sample_size < 0:
        raise UsageError("--n-boot must be >= 1 and --sample-size >= 0")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise UsageError(f"--data-root '{args.data_root}' is not a folder")
    out = Path(args.out_dir) if args.out_dir else csv.parent / "stats"
    res = threshold_sweep_stats(SweepStatsOptions(
        csv=csv, out_dir=out, metric=args.metric, thresholds=args.thresholds, primary_threshold=args.primary_threshold,
        primary_threshold_all_fit=args.primary_threshold_all_fit, score_scope=args.score_scope, alt=args.alt,
        seed=args.seed, data_root=Path(args.data_root) if args.data_root else None,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], metric_col=args.metric_col,
        min_rule_dataset_coverage=args.min_rule_dataset_coverage, sample_stat=args.sample_stat,
        sample_size=args.sample_size, n_boot=args.n_boot, skip_sample_stats=args.skip_sample_stats))
    print(f"{len(res)} comparison table(s) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
