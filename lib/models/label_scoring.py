"""Multiple-choice answers by log-likelihood: score each label continuation after a prompt.

This is how evaluation harnesses (lm-eval-harness's `loglikelihood` requests) read a label from
a small model that rarely *writes* one: the prediction is the continuation with the highest
log-likelihood, so every prompt gets a label and a margin even when free generation would ramble.

Scores are sums of the continuation's token log-probabilities given the prompt (prompt tokenised
with the tokenizer's default special tokens, as generation does; the continuation without, then
appended), optionally normalised by the continuation's token count (`tokens`) or UTF-8 byte
length (`bytes`, lm-eval's `acc_norm`). Rows that share the same conditioning tokens
(`prompt ⧺ continuation[:-1]`) run once, so single-token labels cost one forward pass per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lib.models.generation import length_sorted_batches
from lib.models.loading import LoadedModel

__all__ = ["Normalisation", "NORMALISATIONS", "ChoiceScores", "continuation_token_ids", "score_continuations"]

Normalisation = Literal["none", "tokens", "bytes"]
NORMALISATIONS: tuple[str, ...] = ("none", "tokens", "bytes")


@dataclass(frozen=True)
class ChoiceScores:
    """Per prompt and choice: summed log-likelihood, and the normalised score used to choose."""

    choices: tuple[str, ...]
    loglik: np.ndarray  # [P, C] sum of the continuation's token log-probs
    score: np.ndarray  # [P, C] loglik after normalisation
    normalisation: str

    @property
    def best(self) -> np.ndarray:
        """Index of the chosen continuation per prompt (first on ties)."""
        return self.score.argmax(axis=1)

    def predicted(self) -> list[str]:
        return [self.choices[i] for i in self.best]

    def margin_of(self, index: Sequence[int]) -> np.ndarray:
        """Score of choice `index[p]` minus the best other choice's, per prompt (> 0: it wins)."""
        idx = np.asarray(index, dtype=int)
        own = self.score[np.arange(len(idx)), idx]
        others = self.score.copy()
        others[np.arange(len(idx)), idx] = -np.inf
        return own - others.max(axis=1)


def continuation_token_ids(tokenizer: object, continuations: Sequence[str]) -> list[list[int]]:
    """Token ids of each continuation on its own (no special tokens); each must be non-empty."""
    out = []
    for c in continuations:
        ids = list(tokenizer(c, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        if not ids:
            raise ValueError(f"label continuation {c!r} tokenises to nothing")
        out.append(ids)
    return out


def _normalise(loglik: np.ndarray, cont_ids: list[list[int]], choices: Sequence[str], how: str) -> np.ndarray:
    if how == "none":
        return loglik
    if how == "tokens":
        return loglik / np.asarray([len(c) for c in cont_ids], dtype=float)[None, :]
    if how == "bytes":
        return loglik / np.asarray([max(1, len(c.encode("utf-8"))) for c in choices], dtype=float)[None, :]
    raise ValueError(f"normalisation {how!r}: use one of {', '.join(NORMALISATIONS)}")


@torch.inference_mode()
def score_continuations(model: LoadedModel, prompts: Sequence[str], choices: Sequence[str],
                        normalisation: Normalisation = "tokens", batch_size: int = 16,
                        progress: bool | str = False) -> ChoiceScores:
    """Log-likelihood of every choice after every prompt (see the module docstring)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not choices:
        raise ValueError("score_continuations needs at least one choice")
    tok = model.tokenizer
    cont_ids = continuation_token_ids(tok, choices)
    longest = max(len(c) for c in cont_ids)
    max_prompt = max(1, model.n_ctx - longest)
    enc = tok(list(prompts), add_special_tokens=True, truncation=True, max_length=max_prompt)["input_ids"]
    if any(len(e) == 0 for e in enc):
        raise ValueError("a prompt tokenises to nothing; every prompt needs at least one token")
    # One model row per distinct conditioning sequence prompt ⧺ continuation[:-1].
    seq_index: dict[tuple[int, ...], int] = {}
    seqs: list[tuple[int, ...]] = []
    wanted: list[list[int]] = []  # per (p, c): the model row
    for e in enc:
        row = []
        for c in cont_ids:
            key = tuple(e) + tuple(c[:-1])
            if key not in seq_index:
                seq_index[key] = len(seqs)
                seqs.append(key)
            row.append(seq_index[key])
        wanted.append(row)
    # Log-probs over the last `longest` positions of every row (they predict the continuation tokens).
    logp_tail: list[torch.Tensor | None] = [None] * len(seqs)
    bar = tqdm(total=len(seqs), desc=progress if isinstance(progress, str) else "label scoring",
               unit="row", disable=not progress, dynamic_ncols=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for idx in length_sorted_batches([len(s) for s in seqs], batch_size):
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            s = seqs[i]
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = min(longest, width)
        logits = model.bridge(ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep)
        lp = torch.log_softmax(logits[:, -keep:, :].float(), dim=-1).cpu()
        for r, i in enumerate(idx):
            logp_tail[i] = lp[r]
        bar.update(len(idx))
    bar.close()
    loglik = np.zeros((len(enc), len(cont_ids)), dtype=float)
    for p in range(len(enc)):
        for c, ids_c in enumerate(cont_ids):
            tail = logp_tail[wanted[p][c]]
            assert tail is not None
            n = len(ids_c)
            # The row ends with continuation token n-2; position -1 predicts token n-1, -n predicts token 0.
            steps = tail[tail.shape[0] - n:, :]
            loglik[p, c] = float(sum(steps[j, ids_c[j]] for j in range(n)))
    return ChoiceScores(tuple(choices), loglik, _normalise(loglik, cont_ids, choices, normalisation), normalisation)
