#!/usr/bin/env python3
"""Paper tables 1, 2, 3, 9, 10, 11, 12 and 13 from an archived or fresh `data/` tree.

Each table is written as `.csv`, `.md` and `.tex` under `--out_dir` (an empty table with headers
when its inputs are missing), plus `paper_tables_manifest.json` and `unsupported_tables_note.txt`
(tables 4-8 are hand-written). Table 3's budget compares like with like: CHA evaluations on the
circuits of the brute-force run ÷ that run's own evaluation count (see docs/DEVIATIONS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.pipeline.cli import UsageError, run_main

_ALL = "table1,table2,table3,table9,table10,table11,table12,table13"


def _floats(text: str, flag: str) -> list[float]:
    """Comma list of floats, or a UsageError naming the flag."""
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be a comma list of numbers, got {text!r}") from None
    if not vals:
        raise UsageError(f"{flag} is empty")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default="./data")
    p.add_argument("--out_dir", default="./paper_tables")
    p.add_argument("--which", default="all_supported", help=f"comma list of tables or all_supported (= {_ALL})")
    p.add_argument("--tau", type=float, default=0.2, help="agonist threshold on max_effect (tables 13)")
    p.add_argument("--table3_bins", default="0.2,0.3,0.5,1.0")
    p.add_argument("--thresholds", default="0.7,0.75,0.8,0.85,0.9", help="Table 2 MCC thresholds")
    for n in (3, 10, 11):
        p.add_argument(f"--table{n}_task", default="arithmetic")
        p.add_argument(f"--table{n}_model", default="Qwen/Qwen2-7B-Instruct")
    p.add_argument("--table10_topn", type=int, default=50)
    p.add_argument("--table11_topn", type=int, default=10)
    p.add_argument("--table13_task_a", default="arithmetic")
    p.add_argument("--table13_task_b", default="bon_jailbreaking")
    p.add_argument("--table13_model", default="Qwen/Qwen2-7B-Instruct")
    p.add_argument("--table13_baseline_scope", default="both", choices=("both", "positive", "negative", "selected"))
    p.add_argument("--baseline_subset", default="positive_baseline",
                   choices=("positive_baseline", "negative_baseline", "positive", "negative"))
    p.add_argument("--table1_coverage_source", default="all", choices=("all", "hq"))
    p.add_argument("--table1_coverage_score_scope", default="all_fit")
    p.add_argument("--hq_test_threshold", type=float, default=0.70)
    p.add_argument("--hq_all_fit_threshold", type=float, default=0.70)
    p.add_argument("--hq_threshold", type=float, default=None, help="alias: sets both HQ thresholds")
    p.add_argument("--score_scopes", default="test_selected,all_fit")
    p.add_argument("--min_rule_dataset_coverage", type=float, default=0.005)
    p.add_argument("--include_hans_in_main_tables", action="store_true")
    p.add_argument("--table3_scope", default="all", choices=("all", "selected"))
    p.add_argument("--paper_tables_root", default=None,
                   help="write under this folder instead of --out_dir (when --out_dir is left at its default)")
    p.add_argument("--bruteforce_candidate_cap", type=int, default=100000)
    p.add_argument("--cha_rank_metric", default="c2i", choices=("c2i", "i2c", "flip_any"))
    p.add_argument("--notes_only", action="store_true", help="write only the notes and the manifest")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lib.reporting.paper_tables import SUPPORTED_TABLES, TableOptions, make_tables
    from lib.runs.results import expand_score_scopes, normalize_scope

    which = list(SUPPORTED_TABLES) if args.which.strip() in ("all_supported", "all") else \
        [w.strip() if w.strip().startswith("table") else f"table{w.strip()}" for w in args.which.split(",") if w.strip()]
    unknown = [w for w in which if w not in SUPPORTED_TABLES]
    if unknown:
        raise UsageError(f"--which: unsupported table '{unknown[0]}' (supported: {', '.join(SUPPORTED_TABLES)})")
    bins = _floats(args.table3_bins, "--table3_bins")
    if len(bins) < 2 or any(b2 <= b1 for b1, b2 in zip(bins, bins[1:])):
        raise UsageError("--table3_bins needs at least two increasing edges")
    try:
        scopes = expand_score_scopes(args.score_scopes)
        cov_scope = normalize_scope(args.table1_coverage_score_scope)
    except ValueError as exc:
        raise UsageError(f"--score_scopes/--table1_coverage_score_scope: {exc}") from None
    for flag in ("table10_topn", "table11_topn", "bruteforce_candidate_cap"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1")
    data_root = Path(args.data_root)
    if not data_root.is_dir():
        raise UsageError(f"--data_root '{data_root}' does not exist")
    out_dir = Path(args.paper_tables_root) if args.paper_tables_root and args.out_dir == "./paper_tables" \
        else Path(args.out_dir)
    hq_t = args.hq_threshold if args.hq_threshold is not None else args.hq_test_threshold
    hq_f = args.hq_threshold if args.hq_threshold is not None else args.hq_all_fit_threshold
    opts = TableOptions(
        data_root=data_root, out_dir=out_dir, which=which, tau=args.tau, table3_bins=bins,
        thresholds=_floats(args.thresholds, "--thresholds"), table3_task=args.table3_task,
        table3_model=args.table3_model, table10_task=args.table10_task, table10_model=args.table10_model,
        table11_task=args.table11_task, table11_model=args.table11_model, table10_topn=args.table10_topn,
        table11_topn=args.table11_topn, table13_task_a=args.table13_task_a, table13_task_b=args.table13_task_b,
        table13_model=args.table13_model, table13_baseline_scope=args.table13_baseline_scope,
        baseline_subset=args.baseline_subset, table1_coverage_source=args.table1_coverage_source,
        table1_coverage_score_scope=cov_scope, hq_test_threshold=hq_t, hq_all_fit_threshold=hq_f,
        score_scopes=scopes, min_rule_dataset_coverage=args.min_rule_dataset_coverage,
        include_hans_in_main_tables=args.include_hans_in_main_tables, table3_scope=args.table3_scope,
        bruteforce_candidate_cap=args.bruteforce_candidate_cap, cha_rank_metric=args.cha_rank_metric)
    manifest = make_tables(opts, notes_only=args.notes_only)
    for key, info in sorted(manifest["tables"].items()):
        print(f"{key}: {info['n_rows']} rows -> {out_dir / info['files'][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
