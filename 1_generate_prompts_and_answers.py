#!/usr/bin/env python3
"""Stage 1: answer every prompt of a task with the analysed LLM and pickle prompts + answers.

Writes the task's cache pickle (`--prompts_answers_pkl_file`), an identity sidecar
(`<stem>.meta.json`) and, with `--stats_json_out DIR`, `DIR/dataset_stats.json`.
An existing pickle is reused; a killed run resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from lib.pipeline.cli import UsageError, run_main
from lib.models.resolution import EMBEDDED_MODELS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts_answers_pkl_file", required=True,
                   help="stage-1 cache pickle: loaded if present, else created")
    p.add_argument("--ai_model", default="Qwen/Qwen2-7B-Instruct",
                   help="analysed LLM: Hugging Face id (optional @stepN revision), local folder, .gguf "
                        f"file, or embedded alias ({', '.join(EMBEDDED_MODELS)})")
    p.add_argument("--ai_model_cache_dir", default=None, help="Hugging Face download cache folder")
    p.add_argument("--batch_size", type=int, default=16, help="generation batch size")
    p.add_argument("--task_module", default="lib.tasks.arithmetic_task", help="module exporting TASK_SPEC")
    p.add_argument("--stats_json_out", default=None,
                   help="folder in which dataset_stats.json is written (created)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompt subsampling and any randomness")
    p.add_argument("--max_prompts", type=int, default=0,
                   help="seeded subsample of this many prompts, stratified by the task (0 = all)")
    p.add_argument("--max_new_tokens", type=int, default=0,
                   help="answer length in tokens (0 = the task's default)")
    p.add_argument("--regenerate", action="store_true",
                   help="regenerate even if the pickle exists (default: reuse it)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    from lib.models.loading import add_model_arguments

    add_model_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from lib.pipeline.stage1_answers import run_stage1
    from lib.tasks.base import load_task

    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    task = load_task(known.task_module)
    task.add_arguments(parser)
    args = parser.parse_args(argv)
    for flag in ("batch_size",):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_prompts", "max_new_tokens"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    run_stage1(task, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
