#!/usr/bin/env python3
"""Copy the shareable part of a `data/` tree: only files whose generalised path is allow-listed.

Kept: feature-report `dataset_stats.json`/`features.json`, the stage-7 stats summaries (not the large
stats `scores.csv`), stage-6 bucket/knockout/cost summaries and stage-5 manifests (what the tables
read). Always dropped: `*.pkl`, `cache`/`*_cache` folders, `is_correct_*` policy folders, macOS junk.
With `--reference-zip`, the allow-list is the set of generalised paths found in that archive.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

from lib.pipeline.cli import UsageError, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("output_dir", nargs="?", default=None, help="default: <data_dir>_export")
    p.add_argument("--reference-zip", dest="reference_zip", default=None)
    p.add_argument("--dry-run", dest="dry_run", action="store_true")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--manifest", action="store_true", help="write export_manifest.json (sizes, sha256)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lib.core.files_and_cache import atomic_path, atomic_write_json
    from lib.runs.export import plan_export

    data = Path(args.data_dir)
    if not data.is_dir():
        raise UsageError(f"data_dir '{data}' is not a folder")
    out = Path(args.output_dir) if args.output_dir else data.with_name(data.name + "_export")
    if out.resolve() == data.resolve() or data.resolve() in out.resolve().parents:
        raise UsageError(f"output_dir '{out}' must lie outside data_dir")
    ref = Path(args.reference_zip) if args.reference_zip else None
    if ref is not None and not ref.is_file():
        raise UsageError(f"--reference-zip '{ref}' does not exist")
    if not args.dry_run and out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"output_dir '{out}' is not empty (pass --force)")
    keep, drop = plan_export(data, ref)
    entries = []
    for rel in keep:
        if args.verbose or args.dry_run:
            print(f"keep  {rel}")
        if not args.dry_run:
            with atomic_path(out / rel) as tmp:
                shutil.copyfile(data / rel, tmp)
        blob = (data / rel).read_bytes()
        entries.append({"path": str(rel).replace("\\", "/"), "bytes": len(blob),
                        "sha256": hashlib.sha256(blob).hexdigest()})
    if args.verbose:
        for rel in drop:
            print(f"drop  {rel}")
    if args.manifest and not args.dry_run:
        atomic_write_json(out / "export_manifest.json", {"source": str(data), "reference_zip": str(ref) if ref else None,
                                                         "n_files": len(entries), "n_dropped": len(drop),
                                                         "files": entries})
    print(f"{'would copy' if args.dry_run else 'copied'} {len(keep)} file(s), dropped {len(drop)}"
          + ("" if args.dry_run else f" -> {out}"))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
