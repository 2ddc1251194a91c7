#!/usr/bin/env python3
"""Stage 1: answer every prompt of a task with the analysed LLM and pickle prompts + answers.

Writes the task's cache pickle (`--prompts_answers_pkl_file`), an identity sidecar
(`<stem>.meta.json`) and, with `--stats_json_out DIR`, `DIR/dataset_stats.json`.
An existing pickle is reused; a killed run resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib.pipeline.cli import recorded_stage, run_main
from lib.pipeline.config import build_parser as config_parser, parse_config

if TYPE_CHECKING:
    from lib.pipeline.stage1_answers import Stage1Config


def build_parser() -> argparse.ArgumentParser:
    """The stage's own flags (a task adds its flags once `--task_module` is known)."""
    from lib.pipeline.stage1_answers import Stage1Config

    return config_parser(Stage1Config, __doc__)


def parse_args(argv: list[str] | None = None) -> tuple[Any, Stage1Config]:
    """The task named by `--task_module` and the checked config, the task's own flags included."""
    from lib.pipeline.stage1_answers import Stage1Config
    from lib.tasks.base import load_task

    tasks = []

    def add_task_flags(parser: argparse.ArgumentParser, known: argparse.Namespace) -> None:
        tasks.append(load_task(known.task_module))
        tasks[-1].add_arguments(parser)

    cfg = parse_config(Stage1Config, argv, __doc__, extend=add_task_flags)
    return tasks[-1], cfg


def main(argv: list[str] | None = None) -> int:
    from lib.pipeline.stage1_answers import run_stage1

    task, cfg = parse_args(argv)
    outputs = [Path(cfg.prompts_answers_pkl_file).parent, *([cfg.stats_json_out] if cfg.stats_json_out else [])]
    with recorded_stage("stage1", cfg, lambda: outputs) as extra:
        stats = run_stage1(task, cfg)
        extra.update({k: stats[k] for k in ("data_source", "request_source", "judge_model", "answer_scoring")
                      if k in stats})
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
