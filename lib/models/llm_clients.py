"""Feature-LLM / judge clients: Ollama, OpenAI, Groq and an in-process `local` model.

`instruct_model(model, [(system, user), ...])` answers chat requests through one backend and
returns one reply per request, in order. Every answered request is cached on disk (content
keyed, atomic), so a rerun makes no calls. The backend is picked by an explicit prefix
(`ollama:`, `openai:`, `groq:`, `local:`) or by the model name (see `resolve_backend`).

Differences from the original clients (on purpose, see docs/DEVIATIONS.md):

* The whole system prompt is sent as a real system message (the original sent its first
  character only).
* Routing without a prefix sends only `gpt-…`, `gpt<digit>…`, `o<digit>…` and `chatgpt…` names to
  OpenAI, so Ollama models such as `olmo2` stay on Ollama.
* Transient failures (connection refused/reset, timeouts, HTTP 408/409/429/5xx) are retried a
  bounded number of times with exponential back-off, then raise `BackendUnavailable`, whose
  one-line message names the backend, its URL and the environment variable to set. Other HTTP
  errors raise `BackendError` at once with the server's message. Nothing is silently `None`,
  except a reply that is still empty after one retry.
* `<think>…</think>` reasoning is removed from every reply.

Environment: OLLAMA_HOST, OPENAI_API_KEY, OPENAI_BASE_URL, GROQ_API_KEY, GROQ_BASE_URL (read by
the official clients); MECHARULE_LLM_MAX_RETRIES (retries after the first attempt, default 3),
MECHARULE_LLM_RETRY_BASE_DELAY (seconds, default 0.5), MECHARULE_LLM_TIMEOUT (seconds per HTTP
request, default 600), MECHARULE_LOCAL_DEVICE (device of the `local` backend, default auto).
"""

from __future__ import annotations

import abc
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Sequence

from lib.core.files_and_cache import DiskCache, content_key

__all__ = [
    "LLMBackendError",
    "BackendUnavailable",
    "BackendError",
    "BACKENDS",
    "GROQ_MODELS",
    "resolve_backend",
    "is_openai_reasoning_model",
    "strip_reasoning",
    "build_local_prompt",
    "register_local_model",
    "unregister_local_model",
    "instruct_model",
]

log = logging.getLogger(__name__)

BACKENDS = ("ollama", "openai", "groq", "local")
GROQ_MODELS = frozenset({"qwen/qwen3-32b", "meta-llama/llama-4-scout-17b-16e-instruct"})
_OPENAI_NAME = re.compile(r"^(gpt-|gpt\d|o\d|chatgpt)", re.IGNORECASE)
_OPENAI_REASONING = re.compile(r"^(o\d|gpt-5)", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_MAX_WORKERS = 4  # OpenAI/Groq thread pool; Ollama and local are sequential
_MAX_BACKOFF_S = 30.0
_LOCAL_DEFAULT_MAX_NEW_TOKENS = 512
_DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"


class LLMBackendError(RuntimeError):
    """Any failure of a feature-LLM backend."""


class BackendUnavailable(LLMBackendError):
    """The backend cannot be used: unreachable after retries, missing credentials, model absent."""


class BackendError(LLMBackendError):
    """The backend rejected a request (HTTP 400/401/404, …); retrying would not help."""


# ---------------------------------------------------------------------------------------------
# Routing and reply post-processing
# ---------------------------------------------------------------------------------------------


def resolve_backend(model: str) -> tuple[str, str]:
    """Return (backend, model name) for a model string.

    An explicit `ollama:`/`openai:`/`groq:`/`local:` prefix wins. Otherwise names starting with
    `gpt-`, `gpt<digit>`, `o<digit>` or `chatgpt` go to OpenAI, exactly `qwen/qwen3-32b` and
    `meta-llama/llama-4-scout-17b-16e-instruct` go to Groq, and everything else to Ollama
    (`gemma3:27b` keeps its tag).
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError("feature-LLM model name is empty")
    spec = model.strip()
    head, sep, rest = spec.partition(":")
    if sep and head.lower() in BACKENDS:
        name = rest.strip()
        if not name:
            raise ValueError(f"model '{model}': nothing after the '{head}:' prefix")
        return head.lower(), name
    if _OPENAI_NAME.match(spec):
        return "openai", spec
    if spec in GROQ_MODELS:
        return "groq", spec
    return "ollama", spec


def is_openai_reasoning_model(name: str) -> bool:
    """o-series and gpt-5 models take `max_completion_tokens` and no temperature/top_p."""
    return bool(_OPENAI_REASONING.match(name))


def strip_reasoning(text: str | None) -> str | None:
    """Remove `<think>…</think>` blocks (and a bare leading block closed by `</think>`); strip."""
    if text is None:
        return None
    out = _THINK_BLOCK.sub("", text)
    low = out.lower()
    if "</think>" in low:  # DeepSeek-style reply whose opening tag was in the prompt
        out = out[low.rfind("</think>") + len("</think>"):]
    elif "<think>" in low:  # reasoning cut off by the token limit: no answer after it
        out = out[: low.find("<think>")]
    return out.strip()


# ---------------------------------------------------------------------------------------------
# Retry policy
# ---------------------------------------------------------------------------------------------


def _env_number(name: str, default: float, cast: Callable[[str], float]) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={raw!r} must be >= 0")
    return value


def _max_retries() -> int:
    return int(_env_number("MECHARULE_LLM_MAX_RETRIES", 3, int))


def _base_delay() -> float:
    return float(_env_number("MECHARULE_LLM_RETRY_BASE_DELAY", 0.5, float))


def _http_timeout() -> float:
    return float(_env_number("MECHARULE_LLM_TIMEOUT", 600.0, float)) or 600.0


class _Transient(Exception):
    """Internal: a failure worth retrying (holds the original exception's one-line summary).

    `connection` is True for refused/reset connections and timeouts, False for HTTP statuses.
    """

    def __init__(self, summary: str, connection: bool) -> None:
        super().__init__(summary)
        self.connection = connection


def _state(connection: bool) -> str:
    return "is unreachable" if connection else "keeps failing"


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Backends: each turns one (system, user) request into reply text or raises
# ---------------------------------------------------------------------------------------------


def _messages(system: str, user: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user})
    return msgs


class _Backend(abc.ABC):
    name = "?"
    concurrent = False
    retry_empty = True  # ask once more after an empty reply

    def __init__(self, model: str, temperature: float, seed: int, max_tokens: int | None) -> None:
        self.model = model
        self.options = self.make_options(temperature, seed, max_tokens)

    @abc.abstractmethod
    def make_options(self, temperature: float, seed: int, max_tokens: int | None) -> dict[str, Any]:
        """The request options this backend sends (also part of the cache key)."""

    def check_ready(self) -> None:
        """Raise BackendUnavailable before any request when the backend cannot work (keys, …)."""

    def configure_extras(self, reasoning_effort: str | None, choices: Sequence[str] | None) -> None:
        """Add the optional judge settings this backend understands to its options (default: none)."""

    @abc.abstractmethod
    def call(self, system: str, user: str) -> str | None:
        """One attempt; raise _Transient for retryable failures, BackendError otherwise."""

    @abc.abstractmethod
    def unavailable_message(self, attempts: int, last: _Transient) -> str:
        """The one-line error after the last retry: which server, which variable to set."""


class _OllamaBackend(_Backend):
    name = "ollama"

    def make_options(self, temperature, seed, max_tokens):
        return {
            "options": {
                "seed": int(seed),
                "temperature": float(temperature),
                "top_k": 40,
                "top_p": 1.0,
                "repeat_penalty": 1.1,
                "repeat_last_n": 64,
                "num_ctx": 8192,
                "num_predict": int(max_tokens) if max_tokens else -1,
            },
            "keep_alive": "1h",
        }

    def check_ready(self) -> None:
        import ollama

        self.client = ollama.Client(host=os.environ.get("OLLAMA_HOST") or None, timeout=_http_timeout())
        base = getattr(getattr(self.client, "_client", None), "base_url", None)
        self.url = str(base).rstrip("/") if base else (os.environ.get("OLLAMA_HOST") or _DEFAULT_OLLAMA_HOST)

    def call(self, system: str, user: str) -> str | None:
        import httpx
        import ollama

        try:
            resp = self.client.chat(model=self.model, messages=_messages(system, user), stream=False,
                                    **self.options)
        except ollama.ResponseError as exc:
            if exc.status_code in (408, 409, 429) or exc.status_code >= 500:
                raise _Transient(f"HTTP {exc.status_code}: {_one_line(exc.error)}", False) from None
            raise BackendError(
                f"Ollama server at {self.url} rejected model '{self.model}' (HTTP {exc.status_code}): "
                f"{_one_line(exc.error)}"
                + (f"; run `ollama pull {self.model}`" if exc.status_code == 404 else "")
            ) from None
        except (ConnectionError, httpx.TransportError) as exc:  # refused/reset/timeouts
            raise _Transient(f"{type(exc).__name__}: {_one_line(exc)}", True) from None
        return resp.message.content

    def unavailable_message(self, attempts: int, last: _Transient) -> str:
        return (f"Ollama server at {self.url} {_state(last.connection)} after {attempts} attempt(s) "
                f"(last error: {last}): start `ollama serve` or set OLLAMA_HOST")


class _OpenAICompatibleBackend(_Backend):
    concurrent = True
    label = "?"
    key_env = "?"
    url_env = "?"

    @abc.abstractmethod
    def _client_errors(self):
        """(connection error class, HTTP status error class) of the official client."""

    @abc.abstractmethod
    def _make_client(self):
        """The official client, configured from the environment."""

    def check_ready(self) -> None:
        if not os.environ.get(self.key_env, "").strip():
            raise BackendUnavailable(
                f"{self.key_env} is not set: export it to use the {self.label} model '{self.model}' "
                f"(or pick another backend with an 'ollama:' or 'local:' prefix)"
            )
        try:
            self.client = self._make_client()
        except Exception as exc:  # the clients raise their own base errors on bad configuration
            raise BackendUnavailable(f"cannot create the {self.label} client: {_one_line(exc)}") from None
        self.url = str(self.client.base_url).rstrip("/")

    def call(self, system: str, user: str) -> str | None:
        conn_error, status_error = self._client_errors()
        try:
            resp = self.client.chat.completions.create(
                model=self.model, messages=_messages(system, user), **self.options
            )
        except conn_error as exc:  # includes timeouts
            raise _Transient(f"{type(exc).__name__}: {_one_line(exc)}", True) from None
        except status_error as exc:
            code = int(getattr(exc, "status_code", 0) or 0)
            if code in (408, 409, 429) or code >= 500:
                raise _Transient(f"HTTP {code}: {_one_line(getattr(exc, 'message', exc))}", False) from None
            raise BackendError(
                f"{self.label} at {self.url} rejected model '{self.model}' (HTTP {code}): "
                f"{_one_line(getattr(exc, 'message', exc))}"
            ) from None
        choices = getattr(resp, "choices", None) or []
        if not choices or choices[0].message is None:
            return None
        return choices[0].message.content

    def unavailable_message(self, attempts: int, last: _Transient) -> str:
        return (f"{self.label} at {self.url} {_state(last.connection)} after {attempts} attempt(s) "
                f"(last error: {last}): check the service and {self.key_env}, or set {self.url_env}")


class _OpenAIBackend(_OpenAICompatibleBackend):
    name = "openai"
    label = "OpenAI API"
    key_env = "OPENAI_API_KEY"
    url_env = "OPENAI_BASE_URL"

    def make_options(self, temperature, seed, max_tokens):
        opts: dict[str, Any] = {"n": 1, "seed": int(seed)}
        if is_openai_reasoning_model(self.model):
            if max_tokens:
                opts["max_completion_tokens"] = int(max_tokens)
        else:
            opts.update(temperature=float(temperature), top_p=1.0, frequency_penalty=0.0,
                        presence_penalty=0.0)
            if max_tokens:
                opts["max_tokens"] = int(max_tokens)
        return opts

    def configure_extras(self, reasoning_effort: str | None, choices: Sequence[str] | None) -> None:
        """Forward `reasoning_effort` to o-series/gpt-5 models (others reject it)."""
        if reasoning_effort and is_openai_reasoning_model(self.model):
            self.options["reasoning_effort"] = str(reasoning_effort)

    def _client_errors(self):
        import openai

        return openai.APIConnectionError, openai.APIStatusError

    def _make_client(self):
        import openai

        return openai.OpenAI(max_retries=0, timeout=_http_timeout())


class _GroqBackend(_OpenAICompatibleBackend):
    name = "groq"
    label = "Groq API"
    key_env = "GROQ_API_KEY"
    url_env = "GROQ_BASE_URL"

    def make_options(self, temperature, seed, max_tokens):
        return {
            "n": 1,
            "temperature": 1e-8 if float(temperature) == 0.0 else float(temperature),
            "top_p": 1.0,
            "seed": int(seed),
            "max_completion_tokens": int(max_tokens) if max_tokens else 4096,
        }

    def configure_extras(self, reasoning_effort: str | None, choices: Sequence[str] | None) -> None:
        """Forward `reasoning_effort` (`none` turns qwen3's thinking off, as the BON judge needs)."""
        if reasoning_effort:
            self.options["reasoning_effort"] = str(reasoning_effort)

    def _client_errors(self):
        import groq

        return groq.APIConnectionError, groq.APIStatusError

    def _make_client(self):
        import groq

        return groq.Groq(max_retries=0, timeout=_http_timeout())


# --- local: an analysed-model-style LLM run in this process ----------------------------------

_LOCAL_MODELS: dict[str, Any] = {}
_LOCAL_LOCK = threading.RLock()
_END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


def register_local_model(name: str, loaded_model: Any) -> None:
    """Make `local:<name>` use an already loaded `LoadedModel` (avoids loading it twice)."""
    if not hasattr(loaded_model, "hf_model") or not hasattr(loaded_model, "tokenizer"):
        raise TypeError("register_local_model expects a LoadedModel (with .hf_model and .tokenizer)")
    with _LOCAL_LOCK:
        _LOCAL_MODELS[name] = loaded_model


def unregister_local_model(name: str) -> None:
    with _LOCAL_LOCK:
        _LOCAL_MODELS.pop(name, None)


def _get_local_model(name: str) -> Any:
    with _LOCAL_LOCK:
        if name not in _LOCAL_MODELS:
            from lib.models.resolution import ModelResolutionError
            from lib.models.loading import load_analysed_model

            try:
                _LOCAL_MODELS[name] = load_analysed_model(
                    name, device=os.environ.get("MECHARULE_LOCAL_DEVICE", "auto"), with_bridge=False
                )
            except ModelResolutionError as exc:
                raise BackendUnavailable(f"local model '{name}' cannot be loaded: {_one_line(exc)}") from None
        return _LOCAL_MODELS[name]


def build_local_prompt(tokenizer: Any, system: str, user: str) -> tuple[str, bool]:
    """Prompt text for a local model and whether it already holds the special tokens.

    Uses the tokenizer's chat template with system + user messages; a template that rejects a
    system role gets the system text prepended to the user turn; without a template (base models)
    the prompt is plain `system\\n\\nuser`.
    """
    if getattr(tokenizer, "chat_template", None):
        attempts = [_messages(system, user)]
        if system:
            attempts.append([{"role": "user", "content": f"{system}\n\n{user}"}])
        for msgs in attempts:
            try:
                text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception:  # jinja TemplateError ("system role not supported") and the like
                continue
            if isinstance(text, str) and text:
                return text, True
    return (f"{system}\n\n{user}" if system else user), False


def _stop_token_ids(tokenizer: Any, hf_model: Any) -> list[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for tok in _END_OF_TURN_TOKENS:
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return sorted(ids)


class _LocalBackend(_Backend):
    name = "local"
    retry_empty = False  # seeded per request: a second attempt would repeat the empty reply

    def make_options(self, temperature, seed, max_tokens):
        sample = float(temperature) > 0
        return {
            "do_sample": sample,
            "temperature": float(temperature) if sample else 0.0,
            "top_k": 40 if sample else None,
            "top_p": 1.0,
            "repetition_penalty": 1.1,
            "max_new_tokens": int(max_tokens) if max_tokens else _LOCAL_DEFAULT_MAX_NEW_TOKENS,
            "seed": int(seed),
        }

    def configure_extras(self, reasoning_effort: str | None, choices: Sequence[str] | None) -> None:
        """With `choices`, the reply is the most likely choice (a small model rarely obeys a format)."""
        if choices:
            self.options["choices"] = [str(c) for c in choices]

    def check_ready(self) -> None:
        self.loaded = _get_local_model(self.model)
        self.url = "in-process"

    def _pick_choice(self, input_ids: Any, choices: Sequence[str]) -> str:
        """The choice whose tokens have the highest summed log-probability after the prompt."""
        import torch

        tok, hf = self.loaded.tokenizer, self.loaded.hf_model
        best, best_score = choices[0], float("-inf")
        with torch.inference_mode():
            last = torch.log_softmax(hf(input_ids=input_ids).logits[0, -1].float(), -1)
        for choice in choices:
            ids = tok(choice, add_special_tokens=False, return_tensors="pt")["input_ids"].to(input_ids.device)
            if ids.shape[1] == 1:  # one token: the prompt's last logits suffice
                score = float(last[ids[0, 0]])
            else:
                with torch.inference_mode():
                    logits = hf(input_ids=torch.cat([input_ids, ids], dim=1)).logits[0, input_ids.shape[1] - 1:-1]
                score = float(torch.log_softmax(logits.float(), -1).gather(1, ids[0][:, None]).sum())
            if score > best_score:
                best, best_score = choice, score
        return best

    def call(self, system: str, user: str) -> str | None:
        import torch
        from transformers import GenerationConfig

        lm = self.loaded
        tok, hf = lm.tokenizer, lm.hf_model
        opts = self.options
        text, templated = build_local_prompt(tok, system, user)
        max_new = opts["max_new_tokens"]
        n_ctx = int(getattr(lm, "n_ctx", 2048) or 2048)
        enc = tok(text, return_tensors="pt", add_special_tokens=not templated, truncation=True,
                  max_length=max(16, n_ctx - max_new))
        device = next(hf.parameters()).device
        input_ids = enc["input_ids"].to(device)
        attention = enc.get("attention_mask")
        attention = attention.to(device) if attention is not None else torch.ones_like(input_ids)
        if opts.get("choices"):
            with _LOCAL_LOCK:
                return self._pick_choice(input_ids, opts["choices"])
        stop_ids = _stop_token_ids(tok, hf)
        cfg_kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new, do_sample=opts["do_sample"],
            repetition_penalty=opts["repetition_penalty"],
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (stop_ids or [0])[0],
            eos_token_id=stop_ids or None,
        )
        if opts["do_sample"]:
            cfg_kwargs.update(temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"])
        gen_cfg = GenerationConfig(**cfg_kwargs)
        # The sampling seed depends on the request only, never on its position or batch mates.
        req_seed = (opts["seed"] + int(content_key(system, user)[:12], 16)) % (2**63 - 1)
        fork_devices = [device] if device.type == "cuda" else []
        with _LOCAL_LOCK, torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
            torch.manual_seed(req_seed)
            try:
                out = hf.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_cfg)
            except Exception as exc:  # out of memory, bad config, …: not worth retrying
                raise BackendError(
                    f"local model '{self.model}' failed to generate: {type(exc).__name__}: {_one_line(exc)}"
                ) from None
        new_tokens = out[0, input_ids.shape[1]:]
        return tok.decode(new_tokens, skip_special_tokens=True)

    def unavailable_message(self, attempts: int, last: _Transient) -> str:
        return f"local model '{self.model}' failed after {attempts} attempt(s): {last}"


_BACKEND_CLASSES: dict[str, type[_Backend]] = {
    "ollama": _OllamaBackend,
    "openai": _OpenAIBackend,
    "groq": _GroqBackend,
    "local": _LocalBackend,
}


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _ask_with_retries(backend: _Backend, system: str, user: str) -> str | None:
    """Bounded retries with exponential back-off; an empty reply is retried once, then None."""
    retries = _max_retries()
    base = _base_delay()
    attempts = retries + 1
    empty_retried = False
    last = _Transient("no attempt made", False)
    attempt = 0
    while attempt < attempts:
        try:
            reply = strip_reasoning(backend.call(system, user))
        except _Transient as exc:
            last = exc
            attempt += 1
            if attempt < attempts:
                delay = min(_MAX_BACKOFF_S, base * (2 ** (attempt - 1)))
                time.sleep(delay + random.uniform(0, base / 2) if delay else 0)
            continue
        if reply:
            return reply
        if empty_retried or not backend.retry_empty:
            return None
        empty_retried = True
        log.warning("%s model '%s' returned an empty reply; asking once more", backend.name, backend.model)
    raise BackendUnavailable(backend.unavailable_message(attempts, last))


def _validate_requests(requests: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(requests, (str, bytes)):
        raise TypeError("requests must be a sequence of (system, user) pairs, not a string")
    out: list[tuple[str, str]] = []
    for i, req in enumerate(requests):
        if not isinstance(req, (tuple, list)) or len(req) != 2 or not all(isinstance(x, str) for x in req):
            raise TypeError(f"request {i} is not a (system, user) pair of strings: {req!r:.120}")
        out.append((req[0], req[1]))
    return out


def instruct_model(
    model: str,
    requests: Sequence[tuple[str, str]],
    *,
    temperature: float = 0.3,
    cache_dir: str | Path = "./cache",
    seed: int = 42,
    max_tokens: int | None = None,
    progress: bool = False,
    reasoning_effort: str | None = None,
    choices: Sequence[str] | None = None,
) -> list[str | None]:
    """Answer (system, user) chat requests with `model`; one reply per request, in order.

    Replies are cached in `<cache_dir>/llm_calls/` keyed by backend, model, system, user and the
    request options, so identical requests (within a call or across runs) are sent once.
    A reply is `None` only when the backend answered nothing (also after one retry); `None` is
    not cached. Raises `BackendUnavailable` / `BackendError` (both `LLMBackendError`).
    `reasoning_effort` is forwarded to Groq (and OpenAI reasoning models); `choices` makes the
    `local` backend reply with the most likely of these strings (other backends reply freely).
    """
    reqs = _validate_requests(requests)
    if temperature is None or float(temperature) < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if max_tokens is not None and int(max_tokens) <= 0:
        raise ValueError(f"max_tokens must be positive or None, got {max_tokens!r}")
    backend_name, name = resolve_backend(model)
    backend = _BACKEND_CLASSES[backend_name](name, float(temperature), int(seed), max_tokens)
    if isinstance(choices, str) or (choices is not None and not all(isinstance(c, str) and c for c in choices)):
        raise TypeError(f"choices must be a sequence of non-empty strings, got {choices!r:.120}")
    backend.configure_extras(reasoning_effort, choices)
    if not reqs:
        return []

    cache = DiskCache(cache_dir, namespace="llm_calls")
    keys = [content_key(backend_name, name, s, u, backend.options) for s, u in reqs]
    answers: dict[str, str | None] = {}
    todo: dict[str, tuple[str, str]] = {}
    for key, req in zip(keys, reqs):
        if key in answers or key in todo:
            continue
        hit = cache.get(key)
        if isinstance(hit, str) and hit:
            answers[key] = hit
        else:
            todo[key] = req

    if todo:
        backend.check_ready()  # credentials/model before any request
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"{backend_name}:{name}", unit="req")

        def run_one(key: str, system: str, user: str) -> None:
            reply = _ask_with_retries(backend, system, user)
            if reply:
                cache.put(key, reply)
            answers[key] = reply
            if bar is not None:
                bar.update(1)

        try:
            items = list(todo.items())
            if backend.concurrent and len(items) > 1:
                with ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, len(items))) as pool:
                    futures = [pool.submit(run_one, k, s, u) for k, (s, u) in items]
                    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
                    for fut in pending:
                        fut.cancel()
                    for fut in futures:
                        if fut.done() and not fut.cancelled() and fut.exception() is not None:
                            raise fut.exception()
            else:
                for k, (s, u) in items:
                    run_one(k, s, u)
        finally:
            if bar is not None:
                bar.close()

    return [answers.get(k) for k in keys]
