"""`clean_results_for_export.py`: which files of a data tree go into the shareable export, and which are dropped.

Files are kept by an allow-list of path shapes (or the shapes of a reference zip); pickles, caches,
policy-tag folders and macOS junk are always dropped.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

__all__ = ["EXPORT_ALLOW", "generalise_path", "plan_export"]

_STATS_FILES = (
    r"flip_stats_by_neuron\.csv", r"flip_stats_global\.json", r"flip_stats_top\d+\.pdf",
    r"flip_semantic_wrong_top\d+\.pdf", r"final_stats_exclusion\.json", r"semantic_runtime_config\.json",
    r"rule_combo_metrics_[a-z_0-9]+\.csv", r"rule_combo_metrics_manifest\.json", r"rule_metrics_summary[a-z_]*\.json",
    r"rule_metrics[a-z_]*\.tex", r"rule_metrics_distributions[a-z_]*\.pdf",
    r"high_quality_neuron_flip_coverage[a-z_]*\.(?:json|tex|pdf)", r"agonist_metric_[a-z_]+\.(?:csv|json|pdf|png)",
)
_STAGE6_FILES = (r"neuron_buckets\.json", r"neuron_bucket_stats\.json", r"rule_knockout\.json", r"cost_summary\.json")
EXPORT_ALLOW = tuple(
    [r"<MODEL>/feature_report/(?:dataset_stats|features)\.json"]
    + [r"<MODEL>/rule_extraction_results/neuron_flip_rules/stats/<RUN>/" + f for f in _STATS_FILES]
    + [r"<MODEL>/neural_circuit_discovery_results(?:_fake_targets)?/eap_ig_inputs/<LABEL>/<LABEL>/"
       r"(?:positive|negative)_baseline/" + f for f in _STAGE6_FILES]
    + [r"<MODEL>/neural_circuit_discovery_results(?:_fake_targets)?/eap_ig_inputs/<LABEL>/neural_circuits/"
       r"(?:manifest|dataset_info)\.json"])


def _always_dropped(rel: Path) -> bool:
    """Pickles, cache folders, policy-tag (`is_correct_*`) folders and macOS junk."""
    parts = rel.parts
    if rel.suffix == ".pkl" or rel.name == ".DS_Store" or rel.name.startswith("._"):
        return True
    return any(p == "cache" or p.endswith("_cache") or p.startswith("is_correct_") or p == "__MACOSX"
               for p in parts[:-1])


_MODEL_MARKERS = ("feature_report", "rule_extraction_results", "neural_circuit_discovery_results",
                  "neural_circuit_discovery_results_fake_targets")


def generalise_path(rel: str) -> str:
    """Replace the task/model prefix, run folder and circuit/bag labels of a relative path by placeholders."""
    parts = rel.replace("\\", "/").strip("/").split("/")
    cut = next((i for i, part in enumerate(parts) if part in _MODEL_MARKERS), None)
    if cut is None:
        return "/".join(parts)
    text = "/".join(["<MODEL>"] + parts[cut:])
    text = re.sub(r"(/stats/)[^/]+/", r"\1<RUN>/", text)
    text = re.sub(r"(/eap_ig_inputs/)[^/]+/neural_circuits/", r"\1<LABEL>/neural_circuits/", text)
    return re.sub(r"(/eap_ig_inputs/)(?!<LABEL>/neural_circuits/)[^/]+/[^/]+/", r"\1<LABEL>/<LABEL>/", text)


def plan_export(data_dir: Path, reference_zip: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(files to copy, files dropped) relative to `data_dir`, by the allow-list or a reference zip's shapes."""
    data_dir = Path(data_dir)
    if reference_zip is not None:
        with zipfile.ZipFile(reference_zip) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
        shapes = {generalise_path(n) for n in names if not _always_dropped(Path(n))}
        allowed = shapes.__contains__
    else:
        pats = [re.compile(p + "$") for p in EXPORT_ALLOW]
        allowed = lambda g: any(p.match(g) for p in pats)  # noqa: E731
    keep, drop = [], []
    for p in sorted(x for x in data_dir.rglob("*") if x.is_file()):
        rel = p.relative_to(data_dir)
        if not _always_dropped(rel) and allowed(generalise_path(str(rel))):
            keep.append(rel)
        else:
            drop.append(rel)
    return keep, drop
