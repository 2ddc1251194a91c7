"""The pipeline's size presets as data: each maps option names to values, applied under the user's
explicit options and over the paper defaults (`PAPER_DEFAULTS`)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["PRESETS", "TASK_PRESETS", "PAPER_DEFAULTS", "PRESET_HELP", "MAIN_MODE", "preset_layers"]

MAIN_MODE: Mapping[str, Any] = MappingProxyType({"discovery": "spectral", "anchoring": "spectral", "decode_only": True})
"""`--main`: spectral discovery plan, spectral anchoring plans, decode-only."""

PAPER_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "discovery": "random", "anchoring": "random", "decode_only": False,
    "max_prompts": 0, "batch_size": 256, "no_llm_features": False, "z_thresh": -1, "max_circuits": 0,
    "pairs_per_circuit": 128, "discovery_clusters": 32, "ig_steps": 3, "n_points": 64, "anchoring_clusters": 16,
    "tau": 0.2, "stage7_max_points": 10000, "stage7_min_points": 64, "stage7_clusters": 64, "neuron_batch_size": 4,
    "n_estimators": 500, "num_threads": 0, "stage5_batch_size": 1, "shap_in_xgb": True,
    "top_k_neurons": None, "last_k_layers": None,
    # mean_pool: 256, or 2048 for donor interventions (resolved in lib.pipeline.run)
})

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "paper": MappingProxyType({}),
    "cpu": MappingProxyType({
        **MAIN_MODE, "max_prompts": 1024, "batch_size": 128, "no_llm_features": True, "z_thresh": -1,
        "max_circuits": 0, "pairs_per_circuit": 16, "discovery_clusters": 8, "ig_steps": 1, "stage5_batch_size": 16,
        "n_points": 20, "anchoring_clusters": 8, "top_k_neurons": 1536, "last_k_layers": 4, "mean_pool": 64,
        "tau": 0.3, "stage7_max_points": 128, "stage7_min_points": 32, "stage7_clusters": 16,
        "neuron_batch_size": 8, "n_estimators": 200, "num_threads": 2,
    }),
    "tiny": MappingProxyType({
        "discovery": "spectral", "anchoring": "random", "decode_only": True, "max_prompts": 160, "batch_size": 80,
        "no_llm_features": True, "z_thresh": -1, "shap_in_xgb": False, "max_circuits": 2, "pairs_per_circuit": 6,
        "discovery_clusters": 4, "ig_steps": 1, "n_points": 6, "anchoring_clusters": 4, "top_k_neurons": 32,
        "mean_pool": 32, "tau": 0.5, "stage7_max_points": 48, "stage7_min_points": 16, "stage7_clusters": 8,
        "neuron_batch_size": 8, "n_estimators": 30, "num_threads": 1, "stage5_batch_size": 16,
    }),
})

TASK_PRESETS: Mapping[str, Mapping[str, Mapping[str, Any]]] = MappingProxyType({
    # BON answers are 12 generated tokens judged as text, about ten times the decoding of an arithmetic
    # answer per ablated prompt, and many units flip them: the top 512 units per rule keep the cpu run
    # under 15 minutes (with 1536: 219 candidates, 216 group tests, 18 minutes in all).
    "cpu": MappingProxyType({"bon_jailbreaking": MappingProxyType({"top_k_neurons": 512})}),
})
"""Per-task adjustments of a preset, applied between the preset and the user's explicit options."""


def preset_layers(preset: str, task: str) -> list[Mapping[str, Any]]:
    """The preset's option layers for a task, most specific first: the task's adjustments, the preset."""
    return [TASK_PRESETS.get(preset, {}).get(task, {}), PRESETS[preset]]


PRESET_HELP = """\
Presets:
  cpu   1024 prompts, seed features only, 16 pairs/rule (m=1), the top 1536 units/rule that lie
        in the last 4 MLP layers, 20+20 prompts per stage-6 slice at τ=0.3 (with 20 prompts a
        single flip already lifts the Clopper-Pearson bound above 0.2), 200 trees, stage 7 on
        <= 128 rows in 16 clusters, 2 threads: the embedded SmolLM2 in under 15 minutes on 2 cores
        (bon_jailbreaking: the top 512 units per rule, as its answers are 12 judged tokens).
  tiny  160 prompts, stage 3 without SHAP-weighted trees (30 trees), spectral discovery plan +
        random anchoring, 6 pairs, top 32 units, 6+6 prompts at τ=0.5 (with 6 prompts a group
        without a flip still has a Clopper-Pearson bound of 0.46, so at τ <= 0.46 CHA could prune
        nothing; one flip gives 0.64, so a unit with a flip stays an agonist), 2 rules, stage 7 on
        <= 48 rows, 1 thread (the end-to-end test)."""
