"""Shared fixtures: the embedded models, loaded once per test session (real weights, CPU)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest -n N's workers: one core each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

SMOLLM2 = "smollm2-135m-instruct-q4_1"
GEMMA3 = "gemma-3-270m-q4_k_m"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (embedded GGUF) wrapped in a TransformerBridge, on CPU."""
    from lib.models.loading import load_analysed_model

    return load_analysed_model(SMOLLM2, device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma-3-270m base (embedded GGUF, assembled from chunk packages), on CPU."""
    from lib.models.loading import load_analysed_model

    return load_analysed_model(GEMMA3, device="cpu")


def serve_loaded_model(monkeypatch, module, model, alias: str = SMOLLM2) -> None:
    """Make `module.load_analysed_model` hand out the session's already loaded `model` (a stage
    under test must ask for `alias` on the CPU) instead of loading the weights again."""

    def load(ai_model, device="auto", dtype="auto", ai_model_cache_dir=None):
        assert ai_model == alias and device == "cpu", (ai_model, device)
        return model

    monkeypatch.setattr(module, "load_analysed_model", load)
