"""Finding run folders in a data tree (or a zipped stats archive): the (task, model) experiment
folders, their stage-7 stats and run folders, and the stage-6 folders that belong to a run.
Names come from `lib.runs.layout`; this module only walks the tree."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lib.core.files_and_cache import ArtifactError
from lib.runs.layout import ExperimentLayout, parse_run_mode, without_decode_only

__all__ = ["ModelDir", "find_model_dirs", "task_model_from_path", "find_stats_dirs", "find_run_dirs",
           "resolve_run_dir", "resolve_bag_dir", "open_stats_source", "layout_for_stats_root"]


@dataclass(frozen=True)
class ModelDir:
    """A `data/<task>/<model>` experiment folder."""

    task: str
    model: str
    path: Path

    def layout(self, data_root: Path) -> ExperimentLayout:
        return ExperimentLayout(Path(data_root), self.task, self.model)


_MODEL_MARKERS = ("feature_report", "rule_extraction_results", "neural_circuit_discovery_results",
                  "neural_circuit_discovery_results_fake_targets")


def find_model_dirs(data_root: str | Path, tasks: Iterable[str] | None = None) -> list[ModelDir]:
    """Every `<data_root>/<task>/<model>` (model = `org/name` or one folder) holding stage outputs."""
    root = Path(data_root)
    if not root.is_dir():
        raise ArtifactError(f"data root '{root}' does not exist")
    wanted = set(tasks) if tasks else None
    out: list[ModelDir] = []
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if wanted is not None and task_dir.name not in wanted:
            continue
        for cand in sorted(p for p in task_dir.iterdir() if p.is_dir()):
            if any((cand / m).exists() for m in _MODEL_MARKERS):
                out.append(ModelDir(task_dir.name, cand.name, cand))
                continue
            for sub in sorted(p for p in cand.iterdir() if p.is_dir()):
                if any((sub / m).exists() for m in _MODEL_MARKERS):
                    out.append(ModelDir(task_dir.name, f"{cand.name}/{sub.name}", sub))
    return out


def task_model_from_path(path: str | Path) -> tuple[str, str]:
    """(task, "org/model") from a path containing `.../data/<task>/<org>/<model>/...` (or `<task>/<alias>/`)."""
    parts = Path(path).resolve().parts if Path(path).exists() else Path(path).parts
    stop = ("rule_extraction_results", "feature_report", "neural_circuit_discovery_results",
            "neural_circuit_discovery_results_fake_targets")
    end = next((i for i, p in enumerate(parts) if p in stop), None)
    if "data" in parts:
        start = len(parts) - 1 - list(reversed(parts)).index("data")
        model_parts = parts[start + 2:end] if end is not None else parts[start + 2:start + 4]
        if start + 1 < len(parts):
            return parts[start + 1], "/".join(model_parts)
    if end is not None and end >= 2:
        if end >= 3 and parts[end - 3] not in ("", "/"):
            return parts[end - 3], f"{parts[end - 2]}/{parts[end - 1]}"
        return parts[end - 2], parts[end - 1]
    return "", ""


def _is_run_dir(p: Path) -> bool:
    """A stage-7 run folder: has a scores table or any rule-metrics/flip summary."""
    names = ("scores.csv", "rule_combo_metrics_all_scopes.csv", "rule_combo_metrics_best_per_neuron.csv",
             "rule_combo_metrics_test_selected_best_per_neuron.csv", "rule_metrics_summary.json",
             "flip_stats_global.json")
    return p.is_dir() and any((p / n).is_file() for n in names)


def find_run_dirs(stats_dir: str | Path, canonical_only: bool = False) -> list[Path]:
    """Run folders of a `stats/` folder (sorted); optionally only names the pipeline composes."""
    sd = Path(stats_dir)
    if not sd.is_dir():
        return []
    runs = [p for p in sorted(sd.iterdir()) if _is_run_dir(p)]
    if canonical_only:
        runs = [p for p in runs if parse_run_mode(p.name) is not None]
    return runs


def find_stats_dirs(root: str | Path) -> list[Path]:
    """`stats/` folders under `root` (root itself if it is one, or a run folder's parent) that hold runs."""
    r = Path(root)
    if not r.is_dir():
        raise ArtifactError(f"stats path '{r}' does not exist")
    if _is_run_dir(r) and not find_run_dirs(r):
        return [r.parent]
    if r.name == "stats" and find_run_dirs(r):
        return [r]
    found = {p for p in r.rglob("stats") if p.is_dir() and find_run_dirs(p)}
    if find_run_dirs(r):
        found.add(r)
    return sorted(found)


def resolve_run_dir(layout: ExperimentLayout, run_name: str) -> Path | None:
    """Stats folder of a run, falling back to the name without `-decode_only` (HANS runs)."""
    for name in (run_name, without_decode_only(run_name)):
        p = layout.stats_dir(name)
        if p.is_dir():
            return p
    return None


def resolve_bag_dir(layout: ExperimentLayout, run_name: str) -> Path | None:
    """Stage-6 bag folder of a run mode (exact name first, then without `-decode_only`)."""
    for name in (run_name, without_decode_only(run_name)):
        opts = parse_run_mode(name)
        if opts is None:
            continue
        p = layout.bag_dir(opts)
        if p.is_dir():
            return p
    return None


@contextlib.contextmanager
def open_stats_source(path: str | Path) -> Iterator[Path]:
    """Yield a folder for a stats path; a `.zip` is extracted to a temporary folder first."""
    p = Path(path)
    if p.suffix.lower() != ".zip":
        if not p.exists():
            raise ArtifactError(f"stats path '{p}' does not exist")
        yield p
        return
    if not zipfile.is_zipfile(p):
        raise ArtifactError(f"stats path '{p}' is not a readable zip archive")
    tmp = Path(tempfile.mkdtemp(prefix="mecharule_stats_"))
    try:
        with zipfile.ZipFile(p) as zf:
            for member in zf.namelist():
                target = (tmp / member).resolve()
                if not str(target).startswith(str(tmp.resolve())):
                    raise ArtifactError(f"zip '{p}' has an entry outside its root: {member}")
            zf.extractall(tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def layout_for_stats_root(stats_root: str | Path) -> ExperimentLayout | None:
    """The experiment layout a `.../data/<task>/<model>/rule_extraction_results/neuron_flip_rules/stats` belongs to."""
    root = Path(stats_root).resolve()
    if root.parts[-3:] != ("rule_extraction_results", "neuron_flip_rules", "stats"):
        return None
    task, model = task_model_from_path(root)
    if not task or not model:
        return None
    data_root = root.parents[2]
    for _ in Path(model).parts:
        data_root = data_root.parent
    return ExperimentLayout(data_root.parent, task, model)
