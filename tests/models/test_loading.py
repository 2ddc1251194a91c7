"""Loading the embedded models for real: conversion cache fidelity, bridge hooks, errors."""

from __future__ import annotations

import pytest
import torch

from lib.models.resolution import ModelResolutionError
from lib.models.loading import load_analysed_model, model_cache_root


def test_smollm2_bridge_shape_and_hooks(smollm2):
    assert (smollm2.n_layers, smollm2.d_model) == (30, 576)
    assert smollm2.tokenizer.padding_side == "left" and smollm2.tokenizer.pad_token is not None
    for name in ("blocks.0.hook_mlp_out", "blocks.29.hook_mlp_out", "hook_embed", "ln_final.hook_normalized"):
        assert name in smollm2.bridge.hook_dict, name


def test_bridge_logits_equal_hf_model_logits(smollm2):
    enc = smollm2.tokenizer(["12+7=", "The capital of France is"], return_tensors="pt", padding=True)
    pos = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        hf = smollm2.hf_model(**enc, position_ids=pos).logits
        ours = smollm2.bridge(enc.input_ids, attention_mask=enc.attention_mask, position_ids=pos)
    torch.testing.assert_close(ours, hf, rtol=0, atol=0)


def test_converted_weights_equal_direct_gguf_dequantisation(smollm2):
    """The fp32 conversion cache holds exactly what transformers dequantises from the GGUF."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(smollm2.source.location)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  attn_implementation="eager")
    texts = ["12+7=", "<|im_start|>user\nHi<|im_end|>", "Ünïcode ✓ 3.14"]
    assert [tok(t).input_ids for t in texts] == [smollm2.tokenizer(t).input_ids for t in texts]
    emb = direct.get_input_embeddings().weight
    assert torch.equal(emb, smollm2.hf_model.get_input_embeddings().weight)
    ids = torch.tensor([tok("The quick brown fox jumps over 12+7=").input_ids])
    with torch.inference_mode():
        ref = direct(ids).logits
        ours = smollm2.hf_model(ids).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_unknown_alias_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHARULE_MODEL_CACHE", str(tmp_path))
    with pytest.raises(ModelResolutionError, match="smollm2-135m-instruct-q4_1"):
        load_analysed_model("smollm2-135m")


def test_offline_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MECHARULE_MODEL_CACHE", str(tmp_path))
    with pytest.raises(ModelResolutionError) as err:
        load_analysed_model("nobody-has/this-model", ai_model_cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "nobody-has/this-model" in msg and "HF_HUB_OFFLINE" in msg and "embedded alias" in msg
    assert "Traceback" not in msg


def test_model_cache_root_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHARULE_MODEL_CACHE", str(tmp_path / "mc"))
    assert model_cache_root() == tmp_path / "mc" and (tmp_path / "mc").is_dir()
