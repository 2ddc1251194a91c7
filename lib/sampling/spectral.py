"""Stage 4 building blocks: prompt representations, spectral embedding, k-center clusters,
per-rule coverage picks, length-tolerant nearest-neighbour pairing and distance statistics.

Representations are read through the analysed model's TransformerLens 4 bridge at
`--rep_hook_name` (or its logits) and pooled over real tokens; they are cached per prompt in a
content-keyed `DiskCache` whose key holds every setting that changes a vector. All randomness
comes from `numpy.random.Generator`s the caller passes in, so a seed fixes every pick.
"""

from __future__ import annotations

import argparse
import copy
import difflib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lib.core.files_and_cache import ArtifactError, DiskCache, content_key
from lib.core.errors import UsageError
from lib.core.choices import REP_POOLINGS, SPECTRAL_SPACES

__all__ = [
    "SPECTRAL_SPACES",
    "REP_POOLINGS",
    "DEFAULT_REP_HOOK",
    "SPECTRAL_HELP",
    "PAIR_CHUNK",
    "ASSIGNMENT_LABELS",
    "REPS_CACHE_NAMESPACE",
    "add_spectral_arguments",
    "check_spectral_arguments",
    "RepresentationSettings",
    "model_identity",
    "representation_cache_key",
    "validate_hook_name",
    "tokenize_for_representations",
    "compute_representations",
    "l2_normalize_rows",
    "spectral_embedding",
    "KCenterResult",
    "kcenter_farthest_first",
    "select_from_global_clusters",
    "greedy_farthest_first_cover",
    "select_random",
    "token_lengths",
    "nearest_targets",
    "sample_len_tolerant_pairs",
    "distance_summary",
    "cover_stats",
    "check_pair_metric",
]

DEFAULT_REP_HOOK = "ln_final.hook_normalized"
PAIR_CHUNK = 4096  # target rows per distance block in NN pairing (spec §5)
CDIST_NAN = 1e30  # a NaN SciPy distance counts as "very far" (spec §5)
QUANTILES = (50, 90, 95, 99)
TOP_CLUSTERS = 5
ASSIGNMENT_LABELS = {1: "length-matched + unique", 2: "length-matched", 3: "unique", 4: "any"}
REPS_CACHE_NAMESPACE = "spectral_reps"
_CACHE_FORMAT = "mecharule-spectral-reps-v1"


# ---------------------------------------------------------------------------------------------
# Flags shared by stages 4, 5 and 6


SPECTRAL_HELP = {
    "spectral_space": "representation space: a hooked activation (hidden) or the logits",
    "rep_hook_name": "TransformerLens hook read in the hidden space (e.g. ln_final.hook_normalized, "
                     "ln_final.hook_out, blocks.12.hook_resid_post)",
    "rep_pooling": "pool token vectors: last real token or mean over real tokens",
    "max_seq_len": "keep only the last N prompt tokens for representations (left truncation)",
    "spectral_dim": "PCA components of the spectral embedding",
    "spectral_cache_dir": "folder for the per-prompt representation cache (none: no cache)",
}
"""Help of the six representation flags (the stage configs and `add_spectral_arguments` share it)."""


def add_spectral_arguments(parser: argparse.ArgumentParser) -> None:
    """The six representation flags shared by stages 4–6 (names and defaults of spec §2.1)."""
    h = SPECTRAL_HELP
    parser.add_argument("--spectral_space", choices=SPECTRAL_SPACES, default="hidden", help=h["spectral_space"])
    parser.add_argument("--rep_hook_name", default=DEFAULT_REP_HOOK, help=h["rep_hook_name"])
    parser.add_argument("--rep_pooling", choices=REP_POOLINGS, default="mean", help=h["rep_pooling"])
    parser.add_argument("--max_seq_len", type=int, default=None, help=h["max_seq_len"])
    parser.add_argument("--spectral_dim", type=int, default=16, help=h["spectral_dim"])
    parser.add_argument("--spectral_cache_dir", default=None, help=h["spectral_cache_dir"])


def check_spectral_arguments(args: argparse.Namespace) -> None:
    """Reject spectral flag values that cannot work, naming the flag."""
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise UsageError(f"--max_seq_len must be >= 1 (or omitted), got {args.max_seq_len}")
    if args.spectral_dim < 1:
        raise UsageError(f"--spectral_dim must be >= 1, got {args.spectral_dim}")
    if not str(args.rep_hook_name).strip():
        raise UsageError("--rep_hook_name is empty")


# ---------------------------------------------------------------------------------------------
# Representations


@dataclass(frozen=True)
class RepresentationSettings:
    """Everything besides the model and the prompt that changes a representation vector."""

    spectral_space: str = "hidden"
    rep_hook_name: str = DEFAULT_REP_HOOK
    rep_pooling: str = "mean"
    max_seq_len: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RepresentationSettings":
        """Settings from parsed `add_spectral_arguments` flags."""
        return cls(args.spectral_space, args.rep_hook_name, args.rep_pooling, args.max_seq_len)

    def __post_init__(self) -> None:
        if self.spectral_space not in SPECTRAL_SPACES:
            raise UsageError(f"--spectral_space must be one of {', '.join(SPECTRAL_SPACES)}, not '{self.spectral_space}'")
        if self.rep_pooling not in REP_POOLINGS:
            raise UsageError(f"--rep_pooling must be one of {', '.join(REP_POOLINGS)}, not '{self.rep_pooling}'")

    def key_parts(self) -> dict:
        """Cache-key view: the hook only matters in the hidden space."""
        return {"spectral_space": self.spectral_space,
                "rep_hook_name": self.rep_hook_name if self.spectral_space == "hidden" else None,
                "rep_pooling": self.rep_pooling, "max_seq_len": self.max_seq_len}


def model_identity(model: Any) -> dict:
    """Machine-independent identity of a `LoadedModel` (alias/id, revision, dtype, shape)."""
    cfg = model.hf_model.config
    return {"ai_model": str(model.spec), "kind": str(model.source.kind), "revision": model.source.revision,
            "dtype": str(model.dtype), "architectures": list(getattr(cfg, "architectures", None) or []),
            "n_layers": int(getattr(cfg, "num_hidden_layers", 0) or 0),
            "d_model": int(getattr(cfg, "hidden_size", 0) or 0),
            "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0)}


def representation_cache_key(identity: dict, settings: RepresentationSettings, prompt: str) -> str:
    """Content key of one prompt's vector under one model and one set of settings."""
    return content_key(_CACHE_FORMAT, identity, settings.key_parts(), str(prompt))


def validate_hook_name(bridge: Any, hook_name: str) -> None:
    """Raise a UsageError listing close and typical hook names when `hook_name` is not a hook."""
    names = list(getattr(bridge, "hook_dict", {}) or {})
    if hook_name in names:
        return
    close = difflib.get_close_matches(hook_name, names, n=5, cutoff=0.6)
    typical = [n for n in ("ln_final.hook_normalized", "ln_final.hook_out", "blocks.0.hook_resid_post",
                           "blocks.0.hook_mlp_out", "hook_embed") if n in names]
    hint = f"close names: {', '.join(close)}; " if close else ""
    raise UsageError(f"--rep_hook_name '{hook_name}' is not a hook of the analysed model ({len(names)} hooks); "
                     f"{hint}valid names include {', '.join(typical or names[:5])}")


def tokenize_for_representations(tokenizer: Any, prompts: Sequence[str], max_seq_len: int | None) -> list[list[int]]:
    """Token ids with the tokenizer's default special tokens, left-truncated to `max_seq_len`."""
    ids = tokenizer([str(p) for p in prompts], add_special_tokens=True)["input_ids"]
    out = []
    for i, row in enumerate(ids):
        row = list(row)
        if max_seq_len is not None:
            row = row[-max_seq_len:]
        if not row:
            raise ArtifactError(f"prompt {i} ({str(prompts[i])[:40]!r}) has no tokens; cannot represent it")
        out.append(row)
    return out


def _pool(acts: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B,T,...] activations → [B,D] fp32: last real token or mean over real tokens."""
    acts = acts.reshape(acts.shape[0], acts.shape[1], -1).float()
    if pooling == "last":
        return acts[torch.arange(acts.shape[0], device=acts.device), lengths - 1]
    mask = (torch.arange(acts.shape[1], device=acts.device)[None, :] < lengths[:, None]).to(acts.dtype)
    return (acts * mask[..., None]).sum(1) / lengths[:, None].to(acts.dtype)


class _HookCaptured(Exception):
    """Raised by the capture hook to end the forward pass once the wanted activation exists."""


def _capture_hook(bridge: Any, ids: torch.Tensor, mask: torch.Tensor, hook_name: str, **kwargs: Any) -> torch.Tensor:
    """Activation at `hook_name`; the forward stops there (later layers and the unembedding are skipped)."""
    store: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any = None) -> None:
        store["act"] = act.detach().clone()
        raise _HookCaptured

    with bridge.hooks(fwd_hooks=[(hook_name, grab)]):
        try:
            bridge(ids, attention_mask=mask, return_type="logits", **kwargs)
        except _HookCaptured:
            pass
    if "act" not in store:
        raise UsageError(f"--rep_hook_name '{hook_name}' never fired in a forward pass of the analysed model; "
                         "choose a hook on the residual path such as ln_final.hook_normalized")
    return store["act"]


@dataclass
class _SharedPrefix:
    """Tokens every prompt starts with (a few-shot block), run once: its KV cache and the sum of
    its activations at the representation hook (for mean pooling)."""

    length: int
    cache: Any
    act_sum: torch.Tensor  # [D] fp32


def _shared_prefix(model: Any, rows: list[list[int]], settings: RepresentationSettings) -> _SharedPrefix | None:
    """The prompts' common prefix, prefilled once; None when there is none or the hook is not a
    `[batch, position, ...]` activation of the residual path (then every prompt runs whole)."""
    from transformers import DynamicCache

    from lib.models.generation import shared_prefix_length

    n = shared_prefix_length(rows) if settings.spectral_space == "hidden" and len(rows) > 1 else 0
    if n < 1:
        return None
    store: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any = None) -> None:
        store["act"] = act.detach().clone()

    cache = DynamicCache()
    ids = torch.tensor([rows[0][:n]], dtype=torch.long, device=model.device)
    with torch.inference_mode(), model.bridge.hooks(fwd_hooks=[(settings.rep_hook_name, grab)]):
        model.bridge(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    act = store.get("act")
    if act is None or act.ndim < 2 or tuple(act.shape[:2]) != (1, n):
        return None
    return _SharedPrefix(n, cache, act.reshape(1, n, -1)[0].float().sum(0))


def _forward_batch(model: Any, rows: list[list[int]], settings: RepresentationSettings,
                   prefix: _SharedPrefix | None = None) -> torch.Tensor:
    """Pooled vectors of one right-padded batch (causal attention: pads never reach real tokens).

    With `prefix`, only the tokens after it run, on a copy of its KV cache; mean pooling adds the
    prefix's activation sum, so the vectors are those of the whole prompts."""
    n = prefix.length if prefix is not None else 0
    rows = [r[n:] for r in rows]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    lengths = mask.sum(1)
    kwargs: dict[str, Any] = {}
    if prefix is not None:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(len(rows))
        full_mask = torch.cat([torch.ones((len(rows), n), dtype=mask.dtype, device=mask.device), mask], dim=1)
        positions = (n + torch.arange(T, device=mask.device))[None, :].expand(len(rows), T)
        kwargs = dict(past_key_values=cache, use_cache=True, position_ids=positions)
    else:
        full_mask = mask
    with torch.inference_mode():
        if settings.spectral_space == "logits":
            acts = model.bridge(ids, attention_mask=mask, return_type="logits")
        else:
            acts = _capture_hook(model.bridge, ids, full_mask, settings.rep_hook_name, **kwargs)
        if acts.ndim < 2 or tuple(acts.shape[:2]) != (len(rows), T):
            raise UsageError(f"--rep_hook_name '{settings.rep_hook_name}' gives activations of shape "
                             f"{tuple(acts.shape)}; representations need [batch, position, ...]")
        pooled = _pool(acts, lengths, settings.rep_pooling)
        if prefix is not None and settings.rep_pooling == "mean":
            pooled = (pooled * lengths[:, None] + prefix.act_sum.to(pooled.device)) / (lengths[:, None] + n)
        return pooled.cpu()


def compute_representations(model: Any, prompts: Sequence[str], settings: RepresentationSettings,
                            batch_size: int = 16, cache_dir: str | None = None,
                            progress: bool = True, share_prefix: bool = True) -> np.ndarray:
    """`[N, D]` fp32 pooled vectors of `prompts`; cached per prompt, only missing ones computed.

    A token prefix common to all missing prompts (a few-shot block) runs once (`share_prefix`)."""
    if settings.spectral_space == "hidden":
        validate_hook_name(model.bridge, settings.rep_hook_name)
    if batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {batch_size}")
    identity = model_identity(model)
    keys = [representation_cache_key(identity, settings, p) for p in prompts]
    cache = DiskCache(cache_dir, REPS_CACHE_NAMESPACE) if cache_dir else None
    found: dict[str, np.ndarray] = {}
    todo: dict[str, str] = {}
    for key, prompt in zip(keys, prompts):
        if key in found or key in todo:
            continue
        hit = cache.get(key) if cache is not None else None
        if isinstance(hit, np.ndarray):
            found[key] = hit
        else:
            todo[key] = str(prompt)
    if todo:
        todo_keys = list(todo)
        rows = tokenize_for_representations(model.tokenizer, [todo[k] for k in todo_keys], settings.max_seq_len)
        if settings.max_seq_len is None and max(len(r) for r in rows) > model.n_ctx:
            raise UsageError(f"a prompt has {max(len(r) for r in rows)} tokens, more than the model's context "
                             f"{model.n_ctx}; pass --max_seq_len")
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
        prefix = _shared_prefix(model, rows, settings) if share_prefix else None
        bar = tqdm(total=len(order), desc="representations", unit="prompt", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            vecs = _forward_batch(model, [rows[i] for i in chunk], settings, prefix).numpy().astype(np.float32)
            for i, v in zip(chunk, vecs):
                found[todo_keys[i]] = v.copy()
                if cache is not None:
                    cache.put(todo_keys[i], found[todo_keys[i]])
            bar.update(len(chunk))
        bar.close()
    return np.stack([found[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------------------------------------
# Spectral embedding and k-center clusters


def l2_normalize_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows stay zero."""
    X = np.array(X, dtype=np.float64, copy=True)
    norms = np.linalg.norm(X, axis=1)
    nz = norms > 0
    X[nz] /= norms[nz, None]
    return X


def spectral_embedding(reps: np.ndarray, dim: int) -> np.ndarray:
    """PCA to min(dim, D, N) centred components (full SVD, no whitening), then unit rows: fp32 `Z`."""
    from sklearn.decomposition import PCA

    reps = np.asarray(reps, dtype=np.float64)
    if reps.ndim != 2 or reps.shape[0] == 0:
        raise ValueError(f"spectral_embedding needs a non-empty [N, D] matrix, got shape {reps.shape}")
    k = max(1, min(int(dim), reps.shape[0], reps.shape[1]))
    if reps.shape[0] == 1:
        return l2_normalize_rows(np.zeros((1, k))).astype(np.float32)
    Y = PCA(n_components=k, svd_solver="full", whiten=False).fit_transform(reps)
    return l2_normalize_rows(Y).astype(np.float32)


def _sq_dist_to(X: np.ndarray, sq: np.ndarray, j: int) -> np.ndarray:
    """Squared distances of every row of X to row j by expansion, clamped at 0 (spec note 11)."""
    d2 = sq + sq[j] - 2.0 * (X @ X[j])
    np.maximum(d2, 0.0, out=d2)
    d2[j] = 0.0
    return d2


@dataclass
class KCenterResult:
    """Farthest-first k-center: centers, each row's nearest center ordinal and squared distance."""

    center_indices: np.ndarray
    assignment: np.ndarray
    nn_dist2: np.ndarray

    @property
    def radius(self) -> float:
        return float(np.sqrt(self.nn_dist2.max())) if len(self.nn_dist2) else 0.0

    def meta(self) -> dict:
        """`global_clusters` block of the plan JSON (spec §2.8)."""
        sizes = np.bincount(self.assignment, minlength=len(self.center_indices))
        return {"method": "kcenter_farthest_first", "n_clusters": int(len(self.center_indices)),
                "center_indices": [int(i) for i in self.center_indices],
                "achieved_cover_radius_l2": self.radius,
                "mean_nn_radius_l2": float(np.sqrt(self.nn_dist2).mean()) if len(self.nn_dist2) else 0.0,
                "cluster_sizes": [int(s) for s in sizes]}


def kcenter_farthest_first(Z: np.ndarray, K: int, rng: np.random.Generator) -> KCenterResult:
    """Gonzalez k-center (2-approximation of the optimal radius): random first, then farthest points."""
    X = np.asarray(Z, dtype=np.float64)
    N = len(X)
    if N == 0:
        raise ValueError("k-center clustering needs at least one row")
    K = int(min(max(int(K), 1), N))
    sq = np.einsum("ij,ij->i", X, X)
    first = int(rng.integers(N))
    centers = [first]
    is_center = np.zeros(N, dtype=bool)
    is_center[first] = True
    d2 = _sq_dist_to(X, sq, first)
    assign = np.zeros(N, dtype=np.int64)
    for k in range(1, K):
        j = int(np.argmax(np.where(is_center, -1.0, d2)))
        centers.append(j)
        is_center[j] = True
        nd = _sq_dist_to(X, sq, j)
        better = nd < d2
        better[j] = True
        d2[better] = nd[better]
        assign[better] = k
    return KCenterResult(np.asarray(centers, dtype=np.int64), assign, d2)


# ---------------------------------------------------------------------------------------------
# Per-rule coverage picks (spec §2.5 step 4)


def select_from_global_clusters(group: Sequence[int], target_n: int, clusters: KCenterResult, Z: np.ndarray,
                                rng: np.random.Generator) -> tuple[list[int], dict]:
    """One member nearest each global center (largest clusters first), then a uniform random fill."""
    group = np.asarray(group, dtype=np.int64)
    if len(group) == 0 or target_n <= 0:
        return [], {"status": "empty"}
    if target_n >= len(group):
        return [int(i) for i in group], {"status": "all", "n_selected": int(len(group))}
    labels = clusters.assignment[group]
    uniq, counts = np.unique(labels, return_counts=True)
    order = uniq[np.argsort(-counts, kind="stable")]
    picked: list[int] = []
    for c in order:
        if len(picked) >= target_n:
            break
        members = group[labels == c]
        center = np.asarray(Z[clusters.center_indices[c]], dtype=np.float64)
        d2 = ((np.asarray(Z[members], dtype=np.float64) - center) ** 2).sum(1)
        picked.append(int(members[int(np.argmin(d2))]))
    taken = set(picked)
    rest = np.asarray([i for i in group if int(i) not in taken], dtype=np.int64)
    need = target_n - len(picked)
    fill = [int(i) for i in rng.choice(rest, size=need, replace=False)] if need > 0 else []
    meta = {"status": "ok", "n_selected": int(target_n), "n_group": int(len(group)),
            "n_clusters_in_group": int(len(uniq)), "strategy": "1_per_cluster_medoid_then_fill"}
    return picked + fill, meta


def greedy_farthest_first_cover(Z: np.ndarray, group: Sequence[int], radius: float, max_points: int,
                                min_points: int) -> tuple[list[int], dict]:
    """Farthest-first cover of `group` from its largest-norm row until radius/max, then top up to min."""
    group = np.asarray(group, dtype=np.int64)
    n = len(group)
    meta: dict[str, Any] = {"n_available": int(n), "radius": float(radius), "max_points": int(max_points),
                            "min_points": int(min_points)}
    if n <= max_points:
        meta.update(stopped_reason="all_points_selected_small_group", farthest_dist_when_stopped=0.0,
                    n_selected_before_min_fill=int(n))
        return [int(i) for i in group], meta
    X = np.asarray(Z[group], dtype=np.float64)
    sq = np.einsum("ij,ij->i", X, X)
    start = int(np.argmax(sq))
    chosen = [start]
    taken = np.zeros(n, dtype=bool)
    taken[start] = True
    d = np.sqrt(_sq_dist_to(X, sq, start))

    def farthest() -> tuple[int, float]:
        masked = np.where(taken, -np.inf, d)
        j = int(np.argmax(masked))
        return j, float(masked[j])

    def add(j: int) -> None:
        chosen.append(j)
        taken[j] = True
        np.minimum(d, np.sqrt(_sq_dist_to(X, sq, j)), out=d)

    reason, far = "unknown", 0.0
    while True:
        if taken.all():
            reason, far = "all_points_selected", 0.0
            break
        j, far = farthest()
        if len(chosen) >= max_points:
            reason = "max_points_reached"
            break
        if far <= radius:
            reason = "radius_satisfied"
            break
        add(j)
    n_before = len(chosen)
    while len(chosen) < min(min_points, n):
        add(farthest()[0])
    if len(chosen) > n_before:
        reason = "min_points_filled"
    meta.update(stopped_reason=reason, farthest_dist_when_stopped=far, n_selected_before_min_fill=int(n_before))
    return [int(group[j]) for j in chosen], meta


def select_random(group: Sequence[int], target_n: int, rng: np.random.Generator) -> tuple[list[int], dict]:
    """Uniform pick without replacement (the `--selection random` control plans)."""
    group = np.asarray(group, dtype=np.int64)
    n = int(min(max(target_n, 0), len(group)))
    picked = [int(i) for i in rng.choice(group, size=n, replace=False)] if n else []
    return picked, {"status": "random", "n_selected": n, "n_group": int(len(group))}


# ---------------------------------------------------------------------------------------------
# Length-tolerant nearest-neighbour pairing (spec §2.6)


def token_lengths(tokenizer: Any, prompts: Sequence[str]) -> np.ndarray:
    """Token count of each prompt without special tokens (word count when no tokenizer)."""
    if tokenizer is None:
        return np.asarray([len(str(p).split()) for p in prompts], dtype=np.int64)
    if not len(prompts):
        return np.zeros(0, dtype=np.int64)
    ids = tokenizer([str(p) for p in prompts], add_special_tokens=False)["input_ids"]
    return np.asarray([len(r) for r in ids], dtype=np.int64)


def check_pair_metric(metric: str) -> None:
    """UsageError unless `metric` is cosine, euclidean or a SciPy `cdist` metric."""
    if metric in ("cosine", "euclidean"):
        return
    from scipy.spatial.distance import cdist

    try:
        cdist(np.asarray([[0.0, 1.0], [1.0, 0.5]]), np.asarray([[1.0, 0.0], [0.5, 0.5]]), metric=metric)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--pair_similarity_metric '{metric}' is not a SciPy cdist metric ({exc})") from None


def _block_distances(S: np.ndarray, T: np.ndarray, metric: str, s_sq: np.ndarray | None,
                     t_sq: np.ndarray | None) -> np.ndarray:
    """[S, C] comparable distances: 1 − cos, squared euclidean (clamped), or SciPy cdist."""
    if metric == "cosine":
        return 1.0 - S @ T.T
    if metric == "euclidean":
        d2 = s_sq[:, None] + t_sq[None, :] - 2.0 * (S @ T.T)
        return np.maximum(d2, 0.0)
    from scipy.spatial.distance import cdist

    d = cdist(S, T, metric=metric)
    return np.where(np.isnan(d), CDIST_NAN, d)


def nearest_targets(src_vecs: np.ndarray, tgt_vecs: np.ndarray, src_len: np.ndarray, tgt_len: np.ndarray,
                    len_tolerance: int, metric: str = "cosine",
                    chunk: int = PAIR_CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per source: best target overall and best within |Δlen| ≤ τ (−1 if none), with distances."""
    S = np.asarray(src_vecs, dtype=np.float64)
    T = np.asarray(tgt_vecs, dtype=np.float64)
    if metric == "cosine":
        S, T = l2_normalize_rows(S), l2_normalize_rows(T)
    s_sq = np.einsum("ij,ij->i", S, S)
    t_sq = np.einsum("ij,ij->i", T, T)
    n = len(S)
    best_all, dist_all = np.full(n, -1, np.int64), np.full(n, np.inf)
    best_len, dist_len = np.full(n, -1, np.int64), np.full(n, np.inf)
    full = metric not in ("cosine", "euclidean")
    step = len(T) if full else max(1, int(chunk))
    rows = np.arange(n)
    src_len = np.asarray(src_len, dtype=np.int64)
    tgt_len = np.asarray(tgt_len, dtype=np.int64)
    for start in range(0, len(T), step):
        D = _block_distances(S, T[start : start + step], metric, s_sq, t_sq[start : start + step])
        j = np.argmin(D, axis=1)
        v = D[rows, j]
        upd = v < dist_all
        best_all[upd], dist_all[upd] = j[upd] + start, v[upd]
        ok = np.abs(tgt_len[None, start : start + step] - src_len[:, None]) <= len_tolerance
        Dm = np.where(ok, D, np.inf)
        j = np.argmin(Dm, axis=1)
        v = Dm[rows, j]
        upd = v < dist_len
        best_len[upd], dist_len[upd] = j[upd] + start, v[upd]
    if metric == "euclidean":
        dist_all, dist_len = np.sqrt(dist_all), np.sqrt(dist_len)
    return best_all, dist_all, best_len, dist_len


def sample_len_tolerant_pairs(source_idx: Sequence[int], target_idx: Sequence[int], vectors: np.ndarray,
                              lengths: np.ndarray, len_tolerance: int, metric: str, rng: np.random.Generator,
                              k: int | None = None, chunk: int = PAIR_CHUNK) -> tuple[list[int], list[int], dict]:
    """Greedy NN pairing with replacement, preferring targets within `len_tolerance` tokens.

    Returns (sources, matched targets, pairing_meta) in source order; labels record whether a
    target was length-matched and whether it was still unused when its source was visited.
    """
    sources = np.asarray(source_idx, dtype=np.int64)
    targets = np.asarray(target_idx, dtype=np.int64)
    if k is not None:
        if k > len(sources):
            raise ValueError(f"cannot sample {k} pair sources from {len(sources)}")
        sources = sources[np.sort(rng.choice(len(sources), size=k, replace=False))]
    if len(sources) == 0 or len(targets) == 0:
        raise ValueError(f"pairing needs sources and targets (got {len(sources)} and {len(targets)})")
    lengths = np.asarray(lengths, dtype=np.int64)
    b_all, d_all, b_len, d_len = nearest_targets(vectors[sources], vectors[targets], lengths[sources],
                                                 lengths[targets], len_tolerance, metric, chunk)
    uses: Counter = Counter()
    records: list[dict | None] = [None] * len(sources)
    for i in rng.permutation(len(sources)):
        matched = bool(b_len[i] >= 0)
        t = int(targets[b_len[i]] if matched else targets[b_all[i]])
        dist = float(d_len[i] if matched else d_all[i])
        prior = uses[t]
        unique = prior == 0
        pass_no = (1 if unique else 2) if matched else (3 if unique else 4)
        s = int(sources[i])
        records[i] = {"source_idx": s, "target_idx": t, "source_len": int(lengths[s]), "target_len": int(lengths[t]),
                      "len_diff": int(lengths[t] - lengths[s]), "distance": dist, "assignment_pass": pass_no,
                      "len_matched": matched, "reuse_count": int(prior), "is_unique_target": unique,
                      "assignment_label": ASSIGNMENT_LABELS[pass_no]}
        uses[t] += 1
    pass_counts = Counter(r["assignment_pass"] for r in records)
    meta = {"n_source": int(len(sources)), "n_target": int(len(targets)), "k": k,
            "len_tolerance": int(len_tolerance), "metric": metric, "unique_target_used": int(len(uses)),
            "target_reused_count": int(len(sources) - len(uses)),
            "len_matched_count": int(sum(r["len_matched"] for r in records)),
            "assignment_pass_counts": {ASSIGNMENT_LABELS[p]: int(pass_counts.get(p, 0)) for p in ASSIGNMENT_LABELS},
            "pair_meta": records}
    return [r["source_idx"] for r in records], [r["target_idx"] for r in records], meta


# ---------------------------------------------------------------------------------------------
# Statistics (spec §2.7)


def distance_summary(values: Sequence[float] | np.ndarray, sample_size: int, rng: np.random.Generator) -> dict:
    """Exact min/mean/std/max and p50/p90/p95/p99 (on a random subsample above `sample_size`)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return {}
    out: dict[str, Any] = {"min": float(v.min()), "mean": float(v.mean()), "std": float(v.std()),
                           "max": float(v.max())}
    approx = sample_size > 0 and v.size > sample_size
    s = rng.choice(v, size=int(sample_size), replace=False) if approx else v
    out["quantiles_approx"] = bool(approx)
    out["quantiles_sample_size"] = int(s.size)
    for q in QUANTILES:
        out[f"p{q}"] = float(np.percentile(s, q))
    return out


def cover_stats(Z: np.ndarray, group: Sequence[int], centers: Sequence[int], radius: float, chunk_size: int,
                sample_size: int, rng: np.random.Generator) -> dict:
    """How well the selected rows (centers) cover their group on the unit sphere of `Z`."""
    group = np.asarray(group, dtype=np.int64)
    centers = np.asarray(centers, dtype=np.int64)
    if len(group) == 0 or len(centers) == 0:
        return {"n_points": int(len(group)), "n_centers": int(len(centers)), "radius": float(radius),
                "status": "empty"}
    C = np.asarray(Z[centers], dtype=np.float64)
    nearest = np.empty(len(group), dtype=np.int64)
    dist = np.empty(len(group), dtype=np.float64)
    step = max(1, int(chunk_size))
    for start in range(0, len(group), step):
        sims = np.asarray(Z[group[start : start + step]], dtype=np.float64) @ C.T
        j = np.argmax(sims, axis=1)
        cos = sims[np.arange(len(j)), j]
        nearest[start : start + step] = j
        dist[start : start + step] = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * cos))
    covered = dist <= radius
    sizes = np.bincount(nearest, minlength=len(centers))
    sums = np.bincount(nearest, weights=dist, minlength=len(centers))
    n_cov = np.bincount(nearest, weights=covered.astype(np.float64), minlength=len(centers))
    maxd = np.zeros(len(centers))
    np.maximum.at(maxd, nearest, dist)
    nonempty = sizes > 0
    meand = np.where(nonempty, sums / np.maximum(sizes, 1), 0.0)
    top = [c for c in np.argsort(-sizes, kind="stable")[:TOP_CLUSTERS] if sizes[c] > 0]
    largest = [{"center_global_index": int(centers[c]), "size": int(sizes[c]), "mean_dist": float(meand[c]),
                "max_dist": float(maxd[c]), "covered_fraction_in_cluster": float(n_cov[c] / sizes[c])} for c in top]
    return {"n_points": int(len(group)), "n_centers": int(len(centers)), "radius": float(radius),
            "coverage": {"n_covered": int(covered.sum()), "n_uncovered": int((~covered).sum()),
                         "fraction_covered": float(covered.mean())},
            "dist_to_nearest_center": distance_summary(dist, sample_size, rng),
            "clusters": {"n_nonempty": int(nonempty.sum()),
                         "cluster_size": distance_summary(sizes[nonempty], sample_size, rng),
                         "cluster_max_dist": distance_summary(maxd[nonempty], sample_size, rng),
                         "cluster_mean_dist": distance_summary(meand[nonempty], sample_size, rng),
                         "largest": largest},
            "status": "ok"}
