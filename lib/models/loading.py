"""Loading the analysed LLM (embedded GGUF, .gguf path, HF folder or hub id) into a TransformerBridge.

The bridge exposes the classic TransformerLens hook names (`blocks.{L}.hook_mlp_out`, ...)
over the unmodified Hugging Face weights, so activations equal the HF model's own.
GGUF files are dequantised once and the fp32 result is kept in a conversion cache, so
later stages load in seconds instead of re-dequantising.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from lib.core.choices import DEVICES, DTYPES as DTYPE_CHOICES
from lib.core.files_and_cache import default_dir_mode, file_digest
from lib.models.resolution import EMBEDDED_MODELS, ModelResolutionError, ModelSource, resolve_model_source

__all__ = [
    "ModelLoadError",
    "LoadedModel",
    "resolve_device",
    "resolve_dtype",
    "model_cache_root",
    "load_analysed_model",
    "load_tokenizer",
    "add_model_arguments",
]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(ModelResolutionError):
    """The model was resolved but could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """An analysed model ready for generation and hooking."""

    spec: str
    source: ModelSource
    tokenizer: Any
    hf_model: Any
    bridge: Any  # TransformerBridge, or None when loaded with with_bridge=False
    device: torch.device
    dtype: torch.dtype

    @property
    def n_layers(self) -> int:
        return int(self.hf_model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.hf_model.config.hidden_size)

    @property
    def n_ctx(self) -> int:
        cfg = self.bridge.cfg if self.bridge is not None else self.hf_model.config
        n_ctx = (getattr(cfg, "n_ctx", None) or getattr(cfg, "max_position_embeddings", None)
                 or getattr(self.tokenizer, "model_max_length", None))
        return int(n_ctx) if n_ctx and n_ctx < 10**7 else 2048


def add_model_arguments(parser: Any) -> None:
    """The `--device` and `--dtype` flags shared by every stage that loads the analysed model."""
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where to run the analysed model (auto: cuda > mps > cpu)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights/activation dtype (auto: float32, as TransformerLens uses)")


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit unavailable device is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda requested but torch sees no CUDA device (use --device cpu or auto)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("--device mps requested but MPS is not available (use --device cpu or auto)")
    return torch.device(device)


def resolve_dtype(dtype: str = "auto") -> torch.dtype:
    if dtype == "auto":
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"--dtype {dtype}: choose one of auto, {', '.join(DTYPES)}") from None


def model_cache_root(ai_model_cache_dir: str | None = None) -> Path:
    """Where assembled GGUFs and dequantised conversions live (env MECHARULE_MODEL_CACHE wins)."""
    root = os.environ.get("MECHARULE_MODEL_CACHE") or ai_model_cache_dir
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "mecharule"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _quiet_loading():
    """Silence library chatter (progress bars, conversion warnings) while loading weights."""
    import transformers

    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        transformers.logging.set_verbosity(old)


def _converted_gguf_folder(source: ModelSource, root: Path) -> Path:
    """Folder with the dequantised fp32 safetensors of a GGUF, created on first use."""
    gguf = Path(source.location)
    folder = root / "converted" / f"{gguf.stem}-{file_digest(gguf)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger(__name__).info("dequantising %s (first use only)", gguf.name)
    with _quiet_loading():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if source.architecture:
        model.config.architectures = [source.architecture]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        # GGUF-loaded models refuse save_pretrained (they count as quantised); the weights
        # are plain fp32 tensors by now, so save the config and state dict directly.
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        getattr(model, "generation_config", None) and model.generation_config.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        os.chmod(tmp, default_dir_mode())  # mkdtemp's folder is private; honour the umask like mkdir
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _offline_hint(source: ModelSource) -> str:
    aliases = ", ".join(EMBEDDED_MODELS)
    where = "HF_HUB_OFFLINE is set, so only the local cache is searched" if _hub_offline() else "the hub may be unreachable"
    return (
        f"could not load '{source.spec}' ({where}). Either download it on a machine with network "
        f"access into --ai_model_cache_dir, pass a local model folder or a .gguf file, or use an "
        f"embedded alias ({aliases})"
    )


def _hub_kwargs(source: ModelSource, cache_dir: str | None) -> dict[str, Any]:
    """from_pretrained arguments of a hub id (revision, cache, offline); none for a local folder."""
    if source.kind != "hf_id":
        return {}
    kwargs: dict[str, Any] = {"revision": source.revision, "cache_dir": cache_dir}
    if _hub_offline():  # read at call time: huggingface_hub only reads it at import
        kwargs["local_files_only"] = True
    return kwargs


def _load_hf(source: ModelSource, dtype: torch.dtype, cache_dir: str | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = _hub_kwargs(source, cache_dir)
    try:
        with _quiet_loading():
            tok = AutoTokenizer.from_pretrained(source.location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{_offline_hint(source)}. Library said: {first}") from None
    return tok, model


def load_tokenizer(ai_model: str, ai_model_cache_dir: str | None = None) -> Any:
    """The analysed model's tokenizer alone (prepared as `load_analysed_model` prepares it).

    For tasks that format prompts for the model (a chat template) before any model is loaded."""
    from transformers import AutoTokenizer

    root = model_cache_root(ai_model_cache_dir)
    source = resolve_model_source(ai_model, root)
    location: Any = _converted_gguf_folder(source, root) if source.is_gguf else source.location
    kwargs = {} if source.is_gguf else _hub_kwargs(source, ai_model_cache_dir)
    try:
        with _quiet_loading():
            tok = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{_offline_hint(source)}. Library said: {first}") from None
    return _prepare_tokenizer(tok)


def _prepare_tokenizer(tok: Any) -> Any:
    """Pad with EOS when the tokenizer has no pad token; pad and truncate on the left."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    tok.truncation_side = "left"
    return tok


def load_analysed_model(
    ai_model: str,
    device: str = "auto",
    dtype: str = "auto",
    ai_model_cache_dir: str | None = None,
    with_bridge: bool = True,
) -> LoadedModel:
    """Resolve, load and wrap the analysed model in a TransformerLens 4 TransformerBridge.

    `with_bridge=False` returns the plain HF model (bridge None, default sdpa attention): for
    callers that only generate text, such as the `local:` feature-LLM backend.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = model_cache_root(ai_model_cache_dir)
    source = resolve_model_source(ai_model, root)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if source.is_gguf:
        folder = _converted_gguf_folder(source, root)
        with _quiet_loading():
            tok = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    else:
        tok, model = _load_hf(source, torch_dtype, ai_model_cache_dir)
    if source.architecture:
        model.config.architectures = [source.architecture]
    _prepare_tokenizer(tok)
    model.eval()
    model.to(dev)
    if not with_bridge:
        return LoadedModel(ai_model, source, tok, model, None, dev, torch_dtype)
    try:
        with _quiet_loading():
            bridge = TransformerBridge.boot_transformers(
                source.location, hf_model=model, tokenizer=tok, device=str(dev), dtype=torch_dtype
            )
    except Exception as exc:  # unsupported architectures raise assorted errors deep inside TL
        raise ModelLoadError(
            f"TransformerLens cannot wrap '{ai_model}' (architecture "
            f"{getattr(model.config, 'architectures', None)}): {type(exc).__name__}: {exc}"
        ) from None
    bridge.eval()
    return LoadedModel(ai_model, source, tok, model, bridge, dev, torch_dtype)
