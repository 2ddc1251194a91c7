"""Stage-7 flip statistics (spec 7-11 §2.6): per-unit counts/rates, union counts, top-K plots.

Semantic columns (`semantic_wrong_*`, `flip_semantic_wrong_*`, …) are counted when the table has
them; no task of this project has a semantic evaluator, so their counts are empty (NaN) otherwise.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from lib.core.files_and_cache import atomic_write_json, write_csv_atomic
from lib.anchoring.units import Unit

__all__ = ["flip_flags", "flip_stats_by_neuron", "flip_stats_global", "discovery_original_rows",
           "plot_flip_stats_top", "write_flip_stats"]

_SEMANTIC = ("semantic_wrong", "flip_semantic_wrong", "flip_empty", "flip_unparseable")


def flip_flags(df: pd.DataFrame, col: str) -> np.ndarray:
    """Column as float flags (1, 0, NaN = not evaluated / absent)."""
    if col not in df.columns:
        return np.full(len(df), np.nan)
    s = df[col]
    if s.dtype == object:
        s = s.map(lambda v: {"true": 1.0, "false": 0.0}.get(str(v).strip().lower(), np.nan) if not pd.isna(v) else np.nan)
    return pd.to_numeric(s.astype("Float64") if str(s.dtype) == "boolean" else s, errors="coerce").to_numpy(dtype=float)


def flip_stats_by_neuron(df: pd.DataFrame, units: Sequence[Unit]) -> pd.DataFrame:
    """One row per unit: n_eval, flip counts, rates and percentages, sorted by flip counts (desc)."""
    rows = []
    for u in units:
        anyf = flip_flags(df, u.column("any"))
        n_eval = int((~np.isnan(anyf)).sum())
        rec: dict = {"layer_label": u.layer_label, "layer_key": u.layer_key, "neuron_id": u.neuron_id,
                     "neuron": u.key, "neuron_key": u.neuron_key, "max_effect": u.max_effect,
                     "baseline_subset": u.baseline_subset, "n_eval": n_eval}
        counts = {"c2i": flip_flags(df, u.column("c2i")), "i2c": flip_flags(df, u.column("i2c")), "flip_any": anyf}
        for name, arr in counts.items():
            rec[f"{name}_count"] = int(np.nansum(arr))
        for name in _SEMANTIC:
            arr = flip_flags(df, f"{name}_{u.neuron_key}")
            rec[f"{name}_count"] = int(np.nansum(arr)) if not np.isnan(arr).all() else np.nan
        for name in ("c2i", "i2c", "flip_any") + _SEMANTIC:
            c = rec[f"{name}_count"]
            rec[f"{name}_rate"] = (c / n_eval) if n_eval and not pd.isna(c) else np.nan
        fa, fsw = rec["flip_any_count"], rec["flip_semantic_wrong_count"]
        rec["flip_semantic_wrong_share"] = (fsw / fa) if fa and not pd.isna(fsw) else np.nan
        for name in ("c2i", "i2c", "flip_any", "semantic_wrong", "flip_semantic_wrong"):
            rec[f"{name}_pct"] = 100.0 * rec[f"{name}_rate"] if not pd.isna(rec[f"{name}_rate"]) else np.nan
        rows.append(rec)
    out = pd.DataFrame(rows)
    if out.empty:  # no unit: the header alone, so readers see the columns
        names = ("c2i", "i2c", "flip_any") + tuple(_SEMANTIC)
        cols = (["layer_label", "layer_key", "neuron_id", "neuron", "neuron_key", "max_effect", "baseline_subset",
                 "n_eval"] + [f"{n}_count" for n in names] + [f"{n}_rate" for n in names]
                + ["flip_semantic_wrong_share"]
                + [f"{n}_pct" for n in ("c2i", "i2c", "flip_any", "semantic_wrong", "flip_semantic_wrong")])
        return pd.DataFrame(columns=cols)
    return out.sort_values(["flip_any_count", "flip_semantic_wrong_count", "c2i_count", "i2c_count", "neuron_key"],
                           ascending=[False, False, False, False, True], na_position="last",
                           kind="mergesort").reset_index(drop=True)


def flip_stats_global(df: pd.DataFrame, units: Sequence[Unit], by_neuron: pd.DataFrame) -> dict:
    """Sums of per-unit counts and row unions (rows flipped by ≥ 1 unit ÷ rows evaluated by ≥ 1 unit)."""
    out: dict = {"n_neurons": len(units), "n_evaluated_rows": 0}
    anym = np.column_stack([flip_flags(df, u.column("any")) for u in units]) if units else np.zeros((len(df), 0))
    evaluated = ~np.all(np.isnan(anym), axis=1) if units else np.zeros(len(df), bool)
    out["n_evaluated_rows"] = int(evaluated.sum())
    kinds = {"any": "flip_any", "c2i": "c2i", "i2c": "i2c", "semantic_wrong": "semantic_wrong",
             "flip_semantic_wrong": "flip_semantic_wrong", "flip_empty": "flip_empty", "flip_unparseable": "flip_unparseable"}
    for kind, count_name in kinds.items():
        col = by_neuron[f"{count_name}_count"] if not by_neuron.empty else pd.Series(dtype=float)
        out[f"sum_{count_name}_count"] = int(col.sum()) if len(col) and col.notna().any() else (0 if kind in ("any", "c2i", "i2c") else None)
        if kind in ("any", "c2i", "i2c"):
            mat = np.column_stack([flip_flags(df, u.column(kind)) for u in units]) if units else np.zeros((len(df), 0))
        else:
            mat = np.column_stack([flip_flags(df, f"{kind}_{u.neuron_key}") for u in units]) if units else np.zeros((len(df), 0))
        if mat.shape[1] and not np.isnan(mat).all():
            union = int(((np.nan_to_num(mat) > 0.5).any(axis=1) & evaluated).sum())
            out[f"union_{kind}_unique_count"] = union
            out[f"union_{kind}_unique_rate"] = union / out["n_evaluated_rows"] if out["n_evaluated_rows"] else None
        else:
            out[f"union_{kind}_unique_count"] = 0 if kind in ("any", "c2i", "i2c") else None
            out[f"union_{kind}_unique_rate"] = (0.0 if out["n_evaluated_rows"] else None) if kind in ("any", "c2i", "i2c") else None
    return out


def discovery_original_rows(path: str | Path) -> set[int]:
    """Stage-2 row numbers stage 6 sampled as discovery examples (`sampled_*_original_idx`) under a folder/zip."""
    p = Path(path)
    texts: list[str] = []
    pat = re.compile(r"(rule|cluster)_\d+\.json$")
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            texts = [zf.read(n).decode("utf-8") for n in zf.namelist() if pat.search(n)]
    elif p.is_dir():
        texts = [f.read_text(encoding="utf-8") for f in sorted(p.rglob("*.json")) if pat.search(f.name)]
    rows: set[int] = set()
    for t in texts:
        try:
            obj = json.loads(t)
        except json.JSONDecodeError:
            continue
        for k in ("sampled_associated_original_idx", "sampled_unrelated_original_idx"):
            rows.update(int(i) for i in obj.get(k) or [])
    return rows


def plot_flip_stats_top(by_neuron: pd.DataFrame, path: Path, k: int) -> None:
    """Diverging horizontal bars of the top-K units: c→i % to the left, i→c % to the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.core.files_and_cache import atomic_path

    top = by_neuron.head(k)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(top) + 1.2)))
    y = np.arange(len(top))[::-1]
    ax.barh(y, -top["c2i_pct"].fillna(0).to_numpy(), color="#c0392b", label="correct → incorrect (c2i)")
    ax.barh(y, top["i2c_pct"].fillna(0).to_numpy(), color="#2471a3", label="incorrect → correct (i2c)")
    ax.set_yticks(y)
    ax.set_yticklabels(top["neuron"].astype(str).tolist(), fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("flip rate over evaluated rows (%)")
    ax.set_title(f"Top {len(top)} units by flips (single-unit ablation)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="pdf")
    plt.close(fig)


def _plot_semantic(by_neuron: pd.DataFrame, path: Path, k: int) -> None:
    """All-flip % vs semantic-wrong-flip % of the top-K units (only when semantics were evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.core.files_and_cache import atomic_path

    top = by_neuron.head(k)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(top) + 1.2)))
    y = np.arange(len(top))[::-1]
    ax.barh(y + 0.2, top["flip_any_pct"].to_numpy(), height=0.4, label="any flip %")
    ax.barh(y - 0.2, top["flip_semantic_wrong_pct"].to_numpy(), height=0.4, label="semantic-wrong flip %")
    ax.set_yticks(y)
    ax.set_yticklabels(top["neuron"].astype(str).tolist(), fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="pdf")
    plt.close(fig)


def write_flip_stats(df: pd.DataFrame, units: Sequence[Unit], out_dir: Path, top_k: int = 50,
                     exclude_rows: set[int] | None = None) -> dict:
    """Write `flip_stats_by_neuron.csv`, `flip_stats_global.json`, `flip_stats_top{K}.pdf` (+ exclusion record)."""
    frame = df
    if exclude_rows is not None:
        orig = df["_orig_row"].to_numpy() if "_orig_row" in df.columns else np.arange(len(df))
        drop = np.isin(orig, sorted(exclude_rows))
        atomic_write_json(out_dir / "final_stats_exclusion.json",
                          {"n_rows_before": int(len(df)), "n_rows_excluded": int(drop.sum()),
                           "n_rows_after": int((~drop).sum()), "n_discovery_rows_known": len(exclude_rows)})
        frame = df[~drop].reset_index(drop=True)
    by_neuron = flip_stats_by_neuron(frame, units)
    write_csv_atomic(by_neuron, out_dir / "flip_stats_by_neuron.csv")
    glob = flip_stats_global(frame, units, by_neuron)
    atomic_write_json(out_dir / "flip_stats_global.json", glob)
    k = min(int(top_k), len(units))
    if k > 0:
        plot_flip_stats_top(by_neuron, out_dir / f"flip_stats_top{k}.pdf", k)
        if by_neuron["flip_semantic_wrong_count"].notna().any():
            _plot_semantic(by_neuron, out_dir / f"flip_semantic_wrong_top{k}.pdf", k)
    return glob
