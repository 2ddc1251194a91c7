#!/usr/bin/env python3
"""Check that `data/` and `cache/` hold what scripts 8-11 and make_paper_tables.py read.

With `--tasks`/`--models` it checks those experiments (a missing model folder is reported);
without them it scans `--data_root` for model folders. Every missing artifact is listed with the
tables that need it; the exit status is 1 when something is missing, 0 otherwise (2 = bad flags).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.pipeline.cli import UsageError, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default="./data")
    p.add_argument("--cache_root", default="./cache")
    p.add_argument("--tasks", default=None, help="comma list (default: scan data_root)")
    p.add_argument("--models", default=None, help="comma list of model ids/aliases (default: scan)")
    p.add_argument("--runs", default="main,spectral_split,random_anchor,fake",
                   help="comma list of run roles: main, spectral_split, random_anchor, fake, bruteforce")
    p.add_argument("--bruteforce_pairs", default="arithmetic:Qwen/Qwen2-7B-Instruct",
                   help="comma list of task:model that need a brute-force stage-6 run (Table 3); empty = none")
    p.add_argument("--no_cache", action="store_true", help="do not require cache/<task>/<model>/llm_io_data.pkl")
    p.add_argument("--json", default=None, help="also write the report as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="print only missing artifacts")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lib.reporting.artifact_check import check_artifacts
    from lib.core.files_and_cache import atomic_write_json
    from lib.runs.layout import CANONICAL_ROLES

    roles = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in roles if r not in CANONICAL_ROLES]
    if bad:
        raise UsageError(f"--runs: unknown run role '{bad[0]}' (known: {', '.join(sorted(CANONICAL_ROLES))})")
    bf = []
    for item in (x.strip() for x in args.bruteforce_pairs.split(",")):
        if item:
            if ":" not in item:
                raise UsageError(f"--bruteforce_pairs: '{item}' is not task:model")
            bf.append(tuple(item.split(":", 1)))
    if (args.tasks is None) != (args.models is None):
        raise UsageError("give both --tasks and --models, or neither (scan)")
    pairs = None
    if args.tasks is not None:
        pairs = [(t.strip(), m.strip()) for t in args.tasks.split(",") if t.strip()
                 for m in args.models.split(",") if m.strip()]
    data_root = Path(args.data_root)
    reqs, missing = check_artifacts(data_root, Path(args.cache_root), pairs, roles, bf, not args.no_cache)
    if not data_root.is_dir():
        print(f"MISSING  {data_root}  (data root)")
    for r in reqs:
        if not r.present():
            print(f"MISSING  {r.paths[0]}  [{r.label}; needed by {', '.join(r.needed_by)}]")
        elif not args.quiet:
            print(f"ok       {next(p for p in r.paths if p.exists())}  [{r.label}]")
    n_missing = len(missing) + (0 if data_root.is_dir() else 1)
    if pairs is None and data_root.is_dir() and not reqs:
        print(f"MISSING  {data_root}/<task>/<model>  (no experiment folders found)")
        n_missing += 1
    if args.json:
        atomic_write_json(args.json, {"n_required": len(reqs), "n_missing": n_missing, "missing": [
            {"label": r.label, "paths": [str(p) for p in r.paths], "needed_by": list(r.needed_by)} for r in missing]})
    print(f"{n_missing} of {len(reqs)} required artifacts missing" if n_missing
          else f"all {len(reqs)} required artifacts present")
    return 1 if n_missing else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
