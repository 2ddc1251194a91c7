"""The batched engine as a sequential group tester: for groups and a prompt range of each slice,
the per-prompt flips (answer left the regime) and first-token margin drops, in one batched call.

Prompts of each slice are prepared once, in the slice's order; a range lo..hi reuses the prepared
prefix chunks, so growing a node's prompts never re-prefills what was evaluated before.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lib.ablation.engine import AblationEngine, PreparedPrompts, ReplacementValues
from lib.ablation.sequential_cha import SliceResult

__all__ = ["EngineSequentialTester"]


class EngineSequentialTester:
    """`tester(groups, lo, hi)` over an associated and an unrelated prompt slice of one regime."""

    def __init__(self, engine: AblationEngine, task: Any, slices: Sequence[tuple[Sequence[str], Sequence[dict]]],
                 replacement: ReplacementValues, regime: str) -> None:
        if regime not in ("positive", "negative"):
            raise ValueError(f"regime must be positive or negative, not {regime!r}")
        self.engine, self.task, self.repl, self.regime = engine, task, replacement, regime
        self.prompts = [list(p) for p, _ in slices]
        self.rows = [list(r) for _, r in slices]
        self._prepared: dict[tuple[int, int, int], PreparedPrompts] = {}
        self.reference_tokens: list[torch.Tensor] = []
        self.base_margins: list[np.ndarray] = []
        self.base_positive: list[np.ndarray] = []
        for s in range(len(self.prompts)):
            prep = self._prep(s, 0, len(self.prompts[s]))
            tokens = engine.first_tokens(prep)
            answers, scores = engine.generate_scored(prep, [None], targets=tokens)
            self.reference_tokens.append(tokens)
            self.base_margins.append(scores[0].margin.numpy().astype(float))
            self.base_positive.append(np.asarray(task.is_answer_positive(self.rows[s], answers[0]), dtype=bool))

    def _prep(self, s: int, lo: int, hi: int) -> PreparedPrompts:
        key = (s, lo, hi)
        if key not in self._prepared:
            self._prepared[key] = self.engine.prepare(self.prompts[s][lo:hi])
        return self._prepared[key]

    def __call__(self, groups: Sequence[Mapping[int, Sequence[int]]], lo: int, hi: int) -> list[tuple[SliceResult, SliceResult]]:
        per_slice = []
        for s in range(len(self.prompts)):
            h = min(hi, len(self.prompts[s]))
            answers, scores = self.engine.generate_scored(self._prep(s, lo, h), list(groups), self.repl,
                                                          targets=self.reference_tokens[s][lo:h])
            out = []
            for ans, sc in zip(answers, scores):
                pos = np.asarray(self.task.is_answer_positive(self.rows[s][lo:h], ans), dtype=bool)
                flips = ~pos if self.regime == "positive" else pos
                out.append(SliceResult(flips, self.base_margins[s][lo:h] - sc.margin.numpy().astype(float)))
            per_slice.append(out)
        return [(a, u) for a, u in zip(*per_slice)]
