#!/usr/bin/env python3
"""Stage 9: compare models of one task across run modes (rule quality, flip unions, τ-agonists, CHA cost).

Each run reads its own stage-6 bag folder (named by the run mode through lib.runs.layout), the
positive-baseline `neuron_buckets.json` and `rule_knockout.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.pipeline.cli import UsageError, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task_dir", required=True, help="data/<task>")
    p.add_argument("--out_dir", default="results_cross_models")
    p.add_argument("--tau", type=float, default=0.2, help="agonist threshold on max_effect")
    p.add_argument("--eps", type=float, default=0.2, help="selectivity threshold on |accuracy_gap|")
    p.add_argument("--min_rule_dataset_coverage", type=float, default=0.005)
    p.add_argument("--score_scope", default="test_selected", choices=("test_selected", "all_fit", "test"))
    p.add_argument("--runs", default="all", help="comma list of run-mode folder names, or all (canonical runs)")
    p.add_argument("--drop_incomplete_models", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lib.reporting.compare_models import compare_models

    if not Path(args.task_dir).is_dir():
        raise UsageError(f"--task_dir '{args.task_dir}' is not a folder")
    if args.tau < 0 or args.eps < 0:
        raise UsageError("--tau and --eps must be >= 0")
    df = compare_models(Path(args.task_dir), Path(args.out_dir), args.tau, args.eps, args.min_rule_dataset_coverage,
                        args.score_scope, args.runs, args.drop_incomplete_models)
    print(f"{df['model'].nunique()} model(s), {len(df)} model × run rows -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
