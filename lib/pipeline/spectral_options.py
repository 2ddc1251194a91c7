"""The spectral-representation flags stages 4 and 5 share, defined once (a config base class)."""

from __future__ import annotations

import dataclasses

from lib.core.choices import RepPooling, SpectralSpace
from lib.pipeline.config import StageConfig, option
from lib.sampling.spectral import DEFAULT_REP_HOOK, SPECTRAL_HELP

__all__ = ["SpectralStageConfig"]


@dataclasses.dataclass(kw_only=True)
class SpectralStageConfig(StageConfig):
    """A stage config with `--spectral_space`, `--rep_hook_name`, `--rep_pooling`, `--max_seq_len`,
    `--spectral_dim` and `--spectral_cache_dir` (how prompts are embedded for spectral sampling)."""

    spectral_space: SpectralSpace = option("hidden", SPECTRAL_HELP["spectral_space"])
    rep_hook_name: str = option(DEFAULT_REP_HOOK, SPECTRAL_HELP["rep_hook_name"])
    rep_pooling: RepPooling = option("mean", SPECTRAL_HELP["rep_pooling"])
    max_seq_len: int | None = option(None, SPECTRAL_HELP["max_seq_len"])
    spectral_dim: int = option(16, SPECTRAL_HELP["spectral_dim"])
    spectral_cache_dir: str | None = option(None, SPECTRAL_HELP["spectral_cache_dir"])
