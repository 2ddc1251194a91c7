"""Neuron-level attribution on real models: exact-patching oracle, finite differences, batching, evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from lib.pipeline.stage5_circuits import select_top_units
from lib.models.loading import LoadedModel
from lib.attribution.eap import (EncodedText, _capture, _forward, attribute_pairs, canonical_method,
                                    compute_mean_activations, encode_text, evaluate_batch, exact_unit_effects,
                                    make_pair_batch, metric_gradients, metric_per_item, mlp_out_hook)

FEW_SHOT = "3+5=8\n9-4=5\n6*7=42\n8/2=4\n"
CLEAN = [(FEW_SHOT + "12+7=", "19"), (FEW_SHOT + "4+4=", "8"), (FEW_SHOT + "21+3=", "24"), (FEW_SHOT + "6+2=", "8")]
CORRUPT = [(FEW_SHOT + "12-7=", "5"), (FEW_SHOT + "4*4=", "16"), (FEW_SHOT + "21-3=", "18"), (FEW_SHOT + "16*2=", "32")]


def _texts(model, rows):
    return [encode_text(model.tokenizer, p, a) for p, a in rows]


@dataclass(frozen=True)
class CircuitCheck:
    """Scores of every unit per method and exact patching effects of the circuit's units."""

    scores: dict[str, np.ndarray]  # method -> [L * d] mean score over the pairs
    units: list[int]  # flat indices L * d + i of the top units by |EAP-IG-inputs score|, descending
    exact: np.ndarray  # exact_unit_effects of `units`, same positions as the scores


def _circuit(model: LoadedModel, methods: tuple[str, ...], decode_only: bool) -> CircuitCheck:
    """Score the four pairs, take the top-50 units by |EAP-IG-inputs|, patch each alone exactly (same positions)."""
    clean, corr = _texts(model, CLEAN), _texts(model, CORRUPT)
    scores = {method: attribute_pairs(model, clean, corr, method=method, intervention="patching",
                                      metric="answer_logprob", ig_steps=3, batch_size=4, decode_only=decode_only,
                                      progress=False).scores.flatten().numpy()
              for method in methods}
    units = np.argsort(-np.abs(scores["EAP-IG-inputs"]), kind="stable")[:50].tolist()
    exact = exact_unit_effects(model, clean, corr, units, decode_only=decode_only, batch_size=4, progress=False)
    return CircuitCheck(scores, units, exact)


@pytest.fixture(scope="module")
def arithmetic_circuit(smollm2) -> CircuitCheck:
    """The top-50 units of the stage-5 default (EAP-IG-inputs, m = 3, patching, all positions), computed once."""
    return _circuit(smollm2, ("EAP-IG-inputs", "EAP"), decode_only=False)


@pytest.fixture(scope="module")
def arithmetic_circuit_decode_only(smollm2) -> CircuitCheck:
    """The same in the pipeline's main mode (--decode_only: answer-predicting positions only), computed once."""
    return _circuit(smollm2, ("EAP-IG-inputs",), decode_only=True)


def test_eap_ig_sign_agrees_with_exact_single_unit_patching(arithmetic_circuit):
    """Top-20 units by |EAP-IG-inputs score|: the sign matches patching that one coordinate exactly (>= 16/20)."""
    c = arithmetic_circuit
    top = c.units[:20]
    agree = int(np.sum((c.exact[:20] > 0) == (c.scores["EAP-IG-inputs"][top] > 0)))
    assert agree >= 16, f"only {agree}/20 signs agree with exact patching"


# Measured on these four pairs (Spearman, signed, top-50 units by |EAP-IG-inputs|, exact patching at the same
# positions as the scores): all positions, EAP-IG-inputs rho 0.67, EAP 0.96; decode-only, EAP-IG-inputs 0.54
# (EAP 0.99). Shuffled scores (seed 0): -0.11, -0.12 and 0.21 (chance sd 1/sqrt(49) = 0.14).
# Exact single-unit patching changes one unit with everything else clean: its first-order term is EAP's
# clean-point gradient. EAP-IG-inputs averages gradients along the corrupted→clean input path, a different
# target (against the exact single-unit effect averaged over runs at input α = 0, ½, 1 it reaches rho 0.84,
# EAP 0.69), so its levels are lower. Decode-only does not reach 0.7 on these pairs (the 8 operator-swap
# pairs of `bench/attribution_rank.py --decode_only` give 0.85): its level sits below the measured 0.54 and
# above the shuffled 0.21.
RANK_LEVEL = {("arithmetic_circuit", "EAP-IG-inputs"): 0.5, ("arithmetic_circuit", "EAP"): 0.9,
              ("arithmetic_circuit_decode_only", "EAP-IG-inputs"): 0.4}


@pytest.mark.parametrize("circuit, method", list(RANK_LEVEL))
def test_attribution_rank_agrees_with_exact_single_unit_patching(request, circuit, method):
    """Spearman rho(scores, exact effects) on the top-50 circuit units clears the level; the shuffled scores do not."""
    c = request.getfixturevalue(circuit)
    scores = c.scores[method][c.units]
    rho = float(spearmanr(scores, c.exact).statistic)
    shuffled = float(spearmanr(np.random.default_rng(0).permutation(scores), c.exact).statistic)
    level = RANK_LEVEL[circuit, method]
    assert rho >= level, f"{circuit} {method}: Spearman rho {rho:.3f} < {level} against exact single-unit patching"
    assert shuffled < level, f"{circuit} {method}: a shuffled ranking reaches rho {shuffled:.3f}: the check cannot fail"


def test_exact_unit_effects_batched_equal_one_unit_per_pass(smollm2):
    """Units stacked as rows (chunks of 2, one partial, two in a layer) equal one hooked pass per unit; decode-only."""
    clean, corr = _texts(smollm2, CLEAN), _texts(smollm2, CORRUPT)
    d = smollm2.d_model
    units = [15 * d + 17, 15 * d + 250, 27 * d + 17]  # decode-only effects ~ -0.01, +0.02, -0.09
    got = exact_unit_effects(smollm2, clean, corr, units, decode_only=True, batch_size=4, chunk=2, progress=False)
    batch = make_pair_batch(clean, corr, smollm2.tokenizer.pad_token_id, decode_only=True)
    _, corr_acts, _ = _capture(smollm2, batch.corr_ids, batch.corr_mask)
    n = min(batch.width, corr_acts.shape[2])
    where = (batch.act_mask & batch.corr_valid)[:, :n]
    want = []
    with torch.no_grad():
        base = metric_per_item(_forward(smollm2, batch.clean_ids, batch.clean_mask, [], batch.logit_start),
                               batch, "answer_logprob")
        for u in units:
            layer, i = divmod(u, d)

            def patch(act, hook, layer=layer, i=i):
                act = act.clone()
                act[:, :n, i] = torch.where(where, corr_acts[layer, :, :n, i], act[:, :n, i])
                return act

            logits = _forward(smollm2, batch.clean_ids, batch.clean_mask, [(mlp_out_hook(layer), patch)],
                              batch.logit_start)
            want.append(float((metric_per_item(logits, batch, "answer_logprob") - base).mean()))
    assert min(abs(w) for w in want) > 5e-3  # every unit moves the metric: a wrong row or unit would show
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_llama(smollm2, tmp_path_factory) -> LoadedModel:
    """A randomly initialised 2-layer Llama in float64 wrapped in a TransformerBridge."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).to(torch.float64).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    cfg.save_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=smollm2.tokenizer,
                                                 device="cpu", dtype=torch.float64)
    bridge.eval()
    return LoadedModel("tiny", None, smollm2.tokenizer, hf, bridge, torch.device("cpu"), torch.float64)


def _tiny_batch():
    clean = [EncodedText((5, 9, 12, 3, 44, 7), 4), EncodedText((5, 9, 30, 2, 8), 3)]
    corr = [EncodedText((5, 9, 13, 3, 40, 1), 4), EncodedText((5, 9, 31, 2, 60, 61), 3)]
    return make_pair_batch(clean, corr, pad_id=0)


@pytest.mark.parametrize("metric", ["answer_logprob", "kl"])
def test_metric_gradients_match_finite_differences(tiny_llama, metric):
    """∂Σmetric/∂hook_mlp_out equals central differences at several coordinates (float64, off the clean point)."""
    model, batch = tiny_llama, _tiny_batch()
    clean_logits, _, clean_embed = _capture(model, batch.clean_ids, batch.clean_mask, batch.logit_start)
    _, _, corr_embed = _capture(model, batch.corr_ids, batch.corr_mask)
    embed = clean_embed + 0.5 * (corr_embed[:, : batch.width] - clean_embed)  # an interior IG point
    ref = clean_logits if metric == "kl" else None
    _, grads = metric_gradients(model, batch, metric, "mean", ref, embed=embed)

    def total(layer: int, b: int, t: int, i: int, eps: float) -> float:
        def set_embed(act, hook):
            return embed

        def bump(act, hook):
            act = act.clone()
            act[b, t, i] += eps
            return act

        hooks = [("hook_embed", set_embed), (f"blocks.{layer}.hook_mlp_out", bump)]
        with torch.no_grad():
            logits = _forward(model, batch.clean_ids, batch.clean_mask, hooks, batch.logit_start)
        return float(metric_per_item(logits, batch, metric, "mean", ref).sum())

    for layer, b, t, i in [(0, 0, 2, 3), (0, 1, 3, 17), (1, 0, 4, 5), (1, 1, 2, 31)]:
        eps = 1e-3  # RMSNorm computes in float32 even in a float64 model
        fd = (total(layer, b, t, i, eps) - total(layer, b, t, i, -eps)) / (2 * eps)
        assert float(grads[layer, b, t, i]) == pytest.approx(fd, rel=2e-3, abs=1e-7)


@pytest.mark.parametrize("method", ["EAP-IG-inputs", "EAP"])
def test_batched_attribution_equals_batch_of_one(smollm2, method):
    """Right padding makes batch-4 scores equal batch-1 scores (different lengths in the batch)."""
    clean, corr = _texts(smollm2, CLEAN), _texts(smollm2, CORRUPT)
    kw = dict(method=method, intervention="patching", metric="answer_logprob", ig_steps=2, progress=False)
    four = attribute_pairs(smollm2, clean, corr, batch_size=4, **kw)
    one = attribute_pairs(smollm2, clean, corr, batch_size=1, **kw)
    assert four.n_batches == 1 and one.n_batches == 4
    torch.testing.assert_close(four.scores, one.scores, rtol=1e-3, atol=2e-5)
    assert four.clean_metric_mean == pytest.approx(one.clean_metric_mean, abs=1e-5)


def test_mean_positional_counts_real_tokens_only(smollm2):
    """Positional means equal the unpadded per-text average (pads never counted)."""
    texts = _texts(smollm2, [("1+1=", "2"), ("12+13=", "25"), (FEW_SHOT + "2+2=", "4")])
    means = compute_mean_activations(smollm2, texts, batch_size=3, progress=False)
    per_text = []
    for t in texts:
        ids = torch.tensor([t.ids])
        _, acts, _ = _capture(smollm2, ids, torch.ones_like(ids))
        per_text.append(acts[:, 0])  # [L, T, d]
    t0 = 1
    expected = torch.stack([a[:, t0] for a in per_text]).mean(0)
    torch.testing.assert_close(means.positional[:, t0], expected, rtol=1e-4, atol=1e-4)
    last = len(texts[2].ids) - 1  # only the longest text reaches it
    torch.testing.assert_close(means.positional[:, last], per_text[2][:, last], rtol=1e-4, atol=1e-4)
    allpos = torch.cat([a for a in per_text], dim=1).mean(1)
    torch.testing.assert_close(means.mean, allpos, rtol=1e-4, atol=1e-4)
    assert means.at_positions(last + 5).shape == (smollm2.n_layers, last + 5, smollm2.d_model)


def test_faithfulness_full_and_empty_circuits(smollm2):
    """Keeping every unit reproduces the clean run (F = 1); keeping none is the empty run (F = 0)."""
    batch = make_pair_batch(_texts(smollm2, CLEAN[:2]), _texts(smollm2, CORRUPT[:2]), smollm2.tokenizer.pad_token_id)
    L, d = smollm2.n_layers, smollm2.d_model
    full = evaluate_batch(smollm2, batch, torch.ones(L, d, dtype=torch.bool), "zero")
    assert full["NL_c"] == pytest.approx(full["NL_full"]) and full["faithfulness"] == pytest.approx(1.0)
    empty = evaluate_batch(smollm2, batch, torch.zeros(L, d, dtype=torch.bool), "zero")
    assert empty["NL_c"] == pytest.approx(empty["NL_empty"]) and empty["faithfulness"] == 0.0
    assert empty["NL_empty"] < empty["NL_full"]


def test_select_top_units_ranking_and_labels():
    """Signed vs absolute ranking, zero handling, label/neuron formats, node level sums."""
    s = np.zeros((3, 4))
    s[0, 1], s[2, 3], s[1, 0], s[1, 2] = 0.5, -0.9, 0.2, np.nan
    meta, keep = select_top_units(s, 2, "neuron", absolute=True)
    assert list(meta["neuron_label_score"]) == ["('m2', 3)", "('m0', 1)"]
    assert meta["neurons"] == {"m0": [1], "m2": [3]} and meta["units"] == ["m2:3", "m0:1"]
    assert meta["indices"] == [2 * 4 + 3, 1] and keep.sum() == 2 and keep[2, 3]
    assert meta["threshold"] == 0.5 and meta["num_scored"] == 11 and meta["num_considered"] == 3
    signed, _ = select_top_units(s, 5, "neuron")
    assert signed["units"] == ["m0:1", "m1:0", "m2:3"] and signed["was_clipped"]
    with_zero, _ = select_top_units(s, 100, "neuron", include_zero=True)
    assert with_zero["selected_n"] == 11
    nodes, keep = select_top_units(s, 1, "node", absolute=True)
    assert nodes["node_label_score"] == {"m2": -0.9} and keep[2].all() and keep.sum() == 4
    empty, keep = select_top_units(np.zeros((2, 2)), 3, "neuron")
    assert empty["selected_n"] == 0 and empty["empty_reason"] and not keep.any()


def test_methods_and_bad_inputs():
    assert canonical_method("EAP-IG") == "EAP-IG-inputs"
    with pytest.raises(ValueError, match="unknown --method 'EAP-XYZ'"):
        canonical_method("EAP-XYZ")
    with pytest.raises(ValueError, match="not implemented"):
        canonical_method("EAP-IG-activations")
    with pytest.raises(ValueError, match="empty answer"):
        make_pair_batch([EncodedText((1, 2, 3), 3)], [EncodedText((1, 2, 4), 2)], 0)
