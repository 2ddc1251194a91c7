"""Benchmark: stage-1 greedy generation against Hugging Face `generate`, side by side in one run.

Loads the analysed model once and answers the arithmetic task's embedded-default prompts
(few-shot prefix, operands in [0, 30), operator-stratified subsample) four ways:

  (a) `model.hf_model.generate` -- greedy, left-padded, prompts in construction order; the reference
  (b) `lib.models.generation.greedy_generate(share_prefix=False)`, no stop strings
  (c) `greedy_generate(share_prefix=True)`, no stop strings (few-shot prefix prefilled once)
  (d) `greedy_generate(share_prefix=True)` with the task's stop strings (the real stage-1 setting)

All use the same batch size and token budget (the task's MAX_NEW_TOKENS unless overridden).
Each method is warmed up once on a few prompts, then timed with time.perf_counter over
--repeats rounds (methods in rotated order each round; best time per method reported, so
load from other processes inflates the numbers less). How to read the table:

  * `speedup` is wall(a) / wall(method): above 1.0 the method is faster than HF `generate`,
    below 1.0 slower. Both run the same modules (boot_transformers wraps the HF model's
    submodules in place), so (b) vs (a) compares our decode loop with HF's (length-sorted
    batches, fewer padded tokens); (c) vs (b) is the gain from prefilling the shared few-shot
    prefix once; (d) vs (c) is the gain (or cost) of ending rows at a stop string.
  * `same raw` is the fraction of answers byte-identical to (a); it should be ~1.0 for (b)
    and (c) (tiny float differences can flip a near-tied argmax). (d) is cut at the stop
    string, so its raw text differs by design; compare it with `same scored`, the fraction
    whose scored region (`answer_region`, the first line of a few-shot answer) equals (a)'s.

Run: .env/bin/python bench/bench_generation.py [--model ALIAS] [--n_prompts 256] [--batch_size 64]
Timings are machine-dependent and never asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lib.models.generation import eos_token_ids, greedy_generate  # noqa: E402
from lib.models.loading import LoadedModel, load_analysed_model  # noqa: E402
from lib.tasks.arithmetic_task import TASK_SPEC, answer_region  # noqa: E402


def hf_generate(model: LoadedModel, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Reference: HF greedy `generate`, left padding, batches in construction order."""
    tok = model.tokenizer
    eos = eos_token_ids(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tok(list(prompts[start : start + batch_size]), add_special_tokens=True, padding=True,
                    return_tensors="pt")
        ids = batch["input_ids"].to(model.device)
        mask = batch["attention_mask"].to(model.device)
        with torch.inference_mode():
            out = model.hf_model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None, pad_token_id=pad_id, eos_token_id=eos,
            )
        answers.extend(tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True))
    return answers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def run_timed(fn: Callable[[], list[str]], device: torch.device) -> tuple[float, list[str]]:
    """Wall time of one run (device synchronised on both sides), and its answers."""
    _sync(device)
    t0 = time.perf_counter()
    answers = fn()
    _sync(device)
    return time.perf_counter() - t0, answers


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:  # pragma: no cover - not on every platform
        return "load average unavailable"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct-q4_1", help="--ai_model alias/path/id")
    parser.add_argument("--n_prompts", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max_new_tokens", type=int, default=TASK_SPEC.MAX_NEW_TOKENS)
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed rounds; each round runs every method once, in a rotated order, and the "
                             "best time per method is reported (robust to other load on the machine)")
    parser.add_argument("--warmup_prompts", type=int, default=8)
    args = parser.parse_args(argv)

    t_load = time.perf_counter()
    model = load_analysed_model(args.model, device=args.device, dtype=args.dtype)
    t_load = time.perf_counter() - t_load

    ns = argparse.Namespace(prompt_format="auto", operand_range=None, max_prompts=args.n_prompts, seed=0)
    records = TASK_SPEC.build_prompts(ns, model_alias=args.model)
    prompts = [r["prompt"] for r in records]
    stops = TASK_SPEC.generation_stop_strings(ns, args.model)
    bs, mnt = args.batch_size, args.max_new_tokens

    print("bench_generation: greedy generation, HF generate vs lib.models.generation.greedy_generate")
    print(f"  device          {model.device}" + (f" ({torch.cuda.get_device_name(model.device)})"
                                                 if model.device.type == "cuda" else ""))
    print(f"  torch threads   {torch.get_num_threads()}   torch {torch.__version__}")
    print(f"  model           {args.model} ({model.n_layers} layers, d_model {model.d_model}, {model.dtype});"
          f" loaded in {t_load:.1f} s")
    print(f"  n_prompts       {len(prompts)}   batch_size {bs}   max_new_tokens {mnt}   repeats {args.repeats}")
    print(f"  task stop strs  {stops!r}   example prompt {prompts[0]!r}")
    print(f"  before timing   {_load()} (other load on the machine inflates the times)")

    methods: list[tuple[str, Callable[[Sequence[str]], list[str]]]] = [
        ("(a) HF generate", lambda ps: hf_generate(model, ps, mnt, bs)),
        ("(b) greedy, no prefix share", lambda ps: greedy_generate(model, ps, mnt, bs, share_prefix=False)),
        ("(c) greedy, prefix share", lambda ps: greedy_generate(model, ps, mnt, bs, share_prefix=True)),
        ("(d) greedy, prefix + stop", lambda ps: greedy_generate(model, ps, mnt, bs, stop_strings=stops,
                                                                   share_prefix=True)),
    ]

    warm = prompts[: max(1, min(args.warmup_prompts, len(prompts)))]
    for _, fn in methods:
        fn(warm)

    walls: list[list[float]] = [[] for _ in methods]
    answers_of: list[list[str]] = [[] for _ in methods]
    for r in range(max(1, args.repeats)):
        order = [(r + k) % len(methods) for k in range(len(methods))]  # rotate so no method always goes first
        for i in order:
            wall, answers = run_timed(lambda: methods[i][1](prompts), model.device)
            walls[i].append(wall)
            if r > 0 and answers != answers_of[i]:
                print(f"warning: {methods[i][0]} gave different answers in round {r + 1}")
            answers_of[i] = answers
    results = [(name, min(walls[i]), answers_of[i]) for i, (name, _) in enumerate(methods)]
    print(f"  after timing    {_load()}")

    ref_wall, ref = results[0][1], results[0][2]
    ref_scored = [answer_region(p, a) for p, a in zip(prompts, ref)]
    n = len(prompts)
    header = f"{'method':<30} {'wall s':>8} {'prompts/s':>10} {'speedup':>8} {'same raw':>9} {'same scored':>12}"
    print()
    print(header)
    print("-" * len(header))
    for i, (name, wall, answers) in enumerate(results):
        same_raw = sum(a == r for a, r in zip(answers, ref)) / n
        same_scored = sum(answer_region(p, a) == s for p, a, s in zip(prompts, answers, ref_scored)) / n
        raw_col = "ref" if i == 0 else ("(cut)" if name.startswith("(d)") else f"{same_raw:.3f}")
        scored_col = "ref" if i == 0 else f"{same_scored:.3f}"
        print(f"{name:<30} {wall:>8.2f} {n / wall:>10.1f} {ref_wall / wall:>7.2f}x {raw_col:>9} {scored_col:>12}")
    print()
    print(f"speedup = wall(a) / wall(method); > 1 is faster than HF generate. Best of {max(1, args.repeats)} round(s);")
    print("every round's wall s (a large spread means other load on the machine):")
    for (name, _), w in zip(methods, walls):
        print(f"  {name:<30} " + " ".join(f"{x:7.2f}" for x in w))

    diffs = [(p, r, a) for p, r, a in zip(prompts, ref, results[2][2]) if r != a]
    if diffs:
        print(f"first differences (c) vs (a), of {len(diffs)}:")
        for p, r, a in diffs[:3]:
            print(f"  {p.splitlines()[-1]!r}: (a) {r!r}  (c) {a!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
