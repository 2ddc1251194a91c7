#!/usr/bin/env python3
"""Stage 11: summarise the one-factor-at-a-time sensitivity runs (circuit size M, agonist threshold τ).

Reads every run folder of `--stats_root` (`…/neuron_flip_rules/stats`), parses M and τ from the
run names (`-M<digits>`, `-tau<x>`), counts units whose best rule reaches each quality threshold and
summarises the CHA cost per circuit from the matching stage-6 folders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.pipeline.cli import UsageError, run_main


def build_parser() -> argparse.ArgumentParser:
    from lib.runs.layout import canonical_run_mode

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stats_root", required=True)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--baseline_M", type=int, default=43008)
    p.add_argument("--baseline_tau", type=float, default=0.2)
    p.add_argument("--baseline_run_name", default=canonical_run_mode("main"))
    p.add_argument("--quality_thresholds", type=float, nargs="+", default=[0.50, 0.60, 0.70, 0.75, 0.80, 0.85])
    p.add_argument("--min_rule_dataset_coverage", type=float, default=0.005)
    p.add_argument("--score_scope", default="all_fit", help="comma list of scopes, or both")
    p.add_argument("--paper_fig_dir", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lib.runs.results import expand_score_scopes
    from lib.reporting.sensitivity import SensitivityOptions, summarize_sensitivity

    if not Path(args.stats_root).is_dir():
        raise UsageError(f"--stats_root '{args.stats_root}' is not a folder")
    try:
        scopes = expand_score_scopes(args.score_scope)
    except ValueError as exc:
        raise UsageError(f"--score_scope: {exc}") from None
    if args.baseline_M < 1:
        raise UsageError("--baseline_M must be >= 1")
    df = summarize_sensitivity(SensitivityOptions(
        stats_root=Path(args.stats_root), out_dir=Path(args.out_dir), baseline_M=args.baseline_M,
        baseline_tau=args.baseline_tau, baseline_run_name=args.baseline_run_name,
        quality_thresholds=sorted(args.quality_thresholds), min_rule_dataset_coverage=args.min_rule_dataset_coverage,
        score_scopes=scopes, paper_fig_dir=Path(args.paper_fig_dir) if args.paper_fig_dir else None))
    print(f"{df['run'].nunique()} run(s) summarised -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
