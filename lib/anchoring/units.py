"""Stage-7 candidate units (spec 7-11 §2.2): the τ-agonists of every stage-6 `neuron_buckets.json`.

A unit is one `hook_mlp_out` coordinate, keyed `m{L}:{id}` (stage 6), `m{L}_{id}` in file and column
names (`neuron_key`). The agonist test is `lib.ablation.cha.is_agonist`, the one definition stage 6 uses.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from lib.core.files_and_cache import ArtifactError
from lib.ablation.cha import is_agonist

__all__ = ["Unit", "layer_key", "layer_sort", "find_bucket_files", "load_candidate_units"]


def layer_key(label: str) -> str:
    """`m16` → `m16`, `a16.h21` → `a16_h21` (runs of non-alphanumerics → `_`, trimmed)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", str(label)).strip("_")


def layer_sort(label: str) -> int:
    """First integer of a layer label (sort key)."""
    m = re.search(r"\d+", str(label))
    return int(m.group()) if m else -1


@dataclass(frozen=True)
class Unit:
    """One candidate unit and where it came from."""

    layer_label: str
    neuron_id: int
    max_effect: float
    baseline_subset: str = "all"
    sources: tuple[str, ...] = field(default=(), compare=False)

    @property
    def layer(self) -> int:
        return layer_sort(self.layer_label)

    @property
    def key(self) -> str:
        return f"{self.layer_label}:{self.neuron_id}"

    @property
    def layer_key(self) -> str:
        return layer_key(self.layer_label)

    @property
    def neuron_key(self) -> str:
        return f"{self.layer_key}_{self.neuron_id}"

    def column(self, kind: str = "any") -> str:
        """Flip column name: `flip_{lk}_{id}` (any) or `flip_{c2i|i2c}_{lk}_{id}`."""
        return f"flip_{self.neuron_key}" if kind == "any" else f"flip_{kind}_{self.neuron_key}"


def find_bucket_files(path: str | Path) -> list[tuple[str, dict]]:
    """(source name, parsed JSON) of every `neuron_buckets.json` under a folder or inside a `.zip`."""
    p = Path(path)
    out: list[tuple[str, dict]] = []
    if not p.exists():
        raise ArtifactError(f"--circuit_agonists_path '{p}' does not exist")
    if p.is_file() and p.suffix.lower() == ".zip":
        if not zipfile.is_zipfile(p):
            raise ArtifactError(f"--circuit_agonists_path '{p}' is not a readable zip archive")
        with zipfile.ZipFile(p) as zf:
            for name in sorted(n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "neuron_buckets.json"):
                out.append((f"{p}!{name}", _parse(zf.read(name).decode("utf-8"), f"{p}!{name}")))
    elif p.is_dir():
        for f in sorted(p.rglob("neuron_buckets.json")):
            out.append((str(f), _parse(f.read_text(encoding="utf-8"), str(f))))
    else:
        raise ArtifactError(f"--circuit_agonists_path '{p}' must be a stage-6 output folder or a .zip")
    if not out:
        raise ArtifactError(f"no neuron_buckets.json under --circuit_agonists_path '{p}' (run stage 6 first)")
    return out


def _parse(text: str, where: str) -> dict:
    """A bucket file as a dict with the keys stage 6 writes."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"neuron buckets '{where}' is not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("non_catastrophic_agonists", {}), dict):
        raise ArtifactError(f"neuron buckets '{where}' lacks a 'non_catastrophic_agonists' object")
    return obj


def _regime_of(source: str, record: dict) -> str:
    """Baseline regime of a bucket entry: the record's `baseline_subset`, else the folder name."""
    sub = str(record.get("baseline_subset") or "")
    if sub in ("positive", "negative"):
        return sub
    for regime in ("positive", "negative"):
        if f"{regime}_baseline" in source:
            return regime
    return "all"


def load_candidate_units(path: str | Path, tau: float, max_neurons: int | None = None) -> list[Unit]:
    """Agonists not confirmed/pending catastrophic with effect ≥ τ, merged over files, sorted (layer, id) desc."""
    merged: dict[tuple[str, int], Unit] = {}
    for source, buckets in find_bucket_files(path):
        cat = buckets.get("catastrophic_zero") or {}
        blocked = set((cat.get("confirmed") or {})) | set((cat.get("candidates") or {}))
        for key, rec in (buckets.get("non_catastrophic_agonists") or {}).items():
            if key in blocked or not isinstance(rec, dict):
                continue
            last = dict(rec.get("last_record") or {})
            label, _, nid = str(key).rpartition(":")
            if not label or not nid.lstrip("-").isdigit():
                raise ArtifactError(f"neuron buckets '{source}': key '{key}' is not 'layer:id'")
            if last.get("max_effect") is None:
                last["max_effect"] = rec.get("best_max_effect", rec.get("best_abs_gap"))
            if last.get("max_effect") is None or not is_agonist({**last, "group_size": 1}, float(tau)):
                continue
            ident = (str(last.get("layer_label") or label), int(last.get("neuron_id", nid)))
            regime = _regime_of(source, last)
            eff = float(last["max_effect"])
            old = merged.get(ident)
            if old is not None:
                regime = old.baseline_subset if old.baseline_subset == regime else "all"
                eff = max(eff, old.max_effect)
                sources = old.sources + (source,)
            else:
                sources = (source,)
            merged[ident] = Unit(ident[0], ident[1], eff, regime, sources)
    units = sorted(merged.values(), key=lambda u: (u.layer, u.layer_label, u.neuron_id), reverse=True)
    return units[:max_neurons] if max_neurons else units
