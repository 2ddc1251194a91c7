"""Benchmark: rank agreement of EAP / EAP-IG-inputs scores with exact single-unit patching on one circuit.

Why: stage 5 keeps the top-k units by |attribution score| and stage 6 searches among them, so the order of
the scores matters, not only their sign. Exact patching is the quantity the scores approximate: the change
of the metric when one `hook_mlp_out` coordinate alone takes its corrupted value (everything else clean).

What: `--n_prompts` clean/corrupted pairs from the arithmetic task's own prompts (an addition `a+b=` with
its true result; the same operands under another operator, `-` or `*`, as the corrupted prompt; `--seed`
draws both). Every method of `lib/attribution/eap.py` scores all units (EAP at the clean input; EAP-IG-inputs
at each of `--ig_steps`; `EAP-IG` is an alias of EAP-IG-inputs and gives the same scores). The circuit is the
top `--top_k` units by |score| of `--select` (default the pipeline's stage-5 setting, EAP-IG-inputs with
m = 3) within `--layers`; each of those units is then patched alone, exactly, on all pairs, at the
positions the scores intervene on (`exact_unit_effects` of lib/attribution/eap.py). Printed side by side on
those same units: Spearman rho and Kendall tau of the signed scores against the exact effects, Spearman rho
of |score| against |effect| (order of magnitudes inside the circuit), signs that agree, and wall times
(scores: all units of all layers; exact: the top-k units). A shuffled copy of the `--select`
scores (`--seed`) gives the chance level.

  .env/bin/python bench/attribution_rank.py                         # 8 pairs, top 50 over all layers
  .env/bin/python bench/attribution_rank.py --layers 20,21,22,23 --decode_only --n_prompts 16
Timings are machine-dependent and never asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
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
from scipy.stats import kendalltau, spearmanr  # noqa: E402

from lib.attribution.eap import (METHODS, METRICS, EncodedText, attribute_pairs, canonical_method,  # noqa: E402
                                 encode_text, exact_unit_effects)
from lib.models.loading import LoadedModel, load_analysed_model  # noqa: E402
from lib.tasks.arithmetic_task import TASK_SPEC, parse_arithmetic_prompt, true_result  # noqa: E402


def operator_swap_pairs(model: LoadedModel, n: int, seed: int) -> tuple[list[EncodedText], list[EncodedText]]:
    """`n` additions with their true results and the same operands under `-` or `*` as the corrupted prompts."""
    additions = [r["prompt"] for r in TASK_SPEC.build_prompts(None, model.spec) if r["operator"] == "+"]
    rng = np.random.default_rng(seed)
    clean, corrupted = [], []
    for i in rng.choice(len(additions), size=min(n, len(additions)), replace=False):
        prompt = additions[int(i)]
        other = prompt[: prompt.rindex("+")] + str(rng.choice(["-", "*"])) + prompt[prompt.rindex("+") + 1:]
        for p, out in ((prompt, clean), (other, corrupted)):
            out.append(encode_text(model.tokenizer, p, str(true_result(parse_arithmetic_prompt(p)))))
    return clean, corrupted


def _sync(device: torch.device) -> None:
    """Wait for queued device work so wall times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def agreement(scores: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """Signed Spearman rho and Kendall tau, Spearman rho of magnitudes, and the sign-agreement count."""
    return {"spearman": float(spearmanr(scores, exact).statistic),
            "kendall": float(kendalltau(scores, exact).statistic),
            "spearman_abs": float(spearmanr(np.abs(scores), np.abs(exact)).statistic),
            "signs_agree": int(np.sum((scores > 0) == (exact > 0)))}


def _load() -> str:
    """Load average of this machine (timings under load are slower)."""
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:  # pragma: no cover - not on every platform
        return "load average unknown"


def main() -> None:
    """Score, select the circuit, patch its units exactly, print the comparison table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct-q4_1")
    ap.add_argument("--seed", type=int, default=0, help="draws the pairs and the shuffled baseline")
    ap.add_argument("--n_prompts", type=int, default=8, help="clean/corrupted pairs")
    ap.add_argument("--top_k", type=int, default=50, help="circuit size: units compared")
    ap.add_argument("--layers", default=None, help="comma-separated layers the circuit is chosen from (default all)")
    ap.add_argument("--ig_steps", type=int, nargs="+", default=[1, 3, 8], help="EAP-IG-inputs steps m to compare")
    ap.add_argument("--select", default="EAP-IG-inputs", help="method whose top-k by |score| is the circuit")
    ap.add_argument("--select_ig_steps", type=int, default=3, help="m of --select (the pipeline's default: 3)")
    ap.add_argument("--metric", choices=METRICS, default="answer_logprob")
    ap.add_argument("--decode_only", action="store_true", help="intervene only at answer-predicting positions")
    ap.add_argument("--batch_size", type=int, default=8, help="pairs per attribution / patching batch")
    ap.add_argument("--max_rows", type=int, default=64, help="rows (units x pairs) per exact-patching forward pass")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out_json", default=None, help="also write the figures here")
    a = ap.parse_args()

    model = load_analysed_model(a.model, device=a.device)
    L, d = model.n_layers, model.d_model
    layers = list(range(L)) if a.layers is None else [int(x) for x in a.layers.split(",")]
    if any(not 0 <= x < L for x in layers):
        raise SystemExit(f"--layers {a.layers}: layers are 0..{L - 1}")
    clean, corrupted = operator_swap_pairs(model, a.n_prompts, a.seed)
    select = canonical_method(a.select)
    variants = []  # (label, method, m): every method of lib/attribution/eap.py once, EAP-IG-inputs per m
    for method in dict.fromkeys(canonical_method(m) for m in METHODS):
        steps = sorted(set(a.ig_steps) | ({a.select_ig_steps} if select == method else set()))
        variants += [(method, method, 1)] if method == "EAP" else [(f"{method} m={m}", method, m) for m in steps]
    scores, walls = {}, {}
    with torch.no_grad():  # first pass pays one-off costs outside the timings
        model.bridge(torch.tensor([clean[0].ids], device=model.device))
    for label, method, m in variants:
        _sync(model.device)
        t0 = time.perf_counter()
        res = attribute_pairs(model, clean, corrupted, method=method, intervention="patching", metric=a.metric,
                              ig_steps=m, batch_size=a.batch_size, decode_only=a.decode_only, progress=False)
        _sync(model.device)
        walls[label], scores[label] = time.perf_counter() - t0, res.scores.flatten().numpy()
    chosen = select if select == "EAP" else f"{select} m={a.select_ig_steps}"
    allowed = np.zeros(L * d, dtype=bool)
    for x in layers:
        allowed[x * d:(x + 1) * d] = True
    ranked = np.where(allowed, np.abs(scores[chosen]), -1.0)
    units = np.argsort(-ranked, kind="stable")[:a.top_k].tolist()
    _sync(model.device)
    t0 = time.perf_counter()
    chunk = max(1, a.max_rows // min(a.batch_size, len(clean)))  # units per pass
    exact = exact_unit_effects(model, clean, corrupted, units, metric=a.metric, decode_only=a.decode_only,
                               batch_size=a.batch_size, chunk=chunk, desc="exact patching")
    _sync(model.device)
    exact_wall = time.perf_counter() - t0
    rows = {label: agreement(s[units], exact) for label, s in scores.items()}
    shuffled = agreement(np.random.default_rng(a.seed).permutation(scores[chosen][units]), exact)

    span = "all layers" if a.layers is None else f"layers {a.layers}"
    print(f"{model.spec}, {len(clean)} operator-swap pairs (seed {a.seed}), metric {a.metric}, "
          f"{'decode-only' if a.decode_only else 'all positions'}; circuit: top {len(units)} units by |{chosen}| "
          f"over {span} (layers hit: {sorted({u // d for u in units})}); device {model.device}, {_load()}")
    print("\n| method | Spearman rho | Kendall tau | Spearman rho of abs | signs agree | "
          f"wall s (scores, {L * d} units) |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        mark = " (circuit)" if label == chosen else ""
        print(f"| {label}{mark} | {r['spearman']:.3f} | {r['kendall']:.3f} | {r['spearman_abs']:.3f} | "
              f"{r['signs_agree']}/{len(units)} | {walls[label]:.1f} |")
    print(f"| {chosen}, shuffled (chance) | {shuffled['spearman']:.3f} | {shuffled['kendall']:.3f} | "
          f"{shuffled['spearman_abs']:.3f} | {shuffled['signs_agree']}/{len(units)} | — |")
    print(f"| exact single-unit patching (reference) | 1 | 1 | 1 | {len(units)}/{len(units)} | "
          f"{exact_wall:.1f} ({len(units)} units) |")
    if a.out_json:
        out = {"model": model.spec, "n_pairs": len(clean), "seed": a.seed, "metric": a.metric,
               "decode_only": a.decode_only, "circuit_method": chosen, "layers": layers, "units": units,
               "exact": exact.tolist(), "agreement": rows, "shuffled": shuffled, "wall_seconds": walls,
               "exact_wall_seconds": exact_wall,
               "command": " ".join(["bench/attribution_rank.py", *sys.argv[1:]])}
        Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out_json).write_text(json.dumps(out, indent=1), encoding="utf-8")
        print(f"wrote {a.out_json}")


if __name__ == "__main__":
    main()
