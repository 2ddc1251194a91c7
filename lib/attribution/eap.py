"""Neuron-level attribution (EAP, EAP-IG-inputs) and faithfulness over `blocks.{L}.hook_mlp_out`.

A unit is one coordinate of an MLP's write into the residual stream (`m{L}:{id}`, DESIGN 4.1).
Everything is tensors: no graph or edge objects. Scores are accumulated in float32 as

    score[L, i] = (1/N) Σ_pairs Σ_t Δ[L, t, i] · ∂M/∂a[L, t, i]

with Δ = intervention value − clean activation and the gradient read at `hook_mlp_out` itself
(spec §6 note 2). EAP takes the gradient at the clean input; EAP-IG-inputs averages it over m
embedding interpolations e_r + α(e_c − e_r) at midpoints α = (k − ½)/m (spec §6 note 1).

Clean and corrupted texts are tokenised once as prompt ids ⧺ answer ids; the answer span
(logit positions that predict answer tokens) comes from those same ids (spec §6 note 6).
Batches are right-padded, so real tokens never see pads and batching does not change results.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lib.core.choices import ATTRIBUTION_INTERVENTIONS as INTERVENTIONS, ATTRIBUTION_METRICS as METRICS, DECODE_MODES, TEMPORAL_AGGS

__all__ = [
    "METHODS",
    "UNSUPPORTED_METHODS",
    "INTERVENTIONS",
    "METRICS",
    "TEMPORAL_AGGS",
    "DECODE_MODES",
    "canonical_method",
    "EncodedText",
    "encode_text",
    "PairBatch",
    "make_pair_batch",
    "iter_pair_batches",
    "MeanActivations",
    "compute_mean_activations",
    "mlp_out_hook",
    "metric_per_item",
    "metric_gradients",
    "intervention_values",
    "attribute_batch",
    "AttributionResult",
    "attribute_pairs",
    "exact_unit_effects",
    "normalised_logit",
    "evaluate_batch",
    "evaluate_pairs",
]

METHODS = ("EAP", "EAP-IG", "EAP-IG-inputs")
UNSUPPORTED_METHODS = ("EAP-IG-activations", "clean-corrupted", "information-flow-routes", "exact")
_EPS = 1e-9


def canonical_method(method: str) -> str:
    """`EAP-IG` is an alias of `EAP-IG-inputs`; anything outside METHODS is a ValueError."""
    if method == "EAP-IG":
        return "EAP-IG-inputs"
    if method in METHODS:
        return method
    if method in UNSUPPORTED_METHODS:
        raise ValueError(f"--method {method} is not implemented at neuron/node level (spec: edge-only or "
                         f"unused by the pipeline); use one of {', '.join(METHODS)}")
    raise ValueError(f"unknown --method '{method}'; choose one of {', '.join(METHODS)}")


# --------------------------------------------------------------------------------------------
# Tokenisation and batches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedText:
    """Token ids of prompt ⧺ answer and where the answer starts."""

    ids: tuple[int, ...]
    prompt_len: int

    @property
    def answer_len(self) -> int:
        return len(self.ids) - self.prompt_len


def encode_text(tokenizer: Any, prompt: str, answer: str, max_seq_len: int | None = None) -> EncodedText:
    """Prompt with the tokenizer's default special tokens (as generated), answer without; keep the answer when capping."""
    p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    a = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) if answer else []
    if max_seq_len is not None and len(p) + len(a) > max_seq_len:
        bos = getattr(tokenizer, "bos_token_id", None)
        head = p[:1] if bos is not None and p[:1] == [bos] else []
        room = max_seq_len - len(a) - len(head)
        if room < 1:
            raise ValueError(f"--max_seq_len {max_seq_len} leaves no room for the prompt of a "
                             f"{len(a)}-token answer")
        p = head + p[len(p) - room:]
    if not p:
        raise ValueError(f"prompt {prompt!r} tokenises to no tokens")
    return EncodedText(tuple(p + a), len(p))


@dataclass
class PairBatch:
    """Right-padded clean/corrupted token batches plus the masks attribution and evaluation use."""

    clean_ids: torch.Tensor  # [B, T] long
    clean_mask: torch.Tensor  # [B, T] long (1 = real token)
    corr_ids: torch.Tensor  # [B, Tr]
    corr_mask: torch.Tensor  # [B, Tr]
    span: torch.Tensor  # [B, T] bool: logits at t predict clean answer token t+1
    next_ids: torch.Tensor  # [B, T] long: clean token t+1 (0 outside the span)
    act_mask: torch.Tensor  # [B, T] bool: positions where an intervention applies
    corr_valid: torch.Tensor  # [B, T] bool: clean position t exists in the corrupted text
    logit_start: int  # first span position of any item: logits are computed from here on

    @property
    def size(self) -> int:
        return int(self.clean_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.clean_ids.shape[1])


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (ids, mask) tensors."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def make_pair_batch(clean: Sequence[EncodedText], corrupted: Sequence[EncodedText], pad_id: int,
                    device: torch.device | str = "cpu", decode_only: bool = False,
                    decode_mode: str = "after_prompt") -> PairBatch:
    """Collate aligned pairs; positions align by index (prompts share their start), missing ones are left clean."""
    if len(clean) != len(corrupted) or not clean:
        raise ValueError(f"need equally many clean and corrupted texts (got {len(clean)} and {len(corrupted)})")
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"unknown --decode_mode '{decode_mode}'; choose one of {', '.join(DECODE_MODES)}")
    for c in clean:
        if c.answer_len < 1:
            raise ValueError("a clean text has an empty answer: the answer span is undefined")
    dev = torch.device(device)
    clean_ids, clean_mask = _pad([c.ids for c in clean], pad_id, dev)
    corr_ids, corr_mask = _pad([c.ids for c in corrupted], pad_id, dev)
    B, T = clean_ids.shape
    pos = torch.arange(T, device=dev)[None, :]
    full = torch.tensor([len(c.ids) for c in clean], device=dev)[:, None]
    start = torch.tensor([c.prompt_len - 1 for c in clean], device=dev)[:, None]
    span = (pos >= start) & (pos <= full - 2)
    next_ids = torch.zeros_like(clean_ids)
    next_ids[:, :-1] = clean_ids[:, 1:]
    next_ids = torch.where(span, next_ids, torch.zeros_like(next_ids))
    real = clean_mask.bool()
    act_mask = span.clone() if decode_only and decode_mode != "all" else real
    corr_len = torch.tensor([len(c.ids) for c in corrupted], device=dev)[:, None]
    corr_valid = (pos < corr_len) & real
    if not bool(act_mask.any()):
        raise ValueError("no position left to intervene on (empty decode mask)")
    logit_start = min(c.prompt_len - 1 for c in clean)
    return PairBatch(clean_ids, clean_mask, corr_ids, corr_mask, span, next_ids, act_mask, corr_valid, logit_start)


def iter_pair_batches(clean: Sequence[EncodedText], corrupted: Sequence[EncodedText], batch_size: int,
                      pad_id: int, device: torch.device | str, decode_only: bool = False,
                      decode_mode: str = "after_prompt") -> Iterator[PairBatch]:
    """Consecutive batches of at most `batch_size` pairs (memory is bounded by it)."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(clean), batch_size):
        yield make_pair_batch(clean[i:i + batch_size], corrupted[i:i + batch_size], pad_id, device,
                              decode_only, decode_mode)


def _pad_id(model: Any) -> int:
    """The tokenizer's pad id (EOS when unset), used only in positions nobody reads."""
    tok = model.tokenizer
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pid if pid is not None else 0)


# --------------------------------------------------------------------------------------------
# Forward passes with hooks
# --------------------------------------------------------------------------------------------


def mlp_out_hook(layer: int) -> str:
    """TransformerLens name of layer L's MLP write into the residual stream."""
    return f"blocks.{layer}.hook_mlp_out"


@contextlib.contextmanager
def _frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Parameters need no gradients (autograd flows only from the embedding); flags restored after."""
    params = list(module.parameters())
    old = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, old):
            p.requires_grad_(flag)


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, hooks: list[tuple[str, Callable]],
             logit_start: int = 0) -> torch.Tensor:
    """Bridge forward with forward hooks; logits only for positions >= logit_start (the unembedding is costly)."""
    keep = max(1, int(ids.shape[1]) - logit_start)
    if hooks:
        with model.bridge.hooks(fwd_hooks=hooks):
            return model.bridge(ids, attention_mask=mask, logits_to_keep=keep)
    return model.bridge(ids, attention_mask=mask, logits_to_keep=keep)


def _capture(model: Any, ids: torch.Tensor, mask: torch.Tensor,
             logit_start: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """No-grad pass returning (logits from logit_start, hook_mlp_out [L,B,T,d], hook_embed output [B,T,d])."""
    acts: dict[int, torch.Tensor] = {}
    store: dict[str, torch.Tensor] = {}

    def keep_embed(act: torch.Tensor, hook: Any) -> torch.Tensor:
        store["embed"] = act.detach()
        return act

    def keeper(layer: int) -> Callable:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            acts[layer] = act.detach()
            return act
        return fn

    hooks = [("hook_embed", keep_embed)] + [(mlp_out_hook(L), keeper(L)) for L in range(model.n_layers)]
    with torch.no_grad():
        logits = _forward(model, ids, mask, hooks, ids.shape[1] - 1 if logit_start is None else logit_start)
    return logits.detach(), torch.stack([acts[L] for L in range(model.n_layers)]), store["embed"]


def _replacing_hooks(values: torch.Tensor, replace: torch.Tensor) -> list[tuple[str, Callable]]:
    """Hooks that set `hook_mlp_out` to `values[L]` wherever `replace[L]` ([B,T,d] or broadcastable) holds."""
    def maker(layer: int) -> Callable:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return torch.where(replace[layer], values[layer].to(act.dtype), act)
        return fn
    return [(mlp_out_hook(L), maker(L)) for L in range(values.shape[0])]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 models keep float64, so finite differences stay exact)."""
    return x if x.dtype == torch.float64 else x.float()


def _span_index(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(item, logit row) indices of every span position; logit rows start at `batch.logit_start`."""
    b, t = batch.span.nonzero(as_tuple=True)
    return b, t - batch.logit_start


def _aggregate(logits: torch.Tensor, batch: PairBatch, how: str) -> torch.Tensor:
    """Span logits per item aggregated over time (mean/max/min) → [B, V] float32."""
    out = []
    for i in range(batch.size):
        x = _upcast(logits[i][batch.span[i, batch.logit_start:]])
        out.append(x.mean(0) if how == "mean" else x.max(0).values if how == "max" else x.min(0).values)
    return torch.stack(out)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) over the last axis as the spec writes it (softmax probabilities, +1e-9 in logs)."""
    p = torch.softmax(_upcast(p_logits), -1)
    q = torch.softmax(_upcast(q_logits), -1)
    return (p * (torch.log(p + _EPS) - torch.log(q + _EPS))).sum(-1)


def metric_per_item(logits: torch.Tensor, batch: PairBatch, metric: str, temporal_agg: str = "mean",
                    clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Per-item metric [B]: mean log-prob of the clean answer tokens, or the spec's span KL to clean."""
    if metric == "answer_logprob":
        b, t = _span_index(batch)
        targets = batch.next_ids[b, t + batch.logit_start]
        lp = torch.log_softmax(_upcast(logits[b, t]), -1).gather(-1, targets[:, None])[:, 0]
        total = torch.zeros(batch.size, dtype=lp.dtype, device=lp.device).index_add(0, b, lp)
        return total / batch.span.sum(1).clamp(min=1).to(lp.dtype)
    if metric != "kl":
        raise ValueError(f"unknown --attribution_metric '{metric}'; choose one of {', '.join(METRICS)}")
    if clean_logits is None:
        raise ValueError("the KL metric needs the clean logits")
    if temporal_agg == "none":
        b, t = _span_index(batch)
        kl = _kl(clean_logits[b, t], logits[b, t])
        total = torch.zeros(batch.size, dtype=kl.dtype, device=kl.device).index_add(0, b, kl)
        return total / batch.span.sum(1).clamp(min=1).to(kl.dtype)
    if temporal_agg not in TEMPORAL_AGGS:
        raise ValueError(f"unknown --temporal_agg '{temporal_agg}'; choose one of {', '.join(TEMPORAL_AGGS)}")
    return _kl(_aggregate(clean_logits, batch, temporal_agg), _aggregate(logits, batch, temporal_agg))


def metric_gradients(model: Any, batch: PairBatch, metric: str, temporal_agg: str = "mean",
                     clean_logits: torch.Tensor | None = None,
                     embed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(metric per item [B], ∂Σ metric/∂hook_mlp_out [L,B,T,d]) on clean tokens, optionally with a replaced embedding."""
    acts: dict[int, torch.Tensor] = {}

    def set_embed(act: torch.Tensor, hook: Any) -> torch.Tensor:
        src = embed if embed is not None else act
        return src.detach().to(act.dtype).clone().requires_grad_(True)

    def keeper(layer: int) -> Callable:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            acts[layer] = act
            return act
        return fn

    hooks = [("hook_embed", set_embed)] + [(mlp_out_hook(L), keeper(L)) for L in range(model.n_layers)]
    with _frozen_parameters(model.bridge), torch.enable_grad():
        logits = _forward(model, batch.clean_ids, batch.clean_mask, hooks, batch.logit_start)
        values = metric_per_item(logits, batch, metric, temporal_agg, clean_logits)
        ordered = [acts[L] for L in range(model.n_layers)]
        grads = torch.autograd.grad(values.sum(), ordered, allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(ordered, grads)]
    return values.detach(), torch.stack(grads).detach()


# --------------------------------------------------------------------------------------------
# Interventions
# --------------------------------------------------------------------------------------------


@dataclass
class MeanActivations:
    """Mean `hook_mlp_out` over real tokens of reference texts: overall and per absolute position."""

    mean: torch.Tensor  # [L, d] float32
    positional: torch.Tensor  # [L, T_ref, d] float32
    counts: torch.Tensor  # [T_ref] number of texts with a real token at each position
    n_texts: int

    def at_positions(self, width: int) -> torch.Tensor:
        """[L, width, d] positional means; positions no reference text reaches use the overall mean."""
        L, _, d = self.positional.shape
        out = self.mean[:, None, :].expand(L, width, d).clone()
        n = min(width, self.positional.shape[1])
        have = (self.counts[:n] > 0)[None, :, None]
        out[:, :n] = torch.where(have, self.positional[:, :n], out[:, :n])
        return out


def compute_mean_activations(model: Any, texts: Sequence[EncodedText], batch_size: int,
                             progress: bool = True) -> MeanActivations:
    """Average `hook_mlp_out` over reference texts, counting real tokens only (no pads, spec §6 note 5)."""
    if not texts:
        raise ValueError("mean interventions need at least one reference text")
    L, d = model.n_layers, model.d_model
    width = max(len(t.ids) for t in texts)
    total = torch.zeros(L, d, dtype=torch.float32)
    pos_sum = torch.zeros(L, width, d, dtype=torch.float32)
    counts = torch.zeros(width, dtype=torch.float32)
    pad = _pad_id(model)
    steps = range(0, len(texts), max(1, batch_size))
    for i in tqdm(steps, desc="mean activations", disable=not progress, leave=False):
        chunk = texts[i:i + batch_size]
        ids, mask = _pad([t.ids for t in chunk], pad, model.device)
        _, acts, _ = _capture(model, ids, mask)
        m = mask.to(torch.float32)[None, :, :, None]
        masked = (acts.float() * m).cpu()
        total += masked.sum((1, 2))
        pos_sum[:, : ids.shape[1]] += masked.sum(1)
        counts[: ids.shape[1]] += mask.sum(0).float().cpu()
    mean = total / counts.sum().clamp(min=1)
    positional = pos_sum / counts.clamp(min=1)[None, :, None]
    return MeanActivations(mean, positional, counts, len(texts))


def _corr_aligned(x: torch.Tensor, width: int) -> torch.Tensor:
    """Corrupted tensor [..., B, Tr, d] cut or zero-padded to the clean width along T."""
    tr = x.shape[-2]
    if tr >= width:
        return x[..., :width, :]
    pad_shape = list(x.shape)
    pad_shape[-2] = width - tr
    return torch.cat([x, x.new_zeros(pad_shape)], dim=-2)


def intervention_values(kind: str, batch: PairBatch, corr_acts: torch.Tensor | None,
                        means: MeanActivations | None, n_layers: int, d_model: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [L,B,T,d] or broadcastable, positions [B,T] where they apply) of an intervention."""
    B, T = batch.size, batch.width
    if kind == "patching":
        if corr_acts is None:
            raise ValueError("patching needs the corrupted activations")
        return _corr_aligned(corr_acts, T), batch.act_mask & batch.corr_valid
    if kind == "zero":
        return torch.zeros(n_layers, 1, 1, d_model, device=device), batch.act_mask
    if means is None:
        raise ValueError(f"the '{kind}' intervention needs mean activations")
    if kind == "mean":
        return means.mean.to(device)[:, None, None, :], batch.act_mask
    if kind == "mean-positional":
        return means.at_positions(T).to(device)[:, None, :, :], batch.act_mask
    raise ValueError(f"unknown intervention '{kind}'; choose one of {', '.join(INTERVENTIONS)}")


# --------------------------------------------------------------------------------------------
# Attribution
# --------------------------------------------------------------------------------------------


def attribute_batch(model: Any, batch: PairBatch, method: str, intervention: str, metric: str,
                    temporal_agg: str = "mean", ig_steps: int = 3,
                    means: MeanActivations | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over items of Σ_t Δ·g → [L,d] float32, clean metric per item [B]) for one batch."""
    method = canonical_method(method)
    if method == "EAP-IG-inputs" and intervention != "patching":
        raise ValueError("EAP-IG-inputs interpolates between corrupted and clean inputs: it needs "
                         "--intervention patching")
    if ig_steps < 1:
        raise ValueError(f"--max_ig_steps must be >= 1, got {ig_steps}")
    L, d = model.n_layers, model.d_model
    clean_logits, clean_acts, clean_embed = _capture(model, batch.clean_ids, batch.clean_mask, batch.logit_start)
    corr_acts = corr_embed = None
    if intervention == "patching":
        _, corr_acts, corr_embed = _capture(model, batch.corr_ids, batch.corr_mask)
    values, where = intervention_values(intervention, batch, corr_acts, means, L, d, clean_acts.device)
    delta = (values.to(clean_acts.dtype) - clean_acts) * where[None, :, :, None].to(clean_acts.dtype)
    delta = delta.float()
    kl_ref = clean_logits if metric == "kl" else None
    scores = torch.zeros(L, d, dtype=torch.float32, device=clean_acts.device)
    clean_metric = metric_per_item(clean_logits, batch, metric, temporal_agg, kl_ref)
    if method == "EAP":
        _, grads = metric_gradients(model, batch, metric, temporal_agg, kl_ref)
        scores += (delta * grads.float()).sum((1, 2))
        return scores, clean_metric
    e_r = _corr_aligned(corr_embed, batch.width)
    interp = (batch.act_mask & batch.corr_valid)[:, :, None]
    for k in range(1, ig_steps + 1):
        alpha = (k - 0.5) / ig_steps
        embed = torch.where(interp, e_r + alpha * (clean_embed - e_r), clean_embed)
        _, grads = metric_gradients(model, batch, metric, temporal_agg, kl_ref, embed=embed)
        scores += (delta * grads.float()).sum((1, 2)) / ig_steps
    return scores, clean_metric


@dataclass
class AttributionResult:
    """Mean attribution per unit over all pairs, plus bookkeeping for the outputs."""

    scores: torch.Tensor  # [L, d] float32, mean over pairs
    n_pairs: int
    n_batches: int
    clean_metric_mean: float


def attribute_pairs(model: Any, clean: Sequence[EncodedText], corrupted: Sequence[EncodedText], *,
                    method: str, intervention: str, metric: str = "answer_logprob", temporal_agg: str = "mean",
                    ig_steps: int = 3, batch_size: int = 8, means: MeanActivations | None = None,
                    decode_only: bool = False, decode_mode: str = "after_prompt",
                    progress: bool = True, desc: str = "attribution") -> AttributionResult:
    """Attribute `metric` to every `hook_mlp_out` coordinate over all (clean, corrupted) pairs."""
    if not clean:
        raise ValueError("no pairs to attribute")
    L, d = model.n_layers, model.d_model
    total = torch.zeros(L, d, dtype=torch.float32)
    metric_sum, n_batches = 0.0, 0
    batches = iter_pair_batches(clean, corrupted, batch_size, _pad_id(model), model.device, decode_only, decode_mode)
    bar = tqdm(batches, total=math.ceil(len(clean) / batch_size), desc=desc, disable=not progress, leave=False)
    for batch in bar:
        s, m = attribute_batch(model, batch, method, intervention, metric, temporal_agg, ig_steps, means)
        total += s.cpu()
        metric_sum += float(m.sum())
        n_batches += 1
    return AttributionResult(total / len(clean), len(clean), n_batches, metric_sum / len(clean))


# --------------------------------------------------------------------------------------------
# Exact single-unit interventions (the quantity the attribution scores approximate)
# --------------------------------------------------------------------------------------------


def _tile_batch(batch: PairBatch, k: int) -> PairBatch:
    """The batch repeated k times along the item axis (row j·B + i is item i of copy j)."""
    return replace(batch, **{f.name: getattr(batch, f.name).repeat(k, 1) for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})


def _single_unit_hooks(values: torch.Tensor, where: torch.Tensor, part: Sequence[int], d: int,
                       b: int) -> list[tuple[str, Callable]]:
    """Hooks giving unit part[j] (flat L·d + i) its intervention value in rows j·b..(j+1)·b − 1 only."""
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for j, u in enumerate(part):
        by_layer.setdefault(u // d, []).append((j, u % d))

    def maker(layer: int, members: list[tuple[int, int]]) -> Callable:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            out = act.clone()
            for j, i in members:
                rows = slice(j * b, (j + 1) * b)
                out[rows, :, i] = torch.where(where, values[layer][..., i].to(act.dtype), act[rows, :, i])
            return out
        return fn

    return [(mlp_out_hook(layer), maker(layer, members)) for layer, members in by_layer.items()]


def exact_unit_effects(model: Any, clean: Sequence[EncodedText], corrupted: Sequence[EncodedText],
                       units: Sequence[int], *, metric: str = "answer_logprob", intervention: str = "patching",
                       temporal_agg: str = "mean", means: MeanActivations | None = None,
                       decode_only: bool = False, decode_mode: str = "after_prompt", batch_size: int = 8,
                       chunk: int = 8, progress: bool = True, desc: str = "exact effects") -> np.ndarray:
    """Mean metric change over pairs when unit L·d + i alone takes its intervention value (what scores estimate)."""
    L, d = model.n_layers, model.d_model
    units = [int(u) for u in units]
    if any(not 0 <= u < L * d for u in units):
        raise ValueError(f"units are flat indices L * d + i in [0, {L * d})")
    if chunk < 1:
        raise ValueError(f"chunk (units per forward pass) must be >= 1, got {chunk}")
    if not clean:
        raise ValueError("no pairs to patch")
    total = torch.zeros(len(units), dtype=torch.float64)
    batches = list(iter_pair_batches(clean, corrupted, batch_size, _pad_id(model), model.device, decode_only,
                                     decode_mode))
    bar = tqdm(total=len(batches) * len(units), desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        for batch in batches:
            clean_logits = _forward(model, batch.clean_ids, batch.clean_mask, [], batch.logit_start)
            corr_acts = None
            if intervention == "patching":
                _, corr_acts, _ = _capture(model, batch.corr_ids, batch.corr_mask)
            values, where = intervention_values(intervention, batch, corr_acts, means, L, d, clean_logits.device)
            ref = clean_logits if metric == "kl" else None
            base = metric_per_item(clean_logits, batch, metric, temporal_agg, ref)
            b = batch.size
            for s in range(0, len(units), chunk):
                part = units[s:s + chunk]
                k = len(part)
                rows = _tile_batch(batch, k)
                hooks = _single_unit_hooks(values, where, part, d, b)
                logits = _forward(model, rows.clean_ids, rows.clean_mask, hooks, rows.logit_start)
                rows_ref = clean_logits.repeat(k, 1, 1) if metric == "kl" else None
                moved = metric_per_item(logits, rows, metric, temporal_agg, rows_ref).view(k, b) - base
                total[s:s + k] += moved.sum(1).double().cpu()
                bar.update(k)
    bar.close()
    return (total / len(clean)).numpy()


# --------------------------------------------------------------------------------------------
# Faithfulness
# --------------------------------------------------------------------------------------------


def normalised_logit(logits: torch.Tensor, batch: PairBatch, clean_logits: torch.Tensor,
                     temporal_agg: str = "mean") -> torch.Tensor:
    """Spec NL per item: aggregated span logit of the clean argmax / max(max aggregated logit, 1e-9)."""
    if temporal_agg == "none":
        b, t = _span_index(batch)
        cur, ref = logits[b, t].float(), clean_logits[b, t].float()
        target = ref.argmax(-1, keepdim=True)
        nl = cur.gather(-1, target)[:, 0] / cur.max(-1).values.clamp(min=_EPS)
        total = torch.zeros(batch.size, dtype=torch.float32, device=nl.device).index_add(0, b, nl)
        return total / batch.span.sum(1).clamp(min=1).float()
    cur, ref = _aggregate(logits, batch, temporal_agg), _aggregate(clean_logits, batch, temporal_agg)
    target = ref.argmax(-1, keepdim=True)
    return cur.gather(-1, target)[:, 0] / cur.max(-1).values.clamp(min=_EPS)


def evaluate_batch(model: Any, batch: PairBatch, keep: torch.Tensor, intervention: str,
                   means: MeanActivations | None = None, temporal_agg: str = "mean") -> dict[str, float]:
    """NL_full, NL_empty, NL_c and F for one batch: non-kept coordinates get the intervention value."""
    L, d = model.n_layers, model.d_model
    with torch.no_grad():
        clean_logits = _forward(model, batch.clean_ids, batch.clean_mask, [], batch.logit_start)
        corr_acts = None
        if intervention == "patching":
            _, corr_acts, _ = _capture(model, batch.corr_ids, batch.corr_mask)
        values, where = intervention_values(intervention, batch, corr_acts, means, L, d, clean_logits.device)
        pos = where[None, :, :, None]
        dropped = ~keep.to(clean_logits.device)[:, None, None, :]
        ids, mask, start = batch.clean_ids, batch.clean_mask, batch.logit_start
        empty_logits = _forward(model, ids, mask, _replacing_hooks(values, pos.expand(L, -1, -1, d)), start)
        if bool(keep.all()):  # nothing is replaced: the circuit run is the clean run
            circuit_logits = clean_logits
        else:
            circuit_logits = _forward(model, ids, mask, _replacing_hooks(values, pos & dropped), start)
    nl_full = float(normalised_logit(clean_logits, batch, clean_logits, temporal_agg).mean())
    nl_empty = float(normalised_logit(empty_logits, batch, clean_logits, temporal_agg).mean())
    nl_c = float(normalised_logit(circuit_logits, batch, clean_logits, temporal_agg).mean())
    den = nl_full - nl_empty
    faith = 0.0 if abs(den) < 1e-12 else min(1.0, max(0.0, (nl_c - nl_empty) / den))
    return {"NL_full": nl_full, "NL_empty": nl_empty, "NL_c": nl_c, "faithfulness": faith}


def _summary(values: list[float]) -> dict[str, Any]:
    """{mean, std, data} of per-batch values (population std)."""
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(values) > 1 else 0.0,
            "data": [float(v) for v in values]}


def evaluate_pairs(model: Any, clean: Sequence[EncodedText], corrupted: Sequence[EncodedText], keep: torch.Tensor, *,
                   intervention: str, means: MeanActivations | None = None, temporal_agg: str = "mean",
                   batch_size: int = 8, decode_only: bool = False, decode_mode: str = "after_prompt",
                   progress: bool = True, desc: str = "faithfulness") -> dict[str, dict[str, Any]]:
    """Per-batch NL_full / NL_empty / NL_c / faithfulness over all pairs, as {mean, std, data}."""
    rows: dict[str, list[float]] = {"NL_full": [], "NL_empty": [], "NL_c": [], "faithfulness": []}
    batches = iter_pair_batches(clean, corrupted, batch_size, _pad_id(model), model.device, decode_only, decode_mode)
    for batch in tqdm(batches, total=math.ceil(len(clean) / batch_size), desc=desc, disable=not progress, leave=False):
        for k, v in evaluate_batch(model, batch, keep, intervention, means, temporal_agg).items():
            rows[k].append(v)
    return {k: _summary(v) for k, v in rows.items()}
