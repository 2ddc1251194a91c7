"""Stage 1: answer a task's prompts with the analysed model, resumably, and build its cache.

The answering loop with its checkpoint lives in `lib.tasks.answering` (the task interface needs it);
this driver reuses or regenerates the cache, checks an existing one belongs to these settings, and
writes the dataset statistics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from lib.core.choices import DEFAULT_SEED, Device, Dtype
from lib.core.files_and_cache import ArtifactError, atomic_write_json, content_key, load_pickle
from lib.models.resolution import EMBEDDED_MODELS
from lib.pipeline.config import StageConfig, option, require
from lib.tasks.answering import AnswerCheckpoint

__all__ = ["Stage1Config", "run_stage1", "identity_sidecar_path", "write_identity"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class Stage1Config(StageConfig):
    """The flags of `1_generate_prompts_and_answers.py`; a task's own flags (`task.add_arguments`)
    are added to the parser at run time and read from the config as attributes."""

    prompts_answers_pkl_file: str = option(help="stage-1 cache pickle: loaded if present, else created")
    ai_model: str = option("Qwen/Qwen2-7B-Instruct",
                           "analysed LLM: Hugging Face id (optional @stepN revision), local folder, .gguf "
                           f"file, or embedded alias ({', '.join(EMBEDDED_MODELS)})")
    ai_model_cache_dir: str | None = option(None, "Hugging Face download cache folder")
    batch_size: int = option(16, "generation batch size")
    task_module: str = option("lib.tasks.arithmetic_task", "module exporting TASK_SPEC")
    stats_json_out: str | None = option(None, "folder in which dataset_stats.json is written (created)")
    seed: int = option(DEFAULT_SEED, "seed for prompt subsampling and any randomness", aliases=("--random_seed",))
    max_prompts: int = option(0, "seeded subsample of this many prompts, stratified by the task (0 = all)")
    max_new_tokens: int = option(0, "answer length in tokens (0 = the task's default)")
    regenerate: bool = option(False, "regenerate even if the pickle exists (default: reuse it)")
    no_progress: bool = option(False, "hide the progress bar")
    device: Device = option("auto", "where to run the analysed model (auto: cuda > mps > cpu)")
    dtype: Dtype = option("auto", "weights/activation dtype (auto: float32, as TransformerLens uses)")
    # Set while the stage runs (the answering loop of lib.tasks.answering reads and sets them).
    checkpoint_path: str | None = option(None, "resume file of the answering loop", cli=False)
    cache_identity: dict | None = option(None, "what determines the answers (written to the .meta.json sidecar)",
                                         cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for flag in ("batch_size",):
            require(getattr(self, flag) >= 1, f"--{flag} must be >= 1, got {getattr(self, flag)}")
        for flag in ("max_prompts", "max_new_tokens"):
            require(getattr(self, flag) >= 0, f"--{flag} must be >= 0, got {getattr(self, flag)}")


def identity_sidecar_path(pkl_path: str | Path) -> Path:
    """`llm_io_data.pkl` → `llm_io_data.meta.json`: which model, task and settings made it."""
    p = Path(pkl_path)
    return p.with_name(p.stem + ".meta.json")


def write_identity(pkl_path: str | Path, identity: dict) -> None:
    atomic_write_json(identity_sidecar_path(pkl_path), identity)


def _check_reusable(pkl: Path, ai_model: str, task: Any, cfg: Stage1Config) -> None:
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
        prompts = [r["prompt"] for r in task.build_prompts(cfg, model_alias=ai_model)]
        checks.append(("prompts_sha256", content_key(prompts)))
    for key, want in checks:
        if meta.get(key) not in (None, want):
            what = "another prompt set" if key == "prompts_sha256" else f"{key}={meta.get(key)!r}, not {want!r}"
            raise ArtifactError(
                f"'{pkl}' was generated with {what}; pass --regenerate to overwrite it or choose another "
                "--prompts_answers_pkl_file"
            )


def run_stage1(task: Any, cfg: Stage1Config) -> dict:
    """Stage 1 end to end: reuse or generate the cache, then compute and write dataset stats."""
    from lib.core.files_and_cache import atomic_write_pickle, ensure_writable_dir, set_deterministic

    set_deterministic(cfg.seed)
    pkl = Path(cfg.prompts_answers_pkl_file)
    ensure_writable_dir(pkl.parent, "folder of --prompts_answers_pkl_file")
    stats_dir = ensure_writable_dir(cfg.stats_json_out, "--stats_json_out folder") if cfg.stats_json_out else None
    if pkl.exists() and not cfg.regenerate:
        _check_reusable(pkl, cfg.ai_model, task, cfg)
        print(f"[stage1] reusing {pkl}", flush=True)
    else:
        from lib.models.resolution import resolve_model_source
        from lib.models.loading import model_cache_root

        resolve_model_source(cfg.ai_model, model_cache_root(cfg.ai_model_cache_dir))  # fail fast
        cfg.checkpoint_path = str(pkl.with_name(pkl.name + ".partial.jsonl"))
        cache = task.generate_cache(cfg.ai_model, cfg.ai_model_cache_dir, cfg)
        atomic_write_pickle(pkl, cache)
        write_identity(pkl, cfg.cache_identity)
        AnswerCheckpoint(cfg.checkpoint_path, "").remove()
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
