"""Shared command-line plumbing: one clear error line and a non-zero exit for user mistakes."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lib.core.errors import UsageError
from lib.core.files_and_cache import ArtifactError
from lib.models.resolution import ModelResolutionError
from lib.pipeline.config import StageConfig, config_as_dict
from lib.runs.manifest import now_iso, record_stage
from lib.tasks.base import TaskError

__all__ = ["UsageError", "USER_ERRORS", "run_main", "recorded_stage"]


USER_ERRORS = (UsageError, ArtifactError, TaskError, ModelResolutionError)


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a stage's `main`; user errors print `<script>: error: <message>` and exit with 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=os.environ.get("MECHARULE_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    prog = os.path.basename(sys.argv[0]) or "mecharule"
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


@contextlib.contextmanager
def recorded_stage(stage: str, cfg: StageConfig, folders: Callable[[], Iterable[str | Path]]
                   ) -> Iterator[dict[str, Any]]:
    """Run a stage's work; when it succeeds, record it in `run_manifest.json` of each output folder.

    `folders` is called after the work, so it may name folders the stage created. A failing stage
    records nothing (it must leave no new file behind). The yielded dict is added to the entry
    (facts the stage learns while running, e.g. which dataset it read).
    """
    started = now_iso()
    extra: dict[str, Any] = {}
    yield extra
    record_stage(folders(), stage, config=config_as_dict(cfg), started=started, extra=extra)
