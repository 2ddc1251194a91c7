"""Label log-likelihoods equal hand-computed sums of token log-probs on the embedded SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.models.label_scoring import continuation_token_ids, score_continuations

PROMPTS = [
    "Question: is the sky blue? Answer:",
    "P: The cat sat.\nH: The cat stood.\nA:",
    "Hi",
]
CHOICES = [" E", " N", " entailment", " not entailed at all"]


def _hand_loglik(model, prompt: str, continuation: str) -> float:
    """One unbatched, unpadded pass over prompt ⧺ continuation; sum of the continuation tokens' log-probs."""
    tok = model.tokenizer
    p = list(tok(prompt, add_special_tokens=True)["input_ids"])
    c = list(tok(continuation, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([p + c])
    with torch.inference_mode():
        logp = torch.log_softmax(model.bridge(ids)[0].float(), dim=-1)
    return float(sum(logp[len(p) - 1 + j, c[j]] for j in range(len(c))))


def test_loglik_equals_hand_computed_sum(smollm2):
    scores = score_continuations(smollm2, PROMPTS, CHOICES, normalisation="none", batch_size=4)
    assert scores.loglik.shape == (len(PROMPTS), len(CHOICES))
    for p, prompt in enumerate(PROMPTS):
        for c, cont in enumerate(CHOICES):
            assert scores.loglik[p, c] == pytest.approx(_hand_loglik(smollm2, prompt, cont), abs=2e-3)
    # Multi-token continuations are really multi-token here, so the test exercises the span indexing.
    lengths = [len(ids) for ids in continuation_token_ids(smollm2.tokenizer, CHOICES)]
    assert lengths[0] == lengths[1] == 1 and max(lengths) >= 3


def test_batch_size_does_not_change_scores(smollm2):
    a = score_continuations(smollm2, PROMPTS, CHOICES, normalisation="none", batch_size=1)
    b = score_continuations(smollm2, PROMPTS, CHOICES, normalisation="none", batch_size=8)
    np.testing.assert_allclose(a.loglik, b.loglik, atol=2e-3)


def test_normalisations_and_margin(smollm2):
    raw = score_continuations(smollm2, PROMPTS, CHOICES, normalisation="none")
    per_tok = score_continuations(smollm2, PROMPTS, CHOICES, normalisation="tokens")
    per_byte = score_continuations(smollm2, PROMPTS, CHOICES, normalisation="bytes")
    n_tok = np.array([len(i) for i in continuation_token_ids(smollm2.tokenizer, CHOICES)], float)
    np.testing.assert_allclose(per_tok.score, raw.loglik / n_tok, rtol=1e-9)
    np.testing.assert_allclose(per_byte.score, raw.loglik / np.array([len(c) for c in CHOICES], float), rtol=1e-9)
    best = per_tok.best
    assert per_tok.predicted() == [CHOICES[i] for i in best]
    margin = per_tok.margin_of(best)
    assert (margin >= 0).all()
    other = (best + 1) % len(CHOICES)
    assert (per_tok.margin_of(other) <= 0).all()


def test_bad_inputs_are_refused(smollm2):
    with pytest.raises(ValueError, match="normalisation"):
        score_continuations(smollm2, PROMPTS, CHOICES, normalisation="chars")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokenises to nothing"):
        score_continuations(smollm2, PROMPTS, [" E", ""])
