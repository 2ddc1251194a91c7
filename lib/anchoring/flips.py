"""Stage-7 flip columns (spec 7-11 §2.4-2.5): ablate each unit alone on every evaluated row.

Units are evaluated through the stage-6 batched engine: the evaluated prompts are prefilled once
(decode-only: one shared KV cache per prompt chunk), then `neuron_batch_size` singleton groups are
handed to the engine per call, so one forward pass carries up to `batch_size` rows made of
`neuron_batch_size` units × `batch_size // neuron_batch_size` prompts. A row is a flip when the
ablated label differs from the recorded baseline label (`scores.csv[main metric] > 0.5`); rows
whose unablated engine answer does not reproduce the recorded label are left NA (not evaluated).

Caches are keyed by content, never by batch position: one file per unit maps the SHA-1 of each
prompt to its ablated answer, in a file whose name carries the key of every setting that changes
an answer (model, dtype, task, token budget, stop strings, phase, intervention and the identity of
the replacement values). Mean replacement values are cached under a key of the pool's prompts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lib.core.files_and_cache import ArtifactError, atomic_write_pickle, content_key, load_pickle
from lib.anchoring.units import Unit

__all__ = [
    "ABLATION_CACHE_SCHEMA",
    "policy_tag",
    "prompt_sha1",
    "mean_pool_prompts",
    "AblationContext",
    "cached_replacements",
    "compute_flip_columns",
    "flip_column_names",
    "recorded_labels",
]

ABLATION_CACHE_SCHEMA = 3


def policy_tag(main_metric: str, intervention: str, decode_only: bool, input_only: bool = False,
               last_pos_only: bool = False) -> str:
    """Sanitised `{main_metric}-{intervention}-{phase}[-last_pos_only]` (e.g. `is_correct_mean_positional_decode_only`)."""
    phase = "input_only" if input_only else "decode_only" if decode_only else "prefill_decode"
    raw = f"{main_metric}-{intervention}-{phase}" + ("-last_pos_only" if last_pos_only else "")
    return re.sub(r"[^0-9A-Za-z]+", "_", raw).strip("_")


def prompt_sha1(prompt: str) -> str:
    """Identity of one prompt in the ablation caches."""
    return hashlib.sha1(str(prompt).encode("utf-8")).hexdigest()


def mean_pool_prompts(train_prompts: Sequence[str], n_points: int, seed: int) -> list[str]:
    """Seeded sample (without replacement, in table order) of TRAIN prompts for mean replacement values."""
    n = min(int(n_points), len(train_prompts))
    if n < 1:
        raise ArtifactError("the mean-ablation pool is empty: the scores table has no TRAIN rows")
    pick = np.sort(np.random.default_rng(int(seed)).choice(len(train_prompts), size=n, replace=False))
    return [str(train_prompts[i]) for i in pick]


def flip_column_names(unit: Unit) -> tuple[str, str, str]:
    """(any, c2i, i2c) column names of a unit."""
    return unit.column("any"), unit.column("c2i"), unit.column("i2c")


@dataclass
class AblationContext:
    """Everything that decides an ablated answer, plus the lazily created engine."""

    ai_model: str
    task: Any
    task_module: str
    decode_only: bool
    intervention: str
    batch_size: int
    dtype: str
    load_model: Callable[[], Any]
    engine: Any = None

    def get_engine(self) -> Any:
        """The batched engine on the analysed model (loaded on first use)."""
        if self.engine is None:
            from lib.ablation.task_engine import engine_for_task

            self.engine = engine_for_task(self.load_model(), self.task, self.ai_model, self.batch_size,
                                          self.decode_only)
        return self.engine

    def answer_settings(self) -> dict:
        """Settings that change an unablated answer (model, dtype, task, decoding, phase)."""
        from lib.ablation.task_engine import decoding_settings

        return {"ai_model": self.ai_model, "dtype": self.dtype, "task_module": self.task_module,
                **decoding_settings(self.task, self.ai_model),
                "decode_only": bool(self.decode_only), "schema": ABLATION_CACHE_SCHEMA}


def cached_replacements(ctx: AblationContext, pool: Sequence[str], units: Sequence[Unit], cache_dir: Path,
                        progress: bool = True) -> tuple[Any, str]:
    """(ReplacementValues, key of their identity); mean tables are cached by pool content and layers."""
    from lib.ablation.engine import ReplacementValues
    from lib.ablation.interventions import estimate_replacements

    layers: dict[int, list[int]] = {}
    for u in units:
        layers.setdefault(u.layer, []).append(u.neuron_id)
    layers = {L: sorted(set(ids)) for L, ids in sorted(layers.items())}
    pool_key = content_key("pool", [prompt_sha1(p) for p in pool])
    ident = content_key(ctx.answer_settings(), ctx.intervention, pool_key)
    if ctx.intervention == "zero":
        return ReplacementValues("zero"), content_key("zero")
    donor = "donor" in ctx.intervention
    if donor:  # a donor value depends on the other candidates of its layer
        ident = content_key(ident, {str(L): ids for L, ids in layers.items()})
        values = estimate_replacements(ctx.get_engine(), list(pool), ctx.intervention, layers,
                                       progress=f"{ctx.intervention} values" if progress else False)
        return values, ident
    path = cache_dir / f"replacement_scores_{content_key(ident, sorted(layers))[:12]}.pkl"
    if path.is_file():
        try:
            obj = load_pickle(path, "replacement-value cache")
            if isinstance(obj, dict) and obj.get("ident") == ident and set(obj["means"]) >= set(layers):
                return ReplacementValues(ctx.intervention, {int(L): torch.from_numpy(v) for L, v in obj["means"].items()}), ident
        except ArtifactError:
            pass
    values = estimate_replacements(ctx.get_engine(), list(pool), ctx.intervention, layers,
                                   progress=f"{ctx.intervention} values" if progress else False)
    atomic_write_pickle(path, {"ident": ident, "intervention": ctx.intervention, "n_pool": len(pool),
                               "means": {int(L): t.numpy() for L, t in values.means.items()}})
    return values, ident


def _unit_cache_path(cache_dir: Path, name: str, key: str) -> Path:
    return cache_dir / f"{name}_{key[:16]}.pkl"


def _load_answers(path: Path, key: str) -> dict[str, str]:
    """Cached {prompt sha1: answer} of one unit (empty when absent, foreign or unreadable)."""
    if not path.is_file():
        return {}
    try:
        obj = load_pickle(path, "ablation cache")
    except ArtifactError:
        return {}
    if not isinstance(obj, dict) or obj.get("settings_key") != key or not isinstance(obj.get("answers"), dict):
        return {}
    return dict(obj["answers"])


def _save_answers(path: Path, key: str, unit: str, answers: dict[str, str]) -> None:
    atomic_write_pickle(path, {"cache_schema_version": ABLATION_CACHE_SCHEMA, "settings_key": key, "unit": unit,
                               "answers": answers})


def _generate(ctx: AblationContext, prompts: list[str], groups: list[dict | None], repl: Any,
              neuron_batch_size: int, prepared_cache: dict, progress: bool) -> list[list[str]]:
    """Answers [group][prompt]; prompts are prefilled once in chunks sized so a pass holds whole unit batches."""
    eng = ctx.get_engine()
    chunk = max(1, ctx.batch_size // max(1, neuron_batch_size))
    if "chunks" not in prepared_cache or prepared_cache.get("prompts") != prompts or prepared_cache.get("size") != chunk:
        prepared_cache.clear()
        prepared_cache.update(prompts=prompts, size=chunk,
                              chunks=[(s, eng.prepare(prompts[s:s + chunk])) for s in range(0, len(prompts), chunk)])
    out: list[list[str]] = [[""] * len(prompts) for _ in groups]
    for start, prep in prepared_cache["chunks"]:
        ans = eng.generate(prep, groups, repl, progress=False)
        for g, row in enumerate(ans):
            out[g][start:start + len(row)] = row
    return out


def compute_flip_columns(frame: pd.DataFrame, units: Sequence[Unit], prompt_col: str, main_metric: str,
                         ctx: AblationContext, repl_values: Any, repl_ident: str, cache_dir: Path,
                         neuron_batch_size: int = 4, progress: bool = True,
                         echo: Callable[[str], None] = print) -> tuple[pd.DataFrame, dict]:
    """(flip columns aligned with `frame`, report); evaluates only rows with `_evaluated` true."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    evaluated = frame["_evaluated"].to_numpy(dtype=bool) if "_evaluated" in frame.columns else np.ones(len(frame), bool)
    idx = np.flatnonzero(evaluated)
    prompts_all = frame[prompt_col].astype(str).tolist()
    rows_all = frame.to_dict("records")
    uniq = list(dict.fromkeys(prompts_all[i] for i in idx))
    keys = {p: prompt_sha1(p) for p in uniq}
    base_key = content_key(ctx.answer_settings(), "unablated")
    nbs = max(1, int(neuron_batch_size))
    prepared: dict = {}
    stats = {"n_units": len(units), "n_rows": int(len(frame)), "n_evaluated_rows": int(len(idx)),
             "n_unit_generations": 0, "n_units_from_cache": 0}

    # unablated engine answers (shared by every intervention)
    bpath = _unit_cache_path(cache_dir, "unablated", base_key)
    base_ans = _load_answers(bpath, base_key)
    todo = [p for p in uniq if keys[p] not in base_ans]
    if todo:
        ans = _generate(ctx, todo, [None], None, 1, {}, progress)[0]
        base_ans.update({keys[p]: a for p, a in zip(todo, ans)})
        _save_answers(bpath, base_key, "unablated", base_ans)

    def unit_key(u: Unit) -> str:
        return content_key(ctx.answer_settings(), ctx.intervention, repl_ident, u.layer, u.neuron_id)

    answers: dict[str, dict[str, str]] = {}
    missing: list[Unit] = []
    for u in units:
        k = unit_key(u)
        got = _load_answers(_unit_cache_path(cache_dir, u.neuron_key, k), k)
        answers[u.neuron_key] = got
        if any(keys[p] not in got for p in uniq):
            missing.append(u)
        else:
            stats["n_units_from_cache"] += 1
    if missing:
        echo(f"[stage7] ablating {len(missing)} unit(s) on {len(uniq)} prompt(s) "
             f"({nbs} unit(s) × {max(1, ctx.batch_size // nbs)} prompt(s) per forward pass)")
    bar = tqdm(total=len(missing), desc="units", unit="unit", disable=not progress or not missing, dynamic_ncols=True)
    for s in range(0, len(missing), nbs):
        batch = missing[s:s + nbs]
        todo = sorted({p for u in batch for p in uniq if keys[p] not in answers[u.neuron_key]}, key=uniq.index)
        groups = [{u.layer: [u.neuron_id]} for u in batch]
        ans = _generate(ctx, todo, groups, repl_values, nbs, prepared, progress)
        for u, row in zip(batch, ans):
            got = answers[u.neuron_key]
            got.update({keys[p]: a for p, a in zip(todo, row)})
            _save_answers(_unit_cache_path(cache_dir, u.neuron_key, unit_key(u)), unit_key(u), u.key, got)
        stats["n_unit_generations"] += len(batch) * len(todo)
        bar.update(len(batch))
    bar.close()

    task = ctx.task
    recorded = recorded_labels(frame, main_metric)
    sub_rows = [rows_all[i] for i in idx]
    engine_base = np.asarray(task.is_answer_positive(sub_rows, [base_ans[keys[prompts_all[i]]] for i in idx]), bool)
    ok = engine_base == recorded[idx]
    stats["n_baseline_mismatch"] = int((~ok).sum())
    stats["baseline_mismatch_rows"] = [int(i) for i in idx[~ok]][:200]
    cols: dict[str, pd.Series] = {}
    base_sub = recorded[idx]
    for u in units:
        abl = np.asarray(task.is_answer_positive(sub_rows, [answers[u.neuron_key][keys[prompts_all[i]]] for i in idx]), bool)
        for name, vals in zip(flip_column_names(u), (abl != base_sub, base_sub & ~abl, ~base_sub & abl)):
            col = pd.array([pd.NA] * len(frame), dtype="boolean")
            col[idx[ok]] = vals[ok]
            cols[name] = pd.Series(col, index=frame.index)
    return pd.DataFrame(cols, index=frame.index), stats


def recorded_labels(frame: pd.DataFrame, main_metric: str) -> np.ndarray:
    """Recorded baseline label per row: main metric > 0.5 (booleans and 'True'/'False' strings accepted)."""
    if main_metric not in frame.columns:
        raise ArtifactError(f"the scores table has no main-metric column '{main_metric}'")
    s = frame[main_metric]
    if s.dtype == object:
        s = s.map(lambda v: {"true": 1.0, "false": 0.0}.get(str(v).strip().lower(), v))
    vals = pd.to_numeric(s.astype("float64") if s.dtype == bool else s, errors="coerce")
    if vals.isna().any():
        raise ArtifactError(f"main-metric column '{main_metric}' has missing or non-numeric values")
    return (vals.to_numpy(dtype=float) > 0.5)
