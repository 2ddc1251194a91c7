"""Batched greedy generation with a KV cache, optional forward hooks and per-row early stop.

Prompts are fed verbatim (no chat template), left-padded, left-truncated to
`n_ctx - max_new_tokens`. Decoding is argmax; a row is finished at an EOS token or when its
text contains a stop string, and decoding ends when every row of the batch is finished.
With hooks, `hook_scope="answer"` prefills all prompt tokens but the last without hooks and
runs the last prompt position and every decode step hooked (DESIGN 4.2); `"all"` hooks every call.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from lib.models.loading import LoadedModel

__all__ = ["greedy_generate", "eos_token_ids", "length_sorted_batches", "shared_prefix_length"]

FwdHooks = Sequence[tuple[str | Callable[[str], bool], Callable]]
BatchCallback = Callable[[list[int], list[str]], None]


def eos_token_ids(model: LoadedModel) -> list[int]:
    """EOS ids as `generate` uses them: the generation config's, plus the tokenizer's."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model.hf_model, "generation_config", None), "eos_token_id", None)
    for v in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [model.tokenizer.eos_token_id]:
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return ids


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first) to minimise padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """Text up to and including the earliest stop string, and whether one was found."""
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return (text[: min(ends)], True) if ends else (text, False)


def shared_prefix_length(encoded: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving at least one token of each prompt outside."""
    if not encoded:
        return 0
    limit = min(len(e) for e in encoded) - 1
    first = encoded[0]
    n = 0
    while n < limit and all(e[n] == first[n] for e in encoded):
        n += 1
    return n


@torch.inference_mode()
def _prefill_prefix(model: LoadedModel, prefix: Sequence[int]) -> Any:
    """KV cache of a token prefix shared by all prompts, computed once with batch size 1."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([list(prefix)], device=model.device)
    model.bridge(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


@torch.inference_mode()
def _generate_batch(
    model: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_ids: list[int],
    stop_strings: Sequence[str],
    fwd_hooks: FwdHooks | None,
    hook_scope: Literal["all", "answer"],
    prefix_cache: Any = None,
    prefix_len: int = 0,
) -> list[str]:
    """Decode one left-padded batch; `input_ids` continue the optional shared `prefix_cache`."""
    from transformers import DynamicCache

    bridge, tok = model.bridge, model.tokenizer
    n = input_ids.shape[0]
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(n)
        ones = torch.ones((n, prefix_len), dtype=attention_mask.dtype, device=attention_mask.device)
        full_mask = torch.cat([ones, attention_mask], dim=1)
    else:
        cache, full_mask = DynamicCache(), attention_mask
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]
    eos = torch.tensor(eos_ids, device=input_ids.device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]

    def forward(ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, hooked: bool) -> torch.Tensor:
        kwargs = dict(attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if hooked and fwd_hooks:
            with bridge.hooks(fwd_hooks=list(fwd_hooks)):
                return bridge(ids, **kwargs)
        return bridge(ids, **kwargs)

    if fwd_hooks and hook_scope == "answer" and input_ids.shape[1] > 1:
        forward(input_ids[:, :-1], full_mask[:, :-1], position_ids[:, :-1], hooked=False)
        logits = forward(input_ids[:, -1:], full_mask, position_ids[:, -1:], hooked=True)
    else:
        logits = forward(input_ids, full_mask, position_ids, hooked=True)

    generated = torch.empty((n, 0), dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
    mask, last_pos = full_mask, position_ids[:, -1:]
    for step in range(max_new_tokens):
        nxt = logits[:, -1, :].argmax(dim=-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        generated = torch.cat([generated, nxt[:, None]], dim=1)
        finished |= torch.isin(nxt, eos)
        if stop_strings:
            for r in torch.nonzero(~finished).flatten().tolist():
                text = tok.decode(generated[r], skip_special_tokens=True)
                if _cut_at_stop(text, stop_strings)[1]:
                    finished[r] = True
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=mask.device)], dim=1)
        last_pos = last_pos + 1
        logits = forward(nxt[:, None], mask, last_pos, hooked=True)

    texts = [tok.decode(row, skip_special_tokens=True) for row in generated]
    return [_cut_at_stop(t, stop_strings)[0] for t in texts] if stop_strings else texts


def greedy_generate(
    model: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    stop_strings: Sequence[str] = (),
    fwd_hooks: FwdHooks | None = None,
    hook_scope: Literal["all", "answer"] = "all",
    on_batch: BatchCallback | None = None,
    progress: bool | str = False,
    share_prefix: bool = True,
) -> list[str]:
    """Greedy answers (decoded new tokens, special tokens skipped, not stripped), in prompt order.

    A token prefix common to all prompts (a few-shot block, an instruction) is prefilled once
    and its KV cache shared (not with hooks on every position, `hook_scope="all"`).
    `on_batch(indices, answers)` is called after each batch (used for checkpointing).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if max_new_tokens < 1 or not prompts:
        return [""] * len(prompts)
    tok = model.tokenizer
    max_len = max(1, model.n_ctx - max_new_tokens)
    encoded = tok(list(prompts), add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
    eos_ids = eos_token_ids(model)
    answers: list[str | None] = [None] * len(prompts)
    prefix_len = shared_prefix_length(encoded) if share_prefix and not (fwd_hooks and hook_scope == "all") else 0
    prefix_cache = _prefill_prefix(model, encoded[0][:prefix_len]) if prefix_len > 0 else None
    batches = length_sorted_batches([len(e) for e in encoded], batch_size)
    desc = progress if isinstance(progress, str) else "generating"
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    for idx in batches:
        batch = tok.pad({"input_ids": [encoded[i][prefix_len:] for i in idx]}, padding=True, return_tensors="pt")
        ids = batch["input_ids"].to(model.device)
        am = batch["attention_mask"].to(model.device)
        texts = _generate_batch(model, ids, am, max_new_tokens, eos_ids, stop_strings, fwd_hooks, hook_scope,
                                prefix_cache, prefix_len)
        for i, t in zip(idx, texts):
            answers[i] = t
        if on_batch is not None:
            on_batch(list(idx), texts)
        bar.update(len(idx))
    bar.close()
    return [a if a is not None else "" for a in answers]
