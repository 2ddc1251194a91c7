"""`check_artifacts.py`: list what scripts 8-11 and the paper tables read, per (task, model), and what is missing.

Each requirement is satisfied by any one of its alternative paths (decode-only run folder or not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lib.reporting.formatting import sort_key_task_model
from lib.runs.discovery import find_model_dirs
from lib.runs.layout import BASELINE_SUBSETS, ExperimentLayout, canonical_run_mode, parse_run_mode

__all__ = ["Requirement", "DEFAULT_CHECK_ROLES", "artifact_requirements", "check_artifacts"]


@dataclass(frozen=True)
class Requirement:
    """One artifact the tables need: any of `paths` must exist."""

    label: str
    paths: tuple[Path, ...]
    needed_by: tuple[str, ...]

    def present(self) -> bool:
        return any(p.exists() for p in self.paths)


DEFAULT_CHECK_ROLES = ("main", "spectral_split", "random_anchor", "fake")


def _run_alternatives(layout: ExperimentLayout, role: str) -> list[str]:
    return [canonical_run_mode(role), canonical_run_mode(role, decode_only=False)]


def artifact_requirements(layout: ExperimentLayout, roles: Sequence[str], bruteforce: bool,
                          check_cache: bool = True) -> list[Requirement]:
    """What scripts 8-11 and the paper tables read for one (task, model)."""
    reqs = [Requirement("model folder", (layout.model_dir,), ("all tables",))]
    if check_cache:
        reqs.append(Requirement("stage-1 answers", (layout.cache_dir / "llm_io_data.pkl",), ("pipeline reruns",)))
    fr = layout.feature_report_dir
    reqs.append(Requirement("baseline performance", (fr / "dataset_stats.json", fr / "scores.csv"), ("table9",)))
    for role in roles:
        names = _run_alternatives(layout, role)
        stats = tuple(layout.stats_dir(n) for n in names)
        by = ("table1", "table2", "script8", "script9", "script10") if role == "main" else ("table2", "script8", "script10")
        reqs.append(Requirement(f"{role} stage-7 stats folder", stats, by))
        reqs.append(Requirement(f"{role} rule metrics", tuple(s / f for s in stats for f in (
            "rule_combo_metrics_all_scopes.csv", "rule_combo_metrics_test_selected_all.csv")), by))
        reqs.append(Requirement(f"{role} rule metrics manifest (HQ-T/HQ-F)",
                                tuple(s / "rule_combo_metrics_manifest.json" for s in stats), by))
        if role == "main":
            reqs.append(Requirement("main flip table", tuple(s / f for s in stats for f in (
                "scores.csv", "flip_stats_global.json")), ("table1", "script8")))
            reqs.append(Requirement("main flip stats by neuron", tuple(s / "flip_stats_by_neuron.csv" for s in stats),
                                    ("table1", "table10", "table11")))
            opts = [parse_run_mode(n) for n in names]
            reqs.append(Requirement("main discovery manifest", tuple(layout.circuits_dir(o) / "manifest.json"
                                                                     for o in opts), ("table10", "table11")))
            for subset in BASELINE_SUBSETS:
                dirs = tuple(layout.baseline_dir(o, subset) for o in opts)
                reqs.append(Requirement(f"main stage-6 {subset} buckets", tuple(d / "neuron_buckets.json" for d in dirs),
                                        ("table3", "table13", "script9")))
                reqs.append(Requirement(f"main stage-6 {subset} knockout summary",
                                        tuple(d / "rule_knockout.json" for d in dirs), ("table3", "table12", "script9")))
    if bruteforce:
        opts = [parse_run_mode(n) for n in _run_alternatives(layout, "bruteforce")]
        for subset in BASELINE_SUBSETS:
            dirs = tuple(layout.baseline_dir(o, subset) for o in opts)
            reqs.append(Requirement(f"brute-force stage-6 {subset} buckets",
                                    tuple(d / "neuron_buckets.json" for d in dirs), ("table3",)))
    return reqs


def check_artifacts(data_root: Path, cache_root: Path, pairs: Sequence[tuple[str, str]] | None,
                    roles: Sequence[str] = DEFAULT_CHECK_ROLES,
                    bruteforce_pairs: Sequence[tuple[str, str]] = (("arithmetic", "Qwen/Qwen2-7B-Instruct"),),
                    check_cache: bool = True) -> tuple[list[Requirement], list[Requirement]]:
    """(all requirements, missing ones) for the given (task, model) pairs, or every model folder found."""
    if pairs is None:
        pairs = [(md.task, md.model) for md in find_model_dirs(data_root)] if Path(data_root).is_dir() else []
    reqs: list[Requirement] = []
    for task, model in sorted(pairs, key=lambda p: sort_key_task_model(*p)):
        layout = ExperimentLayout(Path(data_root), task, model, Path(cache_root))
        reqs += artifact_requirements(layout, roles, (task, model) in set(bruteforce_pairs), check_cache)
    return reqs, [r for r in reqs if not r.present()]
