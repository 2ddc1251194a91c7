#!/usr/bin/env python3
"""Stage 2: describe every stage-1 prompt with interpretable features.

Seed features of the task plus features proposed by a feature LLM (as small Python functions,
run in a sandbox) are scored on every prompt, filtered on TRAIN rows, and written as
`scores.csv`, `features.json` and `feature_report.md` in `--features_scores_dir`.
"""

from __future__ import annotations

import argparse
import sys

from lib.pipeline.cli import recorded_stage, run_main
from lib.pipeline.config import build_parser as config_parser, parse_config


def build_parser() -> argparse.ArgumentParser:
    from lib.pipeline.stage2_features import Stage2Config

    return config_parser(Stage2Config, __doc__)


def main(argv: list[str] | None = None) -> int:
    from lib.pipeline.stage2_features import Stage2Config, run_stage2
    from lib.tasks.base import load_task

    cfg = parse_config(Stage2Config, argv, __doc__)
    task = load_task(cfg.task_module)
    with recorded_stage("stage2", cfg, lambda: [cfg.features_scores_dir]):
        run_stage2(task, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
