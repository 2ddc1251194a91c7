"""Batched greedy generation against Hugging Face `generate`, with real forward passes."""

from __future__ import annotations

import pytest
import torch

from lib.models.generation import eos_token_ids, greedy_generate, length_sorted_batches, shared_prefix_length

MIXED_PROMPTS = [
    "1+2=", "12*7=", "100-55=", "9/3=", "250+250=", "3*3=", "77-78=", "5+5=",
    "The capital of France is", "Once upon a time", "def add(a, b):", "Q: What is 2+2?\nA:",
    "Hello", "1, 2, 3,", "The quick brown fox", "x",
]
FEW_SHOT = "3+5=8\n9-4=5\n6*7=42\n8/2=4\n"
FEW_SHOT_PROMPTS = [f"{FEW_SHOT}{a}{op}{b}=" for a, op, b in
                    [(1, "+", 2), (12, "*", 7), (29, "-", 5), (9, "/", 3), (20, "+", 25), (3, "*", 3),
                     (7, "-", 8), (15, "+", 15), (0, "*", 4), (6, "/", 2), (11, "+", 13), (14, "-", 9)]]


def hf_generate(model, prompts, max_new_tokens):
    """Reference answers from plain Hugging Face `generate` (one left-padded batch)."""
    tok = model.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.hf_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)


def test_matches_hf_generate_token_for_token(smollm2):
    ours = greedy_generate(smollm2, MIXED_PROMPTS, max_new_tokens=8, batch_size=16)
    assert ours == hf_generate(smollm2, MIXED_PROMPTS, 8)
    assert len(set(ours)) > 8  # real, varied continuations


def test_shared_prefix_cache_matches_hf_generate(smollm2):
    encoded = smollm2.tokenizer(FEW_SHOT_PROMPTS)["input_ids"]
    assert shared_prefix_length(encoded) >= 10  # the few-shot block really is shared
    ours = greedy_generate(smollm2, FEW_SHOT_PROMPTS, max_new_tokens=6, batch_size=16, share_prefix=True)
    plain = greedy_generate(smollm2, FEW_SHOT_PROMPTS, max_new_tokens=6, batch_size=16, share_prefix=False)
    assert ours == plain == hf_generate(smollm2, FEW_SHOT_PROMPTS, 6)


def test_batch_size_does_not_change_answers(smollm2):
    ref = greedy_generate(smollm2, MIXED_PROMPTS, max_new_tokens=6, batch_size=16)
    for bs in (1, 5):
        assert greedy_generate(smollm2, MIXED_PROMPTS, max_new_tokens=6, batch_size=bs) == ref


def test_stop_strings_cut_answers_at_first_newline(smollm2):
    full = greedy_generate(smollm2, FEW_SHOT_PROMPTS, max_new_tokens=6, batch_size=8)
    cut = greedy_generate(smollm2, FEW_SHOT_PROMPTS, max_new_tokens=6, batch_size=8, stop_strings=("\n",))
    assert any("\n" in f and f.index("\n") < len(f) - 1 for f in full)  # some answers run past the line
    for f, c in zip(full, cut):
        assert f.startswith(c)
        assert c.count("\n") <= 1 and (not c or "\n" not in c[:-1])
        if "\n" in f:
            assert c == f[: f.index("\n") + 1]


def test_on_batch_reports_every_prompt_once(smollm2):
    seen: list[int] = []
    answers = greedy_generate(smollm2, MIXED_PROMPTS, max_new_tokens=2, batch_size=5,
                              on_batch=lambda idx, texts: seen.extend(idx))
    assert sorted(seen) == list(range(len(MIXED_PROMPTS)))
    assert len(answers) == len(MIXED_PROMPTS)


def test_identity_hook_changes_nothing_and_real_ablation_does(smollm2):
    ref = greedy_generate(smollm2, FEW_SHOT_PROMPTS, max_new_tokens=4, batch_size=12)
    ident = greedy_generate(smollm2, FEW_SHOT_PROMPTS, max_new_tokens=4, batch_size=12,
                            fwd_hooks=[("blocks.5.hook_mlp_out", lambda act, hook: act)])
    assert ident == ref

    def zero(act, hook):
        act[...] = 0.0
        return act

    hooks = [(f"blocks.{layer}.hook_mlp_out", zero) for layer in range(smollm2.n_layers)]
    ablated = greedy_generate(smollm2, FEW_SHOT_PROMPTS, max_new_tokens=4, batch_size=12, fwd_hooks=hooks)
    assert ablated != ref


@pytest.mark.parametrize("scope", ["all", "answer"])
def test_hook_scope_controls_which_positions_are_hooked(smollm2, scope):
    seen_lengths: list[int] = []

    def record(act, hook):
        seen_lengths.append(act.shape[1])
        return act

    prompts = FEW_SHOT_PROMPTS[:4]
    n_tokens = max(len(e) for e in smollm2.tokenizer(prompts)["input_ids"])
    greedy_generate(smollm2, prompts, max_new_tokens=3, batch_size=4,
                    fwd_hooks=[("blocks.0.hook_mlp_out", record)], hook_scope=scope)
    if scope == "all":
        assert seen_lengths[0] == n_tokens  # whole prompt hooked (no shared prefix with hooks on it)
    else:
        assert seen_lengths and all(n == 1 for n in seen_lengths)  # last prompt position + decode steps
        assert len(seen_lengths) >= 2


def test_length_sorted_batches_cover_all_indices():
    batches = length_sorted_batches([3, 9, 1, 9, 4], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_eos_ids_include_tokenizer_eos(smollm2):
    assert smollm2.tokenizer.eos_token_id in eos_token_ids(smollm2)


def test_gemma3_loads_and_matches_hf_generate(gemma3):
    prompts = FEW_SHOT_PROMPTS[:6]
    ours = greedy_generate(gemma3, prompts, max_new_tokens=4, batch_size=6)
    assert ours == hf_generate(gemma3, prompts, 4)
    assert gemma3.n_layers == 18 and gemma3.d_model == 640
    assert any(a.strip() for a in ours)
