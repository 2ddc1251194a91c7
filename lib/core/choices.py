"""Every choice list of the command line, defined once: the stage configs, the pipeline runner, the
engine and the run-folder names all read them from here (`typing.Literal` types and their values)."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "DEFAULT_SEED",
    "Intervention", "INTERVENTIONS", "PLAIN_INTERVENTIONS", "AttributionIntervention", "ATTRIBUTION_INTERVENTIONS",
    "attribution_intervention_for",
    "Device", "DEVICES", "Dtype", "DTYPES",
    "AttributionMetric", "ATTRIBUTION_METRICS", "CircuitLevel", "CIRCUIT_LEVELS",
    "BaselineSubset", "BASELINE_SUBSET_CHOICES", "RegimeSubset", "REGIMES", "SamplingStrategy", "SAMPLING_STRATEGIES",
    "TemporalAgg", "TEMPORAL_AGGS", "DecodeMode", "DECODE_MODES",
    "SpectralSpace", "SPECTRAL_SPACES", "RepPooling", "REP_POOLINGS", "RuleQualityMetric", "RULE_QUALITY_METRICS",
    "ChaStatistic", "CHA_STATISTICS", "ChaScope", "CHA_SCOPES",
]

DEFAULT_SEED = 42
"""The one default of `--seed` on every stage and in the pipeline driver."""

Intervention = Literal["zero", "mean", "mean-positional", "mean-donor", "mean-donor-positional"]
INTERVENTIONS: tuple[str, ...] = get_args(Intervention)
"""Replacement values of ablated units in stages 6 and 7 (and stage 5's faithfulness check)."""

PLAIN_INTERVENTIONS: tuple[str, ...] = ("mean", "mean-positional")
"""Interventions that leave a run folder's name unmarked (the pipeline's default family)."""

AttributionIntervention = Literal["patching", "zero", "mean", "mean-positional"]
ATTRIBUTION_INTERVENTIONS: tuple[str, ...] = get_args(AttributionIntervention)
"""Stage 5's corrupted-run choices: activation patching from a paired prompt, or a replacement value."""


def attribution_intervention_for(intervention: str) -> str:
    """Stage 5's name for a stage-6 intervention: the donor variants have no stage-5 form, so drop `donor`."""
    name = intervention.replace("donor-", "").replace("-donor", "")
    if name not in ATTRIBUTION_INTERVENTIONS:
        raise ValueError(f"no stage-5 intervention for {intervention!r}")
    return name


Device = Literal["auto", "cpu", "cuda", "mps"]
DEVICES: tuple[str, ...] = get_args(Device)

Dtype = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
DTYPES: tuple[str, ...] = get_args(Dtype)

AttributionMetric = Literal["answer_logprob", "kl"]
ATTRIBUTION_METRICS: tuple[str, ...] = get_args(AttributionMetric)

CircuitLevel = Literal["neuron", "node"]
CIRCUIT_LEVELS: tuple[str, ...] = get_args(CircuitLevel)

BaselineSubset = Literal["all", "positive", "negative"]
BASELINE_SUBSET_CHOICES: tuple[str, ...] = get_args(BaselineSubset)
RegimeSubset = Literal["positive", "negative"]
REGIMES: tuple[str, ...] = get_args(RegimeSubset)

SamplingStrategy = Literal["random", "plan"]
SAMPLING_STRATEGIES: tuple[str, ...] = get_args(SamplingStrategy)

TemporalAgg = Literal["none", "mean", "max", "min"]
TEMPORAL_AGGS: tuple[str, ...] = get_args(TemporalAgg)

DecodeMode = Literal["auto", "span", "after_prompt", "all"]
DECODE_MODES: tuple[str, ...] = get_args(DecodeMode)

SpectralSpace = Literal["hidden", "logits"]
SPECTRAL_SPACES: tuple[str, ...] = get_args(SpectralSpace)
"""Representation spaces of the spectral flags (stages 4, 5 and 7; `lib.sampling.spectral`)."""

RepPooling = Literal["last", "mean"]
REP_POOLINGS: tuple[str, ...] = get_args(RepPooling)

RuleQualityMetric = Literal["balanced_accuracy", "mcc", "tpr", "tnr", "f1"]
RULE_QUALITY_METRICS: tuple[str, ...] = get_args(RuleQualityMetric)
"""Stage 7's `--threshold_metric` / `--rule_quality_metric` (the keys of `lib.anchoring.rules.QUALITY_COLUMNS`)."""

ChaStatistic = Literal["flip_ucb", "effect_sprt"]
CHA_STATISTICS: tuple[str, ...] = get_args(ChaStatistic)
"""Stage 6's `--cha_statistic`: the original flip-rate UCB rule, or the sequential effect test
against random same-size groups (`lib.ablation.sequential_cha`)."""

ChaScope = Literal["candidates", "all_units"]
CHA_SCOPES: tuple[str, ...] = get_args(ChaScope)
"""Stage 6's `--cha_scope`: stage 5's candidates, or every MLP unit of the chosen layers."""
