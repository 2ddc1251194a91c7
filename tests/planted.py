"""Planted units for ground-truth tests of stages 6-7: permanent bridge hooks make ablating chosen
`hook_mlp_out` coordinates break the model's answer (optionally only on prompts that end with a
chosen token), and leave it unchanged otherwise."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Mapping, Sequence

import torch

PLANTED = {10: [33, 201], 20: [77]}
BIG = 1000.0


@contextmanager
def planted_model(model, planted: Mapping[int, Sequence[int]] = PLANTED, gate_token: int | None = None):
    """Make ablating any planted `hook_mlp_out` coordinate break the model, and nothing else change.

    Each planted MLP write gets +BIG; right after the block the residual is checked: if every
    planted write still carries its +BIG it is removed again (the model is unchanged), otherwise
    the residual of that position is zeroed (the answer is destroyed). With `gate_token`, only
    positions whose input token is `gate_token` are destroyed (so only prompts ending with that
    token flip, at the first answer token)."""
    bridge = model.bridge
    stash: dict = {}
    if gate_token is not None:
        ref = model.hf_model.get_input_embeddings().weight[int(gate_token)].detach().clone()

        def gate(act, hook=None):
            stash["gate"] = ((act - ref.to(act.dtype)).abs().amax(-1) < 1e-6)[..., None]
            return act

        bridge.add_hook("hook_embed", gate, is_permanent=True)
    for layer, ids in planted.items():
        ids = list(ids)

        def add(act, hook=None, ids=ids):
            act = act.clone()
            act[..., ids] += BIG
            return act

        def keep_mid(act, hook=None, layer=layer):
            stash[layer] = act.detach().clone()
            return act

        def check(act, hook=None, layer=layer, ids=ids):
            written = act[..., ids] - stash[layer][..., ids]
            broken = (written < BIG / 2).any(-1, keepdim=True)
            if gate_token is not None:
                broken = broken & stash["gate"]
            fixed = act.clone()
            fixed[..., ids] -= BIG * (written >= BIG / 2).to(act.dtype)  # an ablated write carries no +BIG
            return torch.where(broken, torch.zeros_like(act), fixed)

        bridge.add_hook(f"blocks.{layer}.hook_mlp_out", add, is_permanent=True)
        bridge.add_hook(f"blocks.{layer}.hook_resid_mid", keep_mid, is_permanent=True)
        bridge.add_hook(f"blocks.{layer}.hook_resid_post", check, is_permanent=True)
    try:
        yield model
    finally:
        bridge.reset_hooks(including_permanent=True)
