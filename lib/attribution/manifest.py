"""Reading stage 5's `manifest.json` into circuits with ordered candidate units (stage-6 spec §1, §3).

Only MLP-write units (`m{L}`, coordinates of `blocks.{L}.hook_mlp_out`) can be ablated by our
engine; attention units in a manifest are dropped with a note (the original ablated them in
another coordinate space than stage 5 scored them, spec note 9).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.core.files_and_cache import ArtifactError

__all__ = ["Circuit", "read_manifest", "read_dataset_info", "parse_unit_label", "KEPT_STATUSES"]

KEPT_STATUSES = ("ok", "full_network_fallback")
_MLP = re.compile(r"^m(\d+)$")


@dataclass
class Circuit:
    """One manifest entry to analyse: a rule (or spectral cluster) and its candidate units."""

    circuit_id: int
    label: str
    target: str
    direction: str | None
    is_cluster: bool
    units: dict[int, list[int]]  # MLP layer -> ids (layer order = stage 5's rank order)
    scores: dict[int, dict[int, float]] = field(default_factory=dict)  # signed discovery scores
    dropped_attention_units: int = 0
    n_candidates_listed: int = 0

    @property
    def n_units(self) -> int:
        return sum(len(v) for v in self.units.values())


def parse_unit_label(key: str) -> tuple[str, int]:
    """`"('m12', 345)"` or `"m12:345"` → ("m12", 345)."""
    key = key.strip()
    if ":" in key and not key.startswith("("):
        layer, _, uid = key.partition(":")
        return layer.strip(), int(uid)
    try:
        layer, uid = ast.literal_eval(key)
        return str(layer), int(uid)
    except (ValueError, SyntaxError, TypeError):
        raise ArtifactError(f"cannot parse unit label {key!r} (expected \"('m12', 345)\" or \"m12:345\")") from None


def _mlp_layer(label: str) -> int | None:
    m = _MLP.match(label)
    return int(m.group(1)) if m else None


def read_dataset_info(input_dir: str | Path) -> dict:
    """`dataset_info.json` of a stage-5 folder, or {} when absent."""
    p = Path(input_dir) / "dataset_info.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"'{p}' is not valid JSON: {exc}") from None


def _entry_units(entry: dict, where: str, d_model: int | None) -> tuple[dict[int, list[int]], dict[int, dict[int, float]], int]:
    """Units in stage 5's rank order, signed scores and the number of attention units dropped."""
    meta = entry.get("metadata_topn") or {}
    scores: dict[int, dict[int, float]] = {}
    for key, val in (meta.get("neuron_label_score") or {}).items():
        label, uid = parse_unit_label(key)
        L = _mlp_layer(label)
        if L is not None and val is not None:
            scores.setdefault(L, {})[uid] = float(val)
    listed = meta.get("neurons") or meta.get("mlp_neurons")
    units: dict[int, list[int]] = {}
    dropped = 0
    if listed:
        for label, ids in listed.items():
            L = _mlp_layer(str(label))
            if L is None:
                dropped += len(ids)
                continue
            units.setdefault(L, []).extend(int(i) for i in ids)
    elif meta.get("node_label_score"):
        width = int(meta.get("d_model") or d_model or 0)
        if width <= 0:
            raise ArtifactError(f"{where}: node-level circuit without d_model; cannot expand nodes into units")
        for label in meta["node_label_score"]:
            L = _mlp_layer(str(label))
            if L is None:
                dropped += 1
                continue
            units[L] = list(range(width))
    for L, ids in units.items():
        seen: set[int] = set()
        units[L] = [i for i in ids if not (i in seen or seen.add(i))]
        if any(i < 0 for i in units[L]) or (d_model and any(i >= d_model for i in units[L])):
            raise ArtifactError(f"{where}: unit ids of m{L} outside [0, {d_model})")
    return units, scores, dropped


def _apply_top_k(units: dict[int, list[int]], scores: dict[int, dict[int, float]], k: int) -> dict[int, list[int]]:
    """Keep the K units with the largest |score| (units without a score rank last)."""
    flat = [(L, i, abs(scores.get(L, {}).get(i, float("-inf")))) for L, ids in units.items() for i in ids]
    flat.sort(key=lambda t: (-t[2], t[0], t[1]))
    keep = {(L, i) for L, i, _ in flat[:k]}
    return {L: [i for i in ids if (L, i) in keep] for L, ids in units.items() if any((L, i) in keep for i in ids)}


def read_manifest(input_dir: str | Path, cluster_mode: bool = False, top_k_neurons: int | None = None,
                  last_k_layers: int | None = None, d_model: int | None = None) -> list[Circuit]:
    """Circuits of `manifest.json` (status ok / full_network_fallback), in manifest order.

    A later entry with the same (label, target) as an earlier one is an error rather than a
    silent overwrite. Entries without usable MLP units are returned with empty `units` so the
    caller can write a skip record."""
    p = Path(input_dir) / "manifest.json"
    if not p.is_file():
        raise ArtifactError(f"no manifest.json in '{input_dir}' (run stage 5 first, or check --input_data_dir)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"'{p}' is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ArtifactError(f"'{p}' must hold a JSON list of circuit entries")
    out: list[Circuit] = []
    seen: set[tuple[str, str]] = set()
    for n, entry in enumerate(data):
        if not isinstance(entry, dict) or entry.get("status") not in KEPT_STATUSES:
            continue
        is_cluster = entry.get("sampling_strategy") == "spectral_clusters"
        if is_cluster != cluster_mode:
            continue
        where = f"'{p}' entry {n}"
        cid = next((entry[k] for k in ("circuit_id", "rule_id", "cluster_index") if entry.get(k) is not None), None)
        if cid is None:
            raise ArtifactError(f"{where} has no circuit_id / rule_id / cluster_index")
        label = str(entry.get("circuit_label", ""))
        target = str(entry.get("target", ""))
        if not is_cluster and (not label or not target):
            raise ArtifactError(f"{where} lacks 'circuit_label' or 'target'")
        key = (label, target)
        if key in seen:
            raise ArtifactError(f"{where} repeats circuit ({label!r}, {target!r}); stage 5 writes each once")
        seen.add(key)
        units, scores, dropped = _entry_units(entry, where, d_model)
        listed = sum(len(v) for v in units.values())
        if top_k_neurons is not None and top_k_neurons > 0:
            units = _apply_top_k(units, scores, top_k_neurons)
        if last_k_layers is not None and last_k_layers > 0:
            keep = set(sorted(units)[-last_k_layers:])
            units = {L: ids for L, ids in units.items() if L in keep}
        direction = None if is_cluster else str(entry.get("coefficient_sign", "positive"))
        out.append(Circuit(int(cid), label, target, direction, is_cluster, units, scores, dropped, listed))
    return out


def manifest_entry_summary(c: Circuit) -> dict[str, Any]:
    """Identity fields every stage-6 output repeats."""
    return {"circuit_id": c.circuit_id, "circuit_label": c.label,
            "analysis_mode": "spectral_cluster" if c.is_cluster else "rule",
            "cluster_index": c.circuit_id if c.is_cluster else None,
            "rule_target": c.target, "rule_direction": c.direction}
