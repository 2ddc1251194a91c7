"""Stage 1: answer a task's prompts with the analysed model, resumably, and build its cache.

Answers are appended to a JSON-lines checkpoint after every batch; a killed run restarted
with the same settings skips what it already answered. The checkpoint's first line holds
an identity key (model, prompts, decoding settings): a checkpoint from other settings is
set aside, never mixed in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from lib.caching_and_prompting import ArtifactError, atomic_write_json, content_key, load_pickle

__all__ = ["AnswerCheckpoint", "generate_task_cache", "cache_identity", "identity_sidecar_path"]

log = logging.getLogger(__name__)


class AnswerCheckpoint:
    """Append-only JSON-lines store of finished answers, keyed by prompt index."""

    def __init__(self, path: str | Path, identity: str) -> None:
        self.path = Path(path)
        self.identity = identity

    def load(self) -> dict[int, str]:
        """Answers already finished under the same identity (a torn last line is ignored)."""
        if not self.path.exists():
            return {}
        done: dict[int, str] = {}
        with open(self.path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            header = {}
        if header.get("identity") != self.identity:
            stale = self.path.with_name(self.path.name + ".stale")
            os.replace(self.path, stale)
            log.warning("checkpoint %s was made with other settings; moved to %s", self.path, stale)
            return {}
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                done[int(rec["i"])] = str(rec["a"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # the write of this line was interrupted
        return done

    def append(self, indices: Sequence[int], answers: Sequence[str]) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            if new:
                fh.write(json.dumps({"identity": self.identity}) + "\n")
            for i, a in zip(indices, answers):
                fh.write(json.dumps({"i": int(i), "a": a}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()


def identity_sidecar_path(pkl_path: str | Path) -> Path:
    """`llm_io_data.pkl` → `llm_io_data.meta.json`: which model, task and settings made it."""
    p = Path(pkl_path)
    return p.with_name(p.stem + ".meta.json")


def cache_identity(task: Any, ai_model: str, args: argparse.Namespace, prompts: Sequence[str],
                   max_new_tokens: int, stop_strings: Sequence[str]) -> dict:
    """Everything that determines the answers; two runs with equal identities give equal caches."""
    return {
        "task": task.name,
        "ai_model": ai_model,
        "n_prompts": len(prompts),
        "prompts_sha256": content_key(list(prompts)),
        "max_new_tokens": max_new_tokens,
        "stop_strings": list(stop_strings),
        "dtype": getattr(args, "dtype", "auto"),
        "decoding": "greedy",
    }


def generate_task_cache(task: Any, ai_model_name: str, ai_model_cache_dir: str | None,
                        args: argparse.Namespace) -> Any:
    """Build prompts, answer the unanswered ones (checkpointing), score, return the cache object."""
    from lib.generation import greedy_generate
    from lib.modeling_and_ablation import load_analysed_model

    records = task.build_prompts(args, model_alias=ai_model_name)
    if not records:
        raise ValueError(f"task {task.name} produced no prompts with these settings")
    prompts = [r["prompt"] for r in records]
    max_new = int(getattr(args, "max_new_tokens", 0) or task.MAX_NEW_TOKENS)
    stops = task.generation_stop_strings(args, ai_model_name)
    identity = cache_identity(task, ai_model_name, args, prompts, max_new, stops)
    args.cache_identity = identity

    ckpt_path = getattr(args, "checkpoint_path", None)
    ckpt = AnswerCheckpoint(ckpt_path, content_key(identity)) if ckpt_path else None
    done = ckpt.load() if ckpt else {}
    todo = [i for i in range(len(prompts)) if i not in done]
    if done:
        log.info("resuming: %d of %d prompts already answered", len(done), len(prompts))
        print(f"[stage1] resuming: {len(done)} of {len(prompts)} prompts already answered", flush=True)
    if todo:
        model = load_analysed_model(ai_model_name, getattr(args, "device", "auto"),
                                    getattr(args, "dtype", "auto"), ai_model_cache_dir)

        def on_batch(local_idx: list[int], texts: list[str]) -> None:
            glob = [todo[j] for j in local_idx]
            done.update(zip(glob, texts))
            if ckpt:
                ckpt.append(glob, texts)

        greedy_generate(model, [prompts[i] for i in todo], max_new, batch_size=int(args.batch_size),
                        stop_strings=stops, on_batch=on_batch,
                        progress=False if getattr(args, "no_progress", False) else "stage 1: answering")
        del model
    answers = [done[i] for i in range(len(prompts))]
    return task.assemble_cache(records, answers, args)


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
    from lib.caching_and_prompting import atomic_write_pickle, ensure_writable_dir, set_deterministic

    set_deterministic(args.seed)
    pkl = Path(args.prompts_answers_pkl_file)
    ensure_writable_dir(pkl.parent, "folder of --prompts_answers_pkl_file")
    stats_dir = ensure_writable_dir(args.stats_json_out, "--stats_json_out folder") if args.stats_json_out else None
    if pkl.exists() and not args.regenerate:
        _check_reusable(pkl, args.ai_model, task, args)
        print(f"[stage1] reusing {pkl}", flush=True)
    else:
        from lib.model_resolution import resolve_model_source
        from lib.modeling_and_ablation import model_cache_root

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
