"""Stage-7 evaluation rows (spec 7-11 §2.3): all rows, or a spectral sample of the prompts.

The spectral embedding comes from `lib.sampling.spectral` (representations cached per prompt under
a key of the model and the representation settings). k-center branch (`--global_n_clusters` > 0):
farthest-first clusters, one member nearest each center (largest clusters first), then a uniform
fill up to n = clamp(`--sampling_max_points`, ≥ `--sampling_min_points`, ≤ N). Greedy-cover branch:
a radius cover, nearest-center assignment in chunks, `--points_per_centroid` rows per center.
Test rows are not force-included; the split is stage 2's `is_test`.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import numpy as np
import pandas as pd

__all__ = ["select_eval_rows", "mark_rows", "nearest_center_assignment"]


def mark_rows(df: pd.DataFrame, picked: np.ndarray, centers: np.ndarray, keep_unsampled: bool) -> pd.DataFrame:
    """Output frame: picked rows (or all rows with masks) with `_orig_row`, `_sampled`, `_evaluated`, `_spectral_sampled_center`."""
    out = df.copy()
    out["_orig_row"] = np.arange(len(df))
    sampled = np.zeros(len(df), dtype=bool)
    sampled[picked] = True
    center = np.zeros(len(df), dtype=bool)
    center[centers] = True
    out["_sampled"] = sampled
    out["_evaluated"] = sampled
    out["_spectral_sampled_center"] = center
    if not keep_unsampled:
        out = out[sampled]
    return out.reset_index(drop=True)


def nearest_center_assignment(Z: np.ndarray, centers: np.ndarray, chunk: int) -> np.ndarray:
    """Index (into `centers`) of each row's nearest center, computed in row chunks."""
    C = np.asarray(Z[centers], dtype=np.float64)
    c_sq = np.einsum("ij,ij->i", C, C)
    out = np.empty(len(Z), dtype=np.int64)
    for s in range(0, len(Z), max(1, int(chunk))):
        X = np.asarray(Z[s:s + chunk], dtype=np.float64)
        d2 = np.einsum("ij,ij->i", X, X)[:, None] + c_sq[None, :] - 2.0 * X @ C.T
        out[s:s + len(X)] = np.argmin(d2, axis=1)
    return out


def _embedding(prompts: list[str], args: argparse.Namespace, get_model: Callable[[], Any], cache_dir: str) -> np.ndarray:
    """Spectral embedding Z of the prompts (representations cached per prompt)."""
    from lib.sampling.spectral import RepresentationSettings, compute_representations, spectral_embedding

    settings = RepresentationSettings.from_args(args)
    reps = compute_representations(get_model(), prompts, settings, batch_size=max(1, int(args.batch_size)),
                                   cache_dir=cache_dir, progress=not args.no_tqdm_batches)
    return spectral_embedding(reps, int(args.spectral_dim))


def select_eval_rows(df: pd.DataFrame, args: argparse.Namespace, prompt_col: str, get_model: Callable[[], Any],
                     cache_dir: str) -> tuple[pd.DataFrame, dict]:
    """(evaluation frame, sampling metadata) per the flags of spec §2.3."""
    n = len(df)
    if not args.use_spectral_sampling:
        return mark_rows(df, np.arange(n), np.zeros(0, dtype=np.int64), False), {"method": "all_rows", "n_rows": n}
    from lib.sampling.spectral import greedy_farthest_first_cover, kcenter_farthest_first, select_from_global_clusters

    Z = _embedding(df[prompt_col].astype(str).tolist(), args, get_model, cache_dir)
    rng = np.random.default_rng(int(args.seed))
    target = int(min(max(int(args.sampling_max_points), int(args.sampling_min_points)), n))
    meta: dict[str, Any] = {"n_rows": n, "target_n": target, "spectral_dim": int(args.spectral_dim)}
    if int(args.global_n_clusters) > 0:
        clusters = kcenter_farthest_first(Z, int(args.global_n_clusters), rng)
        picked, info = select_from_global_clusters(np.arange(n), target, clusters, Z, rng)
        centers = clusters.center_indices
        meta.update(method="kcenter", clusters=clusters.meta(), selection=info)
    else:
        centers_list, info = greedy_farthest_first_cover(Z, np.arange(n), float(args.coverage_radius),
                                                         int(args.sampling_max_points), int(args.sampling_min_points))
        centers = np.asarray(centers_list, dtype=np.int64)
        assign = nearest_center_assignment(Z, centers, int(args.sampling_chunk_size))
        picked_set: list[int] = []
        for c_ord, c in enumerate(centers):
            members = np.flatnonzero(assign == c_ord)
            k = min(int(args.points_per_centroid), len(members))
            if args.centroid_sampling_mode == "nearest":
                d2 = ((Z[members] - Z[c]) ** 2).sum(1)
                chosen = members[np.argsort(d2, kind="stable")[:k]]
            else:
                chosen = rng.choice(members, size=k, replace=False)
            picked_set.extend(int(i) for i in chosen)
        picked = sorted(set(picked_set))
        meta.update(method="greedy_cover", cover=info, n_centers=int(len(centers)))
    picked_arr = np.asarray(sorted(int(i) for i in picked), dtype=np.int64)
    meta["n_selected"] = int(len(picked_arr))
    return mark_rows(df, picked_arr, np.asarray(centers, dtype=np.int64), bool(args.keep_unsampled_rows)), meta
