"""Benchmark: group tests per second of the batched ablation engine against the original's scheme.

The original evaluates one group per generation: for every group it deep-copies the prompts'
KV cache, decodes all MAX_NEW_TOKENS steps for every row (no per-row stop; only EOS on every row
ends early) and runs one extra forward pass after the last token. Here that scheme runs with the
same decode-only semantics as ours (the last prompt position and each decode step intervened),
so all must give identical answers; ours packs many groups per forward pass, shares the cache
read-only, drops finished rows and (unless --no_layer_skip) runs the layers below each group's
lowest ablated layer once per class of identical rows instead of once per row.

All run the same groups on the same prompts, in one process, one after the other (rotated order
over --repeats rounds; best wall time per method). Printed: group tests per second of each, the
ratio to the sequential scheme, and the fraction of answers identical to it (after cutting at the
task's stop string). Groups sit on random layers (uniform), so layer skipping saves about half
of the layer compute here; candidates of the last layers only (`--last_k_layers`) save more.

Run: .env/bin/python bench/ablation_throughput.py [--n_prompts 64] [--n_groups 32] [--batch_size 512]
Timings are machine-dependent and never asserted anywhere.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.ablation.engine import AblationEngine, ReplacementValues, mlp_hook_name  # noqa: E402
from lib.models.generation import _cut_at_stop, eos_token_ids  # noqa: E402
from lib.models.loading import LoadedModel, load_analysed_model  # noqa: E402
from lib.tasks.arithmetic_task import FEW_SHOT_PREFIX, TASK_SPEC  # noqa: E402


@torch.inference_mode()
def sequential_scheme(model: LoadedModel, prompts: list[str], groups: list[dict[int, list[int]]],
                      max_new_tokens: int, stop: tuple[str, ...]) -> list[list[str]]:
    """One group per generation with a deep-copied prompt cache (all prompts in one batch)."""
    from transformers import DynamicCache

    tok = model.tokenizer
    batch = tok(prompts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    base = DynamicCache()
    model.bridge(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], past_key_values=base,
                 use_cache=True, logits_to_keep=1)
    eos = torch.tensor(eos_token_ids(model), device=model.device)
    out = []
    for group in groups:
        def make(layer_ids):
            def hook(act, hook=None):
                act = act.clone()
                act[:, -1, layer_ids] = 0.0
                return act
            return hook

        hooks = [(mlp_hook_name(L), make(v)) for L, v in group.items()]
        cache = copy.deepcopy(base)
        cur, m, p = ids[:, -1:], mask, pos[:, -1:]
        gen = []
        done = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
        for step in range(max_new_tokens + 1):  # +1: the original's extra pass after the last token
            with model.bridge.hooks(fwd_hooks=hooks):
                logits = model.bridge(cur, attention_mask=m, position_ids=p, past_key_values=cache, use_cache=True,
                                      logits_to_keep=1)
            if step == max_new_tokens:
                break
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, int(eos[0])), nxt)
            gen.append(nxt)
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            cur, p = nxt[:, None], p + 1
            m = torch.cat([m, torch.ones((len(prompts), 1), dtype=m.dtype, device=m.device)], dim=1)
        toks = torch.stack(gen, 1)
        out.append([_cut_at_stop(tok.decode(t, skip_special_tokens=True), stop)[0] for t in toks])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct-q4_1")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n_prompts", type=int, default=64, help="prompts per group test (the pipeline uses 128)")
    ap.add_argument("--n_groups", type=int, default=32)
    ap.add_argument("--batch_size", type=int, default=512, help="rows per forward pass of the batched engine")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min_layer", type=int, default=0,
                    help="groups on layers >= this only (e.g. n_layers-4 mimics --last_k_layers 4)")
    a = ap.parse_args()
    model = load_analysed_model(a.model, device=a.device)
    rng = np.random.default_rng(a.seed)
    prompts = [FEW_SHOT_PREFIX + f"{x}{op}{y}=" for x, op, y in
               zip(rng.integers(0, 30, a.n_prompts), rng.choice(list("+-*"), a.n_prompts), rng.integers(1, 30, a.n_prompts))]
    sizes = [1, 4, 16, 64, 288]
    groups = [{int(rng.integers(a.min_layer, model.n_layers)): sorted(rng.choice(model.d_model, size=sizes[i % len(sizes)],
                                                                      replace=False).tolist())}
              for i in range(a.n_groups)]
    stop = tuple(TASK_SPEC.generation_stop_strings(argparse.Namespace(), a.model))
    def engine_method(layer_skip: bool):
        engine = AblationEngine(model, TASK_SPEC.MAX_NEW_TOKENS, a.batch_size, stop, decode_only=True,
                                layer_skip=layer_skip)
        prepared = engine.prepare(prompts)
        return lambda: engine.generate(prepared, groups, ReplacementValues("zero"))

    def sequential() -> list[list[str]]:
        return sequential_scheme(model, prompts, groups, TASK_SPEC.MAX_NEW_TOKENS, stop)

    methods = {"sequential (original scheme)": sequential,
               "batched, no layer skipping": engine_method(False),
               "batched engine (default)": engine_method(True)}
    best = {k: float("inf") for k in methods}
    answers = {}
    names = list(methods)
    methods[names[-1]]()  # warm-up
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            answers[name] = methods[name]()
            best[name] = min(best[name], time.perf_counter() - t)
    seq = answers[names[0]]
    print(f"model {a.model} on {model.device}; {a.n_groups} groups × {a.n_prompts} prompts on layers "
          f">= {a.min_layer}; batched engine batch_size {a.batch_size} rows; torch threads {torch.get_num_threads()}")
    print(f"{'method':32s} {'wall s':>8s} {'group tests/s':>14s} {'speed-up':>9s} {'identical':>10s}")
    for name in names:
        same = np.mean([x == y for gs, gb in zip(seq, answers[name]) for x, y in zip(gs, gb)])
        print(f"{name:32s} {best[name]:8.2f} {a.n_groups / best[name]:14.2f} "
              f"{best[names[0]] / best[name]:8.2f}x {same:10.4f}")


if __name__ == "__main__":
    main()
