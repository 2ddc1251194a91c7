"""The batched ablation engine against TransformerLens `run_with_hooks` generation, one group at a
time and without a KV cache, on the embedded SmolLM2 model."""

from __future__ import annotations

import pytest
import torch

from lib.ablation.engine import AblationEngine, ReplacementValues, mlp_hook_name, normalise_group
from lib.ablation.interventions import MeanRecorder, donor_choice, estimate_replacements

FEW_SHOT = "3+5=8\n9-4=5\n6*7=42\n8/2=4\n"
PROMPTS = [FEW_SHOT + q for q in ("12+7=", "4*6=", "25-3=", "9+9=", "14/2=", "2+28=")]
MAX_NEW = 4


def reference_answers(model, prompts, group, values, decode_only):
    """Greedy answers with `bridge.run_with_hooks` on the full sequence at every step (no cache,
    no padding, one prompt at a time); `values[L]` is a `[S, d]` replacement table."""
    out = []
    tok = model.tokenizer
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        n_prompt = ids.shape[1]
        gen = []
        for _ in range(MAX_NEW):
            seq = torch.cat([ids, torch.tensor([gen], dtype=torch.long)], dim=1) if gen else ids

            def make_hook(layer, units):
                def hook(act, hook=None):
                    act = act.clone()
                    table = values[layer]
                    for t in range(act.shape[1]):
                        if decode_only and t < n_prompt - 1:
                            continue
                        row = (t - (n_prompt - 1)) if decode_only else t
                        act[0, t, units] = table[min(row, table.shape[0] - 1), units].to(act.dtype)
                    return act

                return hook

            hooks = [(mlp_hook_name(L), make_hook(L, ids_)) for L, ids_ in group.items()]
            with torch.inference_mode():
                logits = model.bridge.run_with_hooks(seq, fwd_hooks=hooks)
            nxt = int(logits[0, -1].argmax())
            gen.append(nxt)
            text = tok.decode(gen, skip_special_tokens=True)
            if "\n" in text or nxt == tok.eos_token_id:
                break
        text = tok.decode(gen, skip_special_tokens=True)
        out.append(text[: text.index("\n") + 1] if "\n" in text else text)
    return out


GROUPS = [{20: list(range(0, 576, 2))}, {29: list(range(120))}, {3: [1, 2, 3], 25: [7, 300]}, {28: list(range(576))}]


@pytest.fixture(scope="module")
def engine(smollm2):
    return AblationEngine(smollm2, MAX_NEW, batch_size=64, stop_strings=("\n",), decode_only=True)


@pytest.fixture(scope="module")
def positional_values(smollm2):
    """A made-up per-step table (distinct rows) to check positional indexing exactly."""
    g = torch.Generator().manual_seed(0)
    return {L: torch.randn((MAX_NEW, smollm2.d_model), generator=g) for L in (3, 20, 25, 28, 29)}


def test_batched_groups_equal_one_group_at_a_time_reference(smollm2, engine, positional_values):
    prepared = engine.prepare(PROMPTS)
    repl = ReplacementValues("mean-positional", positional_values)
    batched = engine.generate(prepared, GROUPS, repl)
    changed = 0
    for group, answers in zip(GROUPS, batched):
        ref = reference_answers(smollm2, PROMPTS, group, positional_values, decode_only=True)
        assert answers == ref, group.keys()
    baseline = engine.generate(prepared, [None])[0]
    changed = sum(a != b for answers in batched for a, b in zip(answers, baseline))
    assert changed > 0, "the interventions should change some answers (otherwise the test is vacuous)"


def test_full_sequence_mode_equals_reference(smollm2):
    eng = AblationEngine(smollm2, MAX_NEW, batch_size=64, stop_strings=("\n",), decode_only=False)
    zero = {L: torch.zeros((1, smollm2.d_model)) for L in (20, 29, 3, 25, 28)}
    answers = eng.generate(eng.prepare(PROMPTS[:3]), GROUPS[:2], ReplacementValues("zero"))
    for group, got in zip(GROUPS[:2], answers):
        assert got == reference_answers(smollm2, PROMPTS[:3], group, zero, decode_only=False)


def test_answers_do_not_depend_on_packing(smollm2, positional_values):
    repl = ReplacementValues("mean-positional", positional_values)
    outs = []
    for bs in (3, 7, 64):
        eng = AblationEngine(smollm2, MAX_NEW, batch_size=bs, stop_strings=("\n",), decode_only=True)
        outs.append(eng.generate(eng.prepare(PROMPTS), GROUPS, repl))
    assert outs[0] == outs[1] == outs[2]


def _skip_vs_full(model, prompts, groups, values, batch_size):
    """Answers with layer skipping on and off (same packing), and the unablated baseline."""
    repl = ReplacementValues("mean-positional", values)
    out = []
    for skip in (True, False):
        eng = AblationEngine(model, MAX_NEW, batch_size=batch_size, stop_strings=("\n",), decode_only=True,
                             layer_skip=skip)
        assert (eng.decoder_layers is not None) == skip
        prepared = eng.prepare(prompts)
        out.append(eng.generate(prepared, groups, repl))
    return out[0], out[1], eng.generate(prepared, [None])[0]


def test_layer_skipping_gives_the_answers_of_the_full_forward_pass(smollm2, positional_values):
    """One group per pack (so each pack skips up to its own layer), groups low and high in the
    stack; some answers must change after their first token (rows of one prompt split classes)."""
    g = torch.Generator().manual_seed(1)
    values = {L: 4 * torch.randn((MAX_NEW, smollm2.d_model), generator=g) for L in (1, 14, 27, 29)}
    groups = [{1: list(range(0, 576, 3))}, {14: list(range(300))}, {27: list(range(576))},
              {29: list(range(200, 576))}, {14: [5], 29: list(range(64))}, {}]
    skipped, full, base = _skip_vs_full(smollm2, PROMPTS, groups, values, batch_size=len(PROMPTS))
    assert skipped == full
    later = sum(a != b and a[:1] == b[:1] for answers in full for a, b in zip(answers, base))
    assert later > 0, "no answer changed after its first token: class splitting is not exercised"


def test_layer_skipping_on_gemma3_sliding_window_model(gemma3):
    """Gemma 3 mixes sliding-window and global layers and scales its embeddings inside the
    embedding module; skipping must still reproduce the full forward pass."""
    g = torch.Generator().manual_seed(2)
    d, n = gemma3.d_model, gemma3.n_layers
    values = {L: 4 * torch.randn((MAX_NEW, d), generator=g) for L in (2, n // 2, n - 1)}
    groups = [{2: list(range(0, d, 2))}, {n // 2: list(range(d // 2))}, {n - 1: list(range(d))}]
    skipped, full, _ = _skip_vs_full(gemma3, PROMPTS[:4], groups, values, batch_size=8)
    assert skipped == full


def test_mean_recorder_matches_manual_average(smollm2, engine):
    """Positional means = average of hook_mlp_out at step t of the unablated answers (real tokens)."""
    layers = [5, 17]
    prepared = engine.prepare(PROMPTS)
    rec = MeanRecorder(layers, smollm2.d_model, MAX_NEW)
    answers = engine.record(prepared, rec)
    glob, pos = rec.tables()
    tok = smollm2.tokenizer
    sums = {L: torch.zeros((MAX_NEW, smollm2.d_model), dtype=torch.float64) for L in layers}
    counts = torch.zeros(MAX_NEW)
    for prompt, ans in zip(PROMPTS, answers):
        p_ids = tok(prompt)["input_ids"]
        a_ids = tok(ans, add_special_tokens=False)["input_ids"]
        seq = torch.tensor([p_ids + a_ids[:-1]]) if len(a_ids) > 1 else torch.tensor([p_ids])
        with torch.inference_mode():
            _, cache = smollm2.bridge.run_with_cache(seq, names_filter=[mlp_hook_name(L) for L in layers])
        n_steps = len(a_ids)
        for L in layers:
            act = cache[mlp_hook_name(L)][0].double()
            for t in range(n_steps):
                sums[L][t] += act[len(p_ids) - 1 + t]
        counts[:n_steps] += 1
    for L in layers:
        for t in range(MAX_NEW):
            if counts[t] > 0:
                torch.testing.assert_close(pos[L][t].double(), sums[L][t] / counts[t], atol=2e-3, rtol=1e-3)
        total = sums[L].sum(0) / counts.sum()
        torch.testing.assert_close(glob[L][0].double(), total, atol=2e-3, rtol=1e-3)


def test_donor_choice_picks_closest_other_candidate():
    means = torch.tensor([[0.0, 1.0, 5.0, 10.0]])
    donors = torch.tensor([[0.2, 1.1, 4.0, 9.0]])
    got = donor_choice(means, donors, candidates=[0, 1, 2, 3], ids=[1, 3])
    # unit 1 (mean 1.0): closest non-ablated donor is unit 0 (0.2); unit 3 (mean 10): unit 2 (4.0)
    assert got.tolist() == [[pytest.approx(0.2), pytest.approx(4.0)]]
    assert donor_choice(means, donors, candidates=[1], ids=[1]).tolist() == [[1.0]]


def test_donor_intervention_runs_and_depends_on_group(smollm2):
    eng = AblationEngine(smollm2, 2, batch_size=32, stop_strings=("\n",), decode_only=True)
    repl = estimate_replacements(eng, PROMPTS, "mean-donor", {20: list(range(16))})
    a = repl.group_values(20, [0], smollm2.d_model)
    b = repl.group_values(20, list(range(15)), smollm2.d_model)
    assert a.shape == (1, 1) and b.shape == (1, 15)
    assert torch.isfinite(b).all()


def test_bad_groups_raise(smollm2):
    with pytest.raises(ValueError, match="layer m99"):
        normalise_group({99: [1]}, smollm2.n_layers, smollm2.d_model)
    with pytest.raises(ValueError, match="out of range"):
        normalise_group({3: [576]}, smollm2.n_layers, smollm2.d_model)
    with pytest.raises(ValueError, match="unknown intervention"):
        estimate_replacements(AblationEngine(smollm2, 2), PROMPTS, "resample", {3: [1]})


def reference_first_step(model, prompts, group, values):
    """Log-softmax at the first answer position with `run_with_hooks` on the whole prompt (no cache):
    the decode-only intervention there acts on the last prompt position, with table row 0."""
    tok = model.tokenizer
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]

        def make_hook(layer, units):
            def hook(act, hook=None):
                act = act.clone()
                act[0, -1, units] = values[layer][0, units].to(act.dtype)
                return act

            return hook

        hooks = [(mlp_hook_name(L), make_hook(L, u)) for L, u in group.items()]
        with torch.inference_mode():
            logits = model.bridge.run_with_hooks(ids, fwd_hooks=hooks)
        out.append(torch.log_softmax(logits[0, -1].float(), -1))
    return torch.stack(out)


@pytest.mark.parametrize("layer_skip", [True, False])
def test_first_step_scores_equal_a_plain_forward_pass(smollm2, positional_values, layer_skip):
    eng = AblationEngine(smollm2, MAX_NEW, batch_size=8, stop_strings=("\n",), decode_only=True, layer_skip=layer_skip)
    prepared = eng.prepare(PROMPTS)
    repl = ReplacementValues("mean-positional", positional_values)
    base_tokens = eng.first_tokens(prepared)
    ref_base = reference_first_step(smollm2, PROMPTS, {}, positional_values)
    assert torch.equal(base_tokens, ref_base.argmax(-1))
    answers, scores = eng.generate_scored(prepared, GROUPS, repl, targets=base_tokens)
    assert answers == eng.generate(prepared, GROUPS, repl), "scoring must not change the answers"
    for group, sc in zip(GROUPS, scores):
        ref = reference_first_step(smollm2, PROMPTS, group, positional_values)
        want_lp = ref.gather(1, base_tokens[:, None])[:, 0]
        torch.testing.assert_close(sc.logprob, want_lp, atol=2e-3, rtol=1e-3)
        other = ref.scatter(1, base_tokens[:, None], float("-inf")).max(-1).values
        torch.testing.assert_close(sc.margin, want_lp - other, atol=2e-3, rtol=1e-3)  # log-softmax keeps logit gaps
        assert torch.equal(sc.argmax_tokens, ref.argmax(-1))
    base_lp = ref_base.gather(1, base_tokens[:, None])[:, 0]
    drops = torch.stack([base_lp - sc.logprob for sc in scores])
    assert drops.abs().max() > 0.05, "the interventions should move the first-token log-probability"
