"""Replacement values for the ablation interventions of stages 6–7 (spec 6.2, DESIGN 4.3).

Means are taken over the positions the intervention touches, real tokens only: in decode-only
mode the last prompt position (step 0) and each decode step t of the unablated greedy answer;
in full-sequence mode every real token, indexed by its true position. `mean-positional` keeps one
row per step (or position); `mean` pools them. Donor variants replace a unit by an *observed*
value of another candidate unit of the same layer, the one closest to this unit's mean.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from lib.core.choices import INTERVENTIONS
from lib.ablation.engine import AblationEngine, ReplacementValues

__all__ = ["INTERVENTIONS", "MeanRecorder", "DonorRecorder", "estimate_replacements", "donor_choice"]



class MeanRecorder:
    """Sums and counts of activations per layer and step/position row (float64)."""

    def __init__(self, layers: Sequence[int], d_model: int, n_rows: int) -> None:
        self.layers = list(layers)
        self.n_rows = n_rows
        self.sums = {L: torch.zeros((n_rows, d_model), dtype=torch.float64) for L in self.layers}
        self.counts = torch.zeros(n_rows, dtype=torch.float64)
        self._counted: set[int] = set()

    def __call__(self, layer: int, act: torch.Tensor, live: torch.Tensor, step_index: torch.Tensor,
                 real: torch.Tensor) -> None:
        idx = step_index.clamp(max=self.n_rows - 1)[real].cpu()
        vals = act[real].detach().to("cpu", torch.float64)
        self.sums[layer].index_add_(0, idx, vals)
        if layer == self.layers[0]:
            self.counts.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))

    def tables(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """(global mean `[1, d]`, positional mean `[S, d]`) per layer; empty rows use the global mean."""
        total = float(self.counts.sum())
        if total == 0:
            raise ValueError("the mean-ablation pool produced no activations")
        glob, pos = {}, {}
        for L, s in self.sums.items():
            g = s.sum(0, keepdim=True) / total
            c = self.counts[:, None]
            p = torch.where(c > 0, s / c.clamp(min=1), g)
            glob[L], pos[L] = g.float(), p.float()
        return glob, pos


class DonorRecorder:
    """Per unit (and row), the observed activation closest to that unit's mean (a second pass)."""

    def __init__(self, means: dict[int, torch.Tensor]) -> None:
        self.layers = list(means)
        self.means = {L: m.double() for L, m in means.items()}  # [S, d] (S may be 1)
        self.best = {L: torch.full_like(m, float("nan")) for L, m in self.means.items()}
        self.dist = {L: torch.full_like(m, float("inf")) for L, m in self.means.items()}

    def __call__(self, layer: int, act: torch.Tensor, live: torch.Tensor, step_index: torch.Tensor,
                 real: torch.Tensor) -> None:
        mean = self.means[layer]
        rows = step_index.clamp(max=mean.shape[0] - 1)[real].cpu()
        vals = act[real].detach().to("cpu", torch.float64)  # [N, d]
        d = (vals - mean[rows]).abs()
        for r in rows.unique().tolist():
            sel = rows == r
            dmin, arg = d[sel].min(0)
            better = dmin < self.dist[layer][r]
            self.dist[layer][r] = torch.where(better, dmin, self.dist[layer][r])
            self.best[layer][r] = torch.where(better, vals[sel][arg, torch.arange(vals.shape[1])], self.best[layer][r])

    def donors(self) -> dict[int, torch.Tensor]:
        out = {}
        for L, b in self.best.items():
            out[L] = torch.where(torch.isnan(b), self.means[L], b).float()
        return out


def donor_choice(means: torch.Tensor, donors: torch.Tensor, candidates: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
    """`[S, len(ids)]`: for each ablated unit, the donor value of the non-ablated candidate whose
    donor value is closest to the unit's mean; the unit's own mean when no candidate is left."""
    ablated = set(int(i) for i in ids)
    pool = [int(c) for c in candidates if int(c) not in ablated]
    m = means[:, list(ids)]
    if not pool:
        return m.clone()
    d = donors[:, pool]  # [S, K]
    gap = (d[:, None, :] - m[:, :, None]).abs()  # [S, n, K]
    pick = gap.argmin(-1)  # [S, n]
    return torch.gather(d, 1, pick)


def estimate_replacements(engine: AblationEngine, pool_prompts: Sequence[str], intervention: str,
                          candidates: dict[int, Sequence[int]], progress: bool | str = False) -> ReplacementValues:
    """Replacement values for `intervention` over the layers of `candidates` from an unablated pass."""
    if intervention not in INTERVENTIONS:
        raise ValueError(f"unknown intervention '{intervention}' (choose from {', '.join(INTERVENTIONS)})")
    if intervention == "zero":
        return ReplacementValues("zero")
    if not pool_prompts:
        raise ValueError("the mean-ablation pool is empty")
    layers = sorted(candidates)
    prepared = engine.prepare(pool_prompts)
    if engine.decode_only:
        n_rows = engine.max_new_tokens
    else:
        n_rows = max(int(c.positions.max()) for c in prepared.chunks) + engine.max_new_tokens + 1
    rec = MeanRecorder(layers, engine.model.d_model, n_rows)
    engine.record(prepared, rec, progress=progress)
    glob, pos = rec.tables()
    positional = intervention.endswith("positional")
    means = pos if positional else glob
    if "donor" not in intervention:
        return ReplacementValues(intervention, means)
    donor_rec = DonorRecorder(means)
    engine.record(prepared, donor_rec, progress=progress)
    donors = donor_rec.donors()
    cands = {L: sorted(int(i) for i in ids) for L, ids in candidates.items()}

    def donor_fn(layer: int, ids: list[int]) -> torch.Tensor:
        return donor_choice(means[layer], donors[layer], cands.get(layer, []), ids)

    return ReplacementValues(intervention, means, donor_fn)


def replacement_summary(values: ReplacementValues) -> dict:
    """A small JSON-able description of the replacement tables (for records and caches)."""
    return {"intervention": values.intervention,
            "rows": {f"m{L}": int(t.shape[0]) for L, t in sorted(values.means.items())},
            "abs_mean": float(np.mean([float(t.abs().mean()) for t in values.means.values()])) if values.means else 0.0}
