"""Stage 1: answer a task's prompts with the analysed model, resumably, and build its cache.

The answering loop with its checkpoint lives in `lib.tasks.answering` (the task interface needs it);
this driver reuses or regenerates the cache, checks an existing one belongs to these settings, and
writes the dataset statistics.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from lib.core.files_and_cache import ArtifactError, atomic_write_json, content_key, load_pickle
from lib.tasks.answering import AnswerCheckpoint

__all__ = ["run_stage1", "identity_sidecar_path", "write_identity"]

log = logging.getLogger(__name__)


def identity_sidecar_path(pkl_path: str | Path) -> Path:
    """`llm_io_data.pkl` → `llm_io_data.meta.json`: which model, task and settings made it."""
    p = Path(pkl_path)
    return p.with_name(p.stem + ".meta.json")


def write_identity(pkl_path: str | Path, identity: dict) -> None:
    atomic_write_json(identity_sidecar_path(pkl_path), identity)


def _check_reusable(pkl: Path, ai_model: str, task: Any, args: argparse.Namespace) -> None:
    """An existing cache made by another model, task or prompt set is an error, not a silent reuse."""
    side = identity_sidecar_path(pkl)
    if not side.exists():
        return  # archived artifact from the original tool: reuse as-is
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    checks = [("ai_model", ai_model), ("task", task.name)]
    if meta.get("prompts_sha256"):
        prompts = [r["prompt"] for r in task.build_prompts(args, model_alias=ai_model)]
        checks.append(("prompts_sha256", content_key(prompts)))
    for key, want in checks:
        if meta.get(key) not in (None, want):
            what = "another prompt set" if key == "prompts_sha256" else f"{key}={meta.get(key)!r}, not {want!r}"
            raise ArtifactError(
                f"'{pkl}' was generated with {what}; pass --regenerate to overwrite it or choose another "
                "--prompts_answers_pkl_file"
            )


def run_stage1(task: Any, args: argparse.Namespace) -> dict:
    """Stage 1 end to end: reuse or generate the cache, then compute and write dataset stats."""
    from lib.core.files_and_cache import atomic_write_pickle, ensure_writable_dir, set_deterministic

    set_deterministic(args.seed)
    pkl = Path(args.prompts_answers_pkl_file)
    ensure_writable_dir(pkl.parent, "folder of --prompts_answers_pkl_file")
    stats_dir = ensure_writable_dir(args.stats_json_out, "--stats_json_out folder") if args.stats_json_out else None
    if pkl.exists() and not args.regenerate:
        _check_reusable(pkl, args.ai_model, task, args)
        print(f"[stage1] reusing {pkl}", flush=True)
    else:
        from lib.models.resolution import resolve_model_source
        from lib.models.loading import model_cache_root

        resolve_model_source(args.ai_model, model_cache_root(args.ai_model_cache_dir))  # fail fast
        args.checkpoint_path = pkl.with_name(pkl.name + ".partial.jsonl")
        cache = task.generate_cache(args.ai_model, args.ai_model_cache_dir, args)
        atomic_write_pickle(pkl, cache)
        write_identity(pkl, args.cache_identity)
        AnswerCheckpoint(args.checkpoint_path, "").remove()
        print(f"[stage1] wrote {pkl}", flush=True)
    df = task.load_dataset_from_cache(str(pkl))  # validates the pickle (clear error if unreadable)
    if hasattr(task, "rerun_dataset_load"):
        data = task.rerun_dataset_load(load_pickle(pkl))
        atomic_write_pickle(pkl, data)
        df = task.load_dataset_from_cache(str(pkl))
    stats = task.get_basic_statistics(df)
    print(json.dumps(stats, indent=2, ensure_ascii=False), flush=True)
    if stats_dir is not None:
        atomic_write_json(stats_dir / "dataset_stats.json", stats)
    return stats
