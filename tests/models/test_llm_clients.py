"""Feature-LLM backends: routing, the official clients against a loopback server, caching,
bounded retries, clear errors, reasoning stripping, and the in-process `local` backend."""

from __future__ import annotations

import socket
import time

import pytest

from lib.models import llm_clients as lb
from lib.models.llm_clients import (
    BackendError,
    BackendUnavailable,
    LLMBackendError,
    build_local_prompt,
    instruct_model,
    register_local_model,
    resolve_backend,
    strip_reasoning,
)
from tests.llm_protocol_server import LLMProtocolServer

LONG_SYSTEM = "You are a careful feature engineer.\nReturn Python only.\n" + "Rule: be brief. " * 20

_ENV_VARS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ADMIN_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID",
             "GROQ_API_KEY", "GROQ_BASE_URL", "OLLAMA_HOST", "OLLAMA_API_KEY")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """No real credentials or hosts leak in; retries are fast and bounded."""
    for var in _ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("MECHARULE_LLM_MAX_RETRIES", "3")
    monkeypatch.setenv("MECHARULE_LLM_RETRY_BASE_DELAY", "0.001")
    monkeypatch.setenv("MECHARULE_LLM_TIMEOUT", "10")


@pytest.fixture
def llm_server():
    with LLMProtocolServer() as server:
        yield server


@pytest.fixture
def point_clients(monkeypatch):
    """Point every client at a given loopback server (with dummy keys)."""

    def _point(server: LLMProtocolServer) -> LLMProtocolServer:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        monkeypatch.setenv("GROQ_API_KEY", "gsk-test")
        monkeypatch.setenv("GROQ_BASE_URL", server.url)
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        return server

    return _point


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- routing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, expected",
    [
        ("gpt-4o-mini", ("openai", "gpt-4o-mini")),
        ("gpt4", ("openai", "gpt4")),
        ("o3-mini", ("openai", "o3-mini")),
        ("o1", ("openai", "o1")),
        ("chatgpt-4o-latest", ("openai", "chatgpt-4o-latest")),
        ("olmo2", ("ollama", "olmo2")),
        ("orca-mini", ("ollama", "orca-mini")),
        ("gemma3:27b", ("ollama", "gemma3:27b")),
        ("gpt-oss:20b", ("openai", "gpt-oss:20b")),
        ("ollama:gpt-oss:20b", ("ollama", "gpt-oss:20b")),
        ("qwen/qwen3-32b", ("groq", "qwen/qwen3-32b")),
        ("meta-llama/llama-4-scout-17b-16e-instruct", ("groq", "meta-llama/llama-4-scout-17b-16e-instruct")),
        ("qwen/qwen3-8b", ("ollama", "qwen/qwen3-8b")),
        ("openai:my-proxy-model", ("openai", "my-proxy-model")),
        ("groq:llama-3.1-8b-instant", ("groq", "llama-3.1-8b-instant")),
        ("local:smollm2-135m-instruct-q4_1", ("local", "smollm2-135m-instruct-q4_1")),
        ("local:/models/x.gguf", ("local", "/models/x.gguf")),
    ],
)
def test_resolve_backend(model, expected):
    assert resolve_backend(model) == expected


@pytest.mark.parametrize("bad", ["", "   ", "ollama:", "local: "])
def test_resolve_backend_rejects_empty(bad):
    with pytest.raises(ValueError):
        resolve_backend(bad)


def test_error_hierarchy():
    assert issubclass(BackendUnavailable, LLMBackendError) and issubclass(BackendError, LLMBackendError)
    assert issubclass(LLMBackendError, RuntimeError)


# --- reasoning stripping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  plain answer \n", "plain answer"),
        ("<think>\nlet me see\n</think>\n\nANSWER", "ANSWER"),
        ("<think>a</think>x<think>b</think> y", "x y"),
        ("reasoning without opening tag</think>final", "final"),
        ("<think>cut off by the token limit", ""),
        (None, None),
    ],
)
def test_strip_reasoning(raw, clean):
    assert strip_reasoning(raw) == clean


# --- the official clients against the loopback server -----------------------------------------


def test_openai_sends_whole_system_message_and_options(llm_server, point_clients, tmp_path):
    point_clients(llm_server)
    reqs = [(LONG_SYSTEM, f"prompt {i}") for i in range(6)]
    out = instruct_model("gpt-4o-mini", reqs, temperature=0.7, seed=7, max_tokens=50, cache_dir=tmp_path,
                         progress=True)
    assert out == [f"echo: prompt {i}" for i in range(6)]  # order kept despite the thread pool
    bodies = llm_server.bodies("/v1/chat/completions")
    assert len(bodies) == 6
    for body in bodies:
        assert body["model"] == "gpt-4o-mini"
        assert body["messages"][0] == {"role": "system", "content": LONG_SYSTEM}
        assert body["messages"][1]["role"] == "user"
        assert body["temperature"] == 0.7 and body["top_p"] == 1.0 and body["n"] == 1
        assert body["seed"] == 7 and body["max_tokens"] == 50
    assert llm_server.requests[0].headers["authorization"] == "Bearer sk-test"


def test_openai_reasoning_model_uses_max_completion_tokens(llm_server, point_clients, tmp_path):
    point_clients(llm_server)
    assert instruct_model("o3-mini", [("sys", "q")], max_tokens=64, cache_dir=tmp_path) == ["echo: q"]
    (body,) = llm_server.bodies()
    assert body["max_completion_tokens"] == 64
    assert "temperature" not in body and "top_p" not in body and "max_tokens" not in body


def test_groq_path_options_and_think_stripping(point_clients, tmp_path):
    with LLMProtocolServer("<think>\nhidden chain\n</think>\n\n  the reply  ") as server:
        point_clients(server)
        out = instruct_model("qwen/qwen3-32b", [(LONG_SYSTEM, "u")], temperature=0.0, cache_dir=tmp_path)
        assert out == ["the reply"]
        (req,) = server.requests
    assert req.path == "/openai/v1/chat/completions"
    assert req.body["messages"][0] == {"role": "system", "content": LONG_SYSTEM}
    assert req.body["temperature"] == 1e-8 and req.body["n"] == 1
    assert req.body["max_completion_tokens"] == 4096
    assert req.headers["authorization"] == "Bearer gsk-test"


def test_ollama_chat_system_message_options_keep_alive(llm_server, point_clients, tmp_path):
    point_clients(llm_server)
    out = instruct_model("olmo2", [(LONG_SYSTEM, "hello")], temperature=0.2, cache_dir=tmp_path)
    assert out == ["echo: hello"]
    (req,) = llm_server.requests
    assert req.path == "/api/chat"
    body = req.body
    assert body["model"] == "olmo2" and body["stream"] is False and body["keep_alive"] == "1h"
    assert body["messages"] == [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "hello"}]
    assert body["options"] == {
        "seed": 42, "temperature": 0.2, "top_k": 40, "top_p": 1.0, "repeat_penalty": 1.1,
        "repeat_last_n": 64, "num_ctx": 8192, "num_predict": -1,
    }
    instruct_model("ollama:olmo2", [("s", "x")], max_tokens=12, cache_dir=tmp_path)
    assert llm_server.bodies()[-1]["options"]["num_predict"] == 12


def test_ollama_404_is_immediate_backend_error(point_clients, tmp_path):
    def reject(path, body):
        return 404, f"model '{body['model']}' not found, try pulling it first"

    with LLMProtocolServer(error_for=reject) as server:
        point_clients(server)
        with pytest.raises(BackendError, match="not found") as info:
            instruct_model("nosuchmodel", [("s", "u")], cache_dir=tmp_path)
        assert server.hits == 1  # not retried
    assert not isinstance(info.value, BackendUnavailable)
    assert "ollama pull nosuchmodel" in str(info.value)


def test_openai_401_is_immediate_backend_error(point_clients, tmp_path):
    with LLMProtocolServer(error_for=lambda p, b: (401, "Incorrect API key provided")) as server:
        point_clients(server)
        with pytest.raises(BackendError, match="Incorrect API key provided"):
            instruct_model("gpt-4o", [("s", "u"), ("s", "v")], cache_dir=tmp_path)
        assert server.hits <= 2


def test_openai_concurrency_is_bounded(point_clients, tmp_path):
    with LLMProtocolServer(delay_s=0.05) as server:
        point_clients(server)
        out = instruct_model("gpt-4o-mini", [("s", str(i)) for i in range(12)], cache_dir=tmp_path)
        assert out == [f"echo: {i}" for i in range(12)]
        assert 1 <= server.max_in_flight <= 4


def test_ollama_is_sequential(point_clients, tmp_path):
    with LLMProtocolServer(delay_s=0.02) as server:
        point_clients(server)
        instruct_model("olmo2", [("s", str(i)) for i in range(5)], cache_dir=tmp_path)
        assert server.max_in_flight == 1 and server.hits == 5


@pytest.mark.parametrize("model", ["olmo2", "gpt-4o-mini"])
def test_read_timeout_is_transient_and_bounded(point_clients, monkeypatch, tmp_path, model):
    monkeypatch.setenv("MECHARULE_LLM_TIMEOUT", "0.2")
    monkeypatch.setenv("MECHARULE_LLM_MAX_RETRIES", "1")
    with LLMProtocolServer(delay_s=1.0) as server:
        point_clients(server)
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            instruct_model(model, [("s", "u")], cache_dir=tmp_path)
        assert time.monotonic() - start < 5
        assert server.hits == 2


# --- caching -----------------------------------------------------------------------------------


def test_cache_second_call_makes_no_requests(llm_server, point_clients, tmp_path):
    point_clients(llm_server)
    reqs = [("sys", "a"), ("sys", "b"), ("sys", "a")]  # duplicate answered once
    first = instruct_model("gpt-4o-mini", reqs, cache_dir=tmp_path)
    assert first == ["echo: a", "echo: b", "echo: a"]
    assert llm_server.hits == 2
    assert instruct_model("gpt-4o-mini", reqs, cache_dir=tmp_path) == first
    assert llm_server.hits == 2  # rerun: zero new hits
    instruct_model("gpt-4o-mini", reqs, cache_dir=tmp_path, temperature=0.9)
    assert llm_server.hits == 4  # options are part of the key
    instruct_model("gpt-4o-mini", [("other system", "a")], cache_dir=tmp_path)
    assert llm_server.hits == 5  # so is the system message
    assert (tmp_path / "llm_calls").is_dir()


def test_cached_rerun_needs_no_credentials(llm_server, point_clients, monkeypatch, tmp_path):
    point_clients(llm_server)
    instruct_model("gpt-4o-mini", [("s", "a")], cache_dir=tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY")
    assert instruct_model("gpt-4o-mini", [("s", "a")], cache_dir=tmp_path) == ["echo: a"]


def test_empty_reply_is_retried_once_then_none_and_not_cached(point_clients, tmp_path):
    with LLMProtocolServer("   ") as server:
        point_clients(server)
        assert instruct_model("olmo2", [("s", "u")], cache_dir=tmp_path) == [None]
        assert server.hits == 2
        assert instruct_model("olmo2", [("s", "u")], cache_dir=tmp_path) == [None]
        assert server.hits == 4  # None was not cached


# --- retries and unavailability ----------------------------------------------------------------


@pytest.mark.parametrize("model, status", [("gpt-4o-mini", 500), ("olmo2", 500), ("qwen/qwen3-32b", 429)])
def test_transient_errors_are_retried(point_clients, tmp_path, model, status):
    with LLMProtocolServer("ok", fail_first=2, fail_status=status) as server:
        point_clients(server)
        assert instruct_model(model, [("s", "u")], cache_dir=tmp_path) == ["ok"]
        assert server.hits == 3


@pytest.mark.parametrize(
    "model, url_suffix, env_var",
    [("gpt-4o-mini", "/v1", "OPENAI_BASE_URL"), ("olmo2", "", "OLLAMA_HOST"), ("qwen/qwen3-32b", "", "GROQ_BASE_URL")],
)
def test_persistent_failure_raises_unavailable_naming_url_and_env(point_clients, monkeypatch, tmp_path,
                                                                   model, url_suffix, env_var):
    monkeypatch.setenv("MECHARULE_LLM_MAX_RETRIES", "2")
    with LLMProtocolServer("never", fail_first=10**6, fail_status=503) as server:
        point_clients(server)
        with pytest.raises(BackendUnavailable) as info:
            instruct_model(model, [("s", "u")], cache_dir=tmp_path)
        assert server.hits == 3  # 1 attempt + 2 retries, then stop
        url = server.url
    msg = str(info.value)
    assert "\n" not in msg
    assert url + url_suffix in msg and env_var in msg and "503" in msg and "keeps failing" in msg


@pytest.mark.parametrize(
    "model, env_var",
    [("olmo2", "OLLAMA_HOST"), ("gpt-4o-mini", "OPENAI_BASE_URL"), ("qwen/qwen3-32b", "GROQ_BASE_URL")],
)
def test_unreachable_port_fails_fast(monkeypatch, tmp_path, model, env_var):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("OLLAMA_HOST", url)
    monkeypatch.setenv("OPENAI_BASE_URL", url + "/v1")
    monkeypatch.setenv("GROQ_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("GROQ_API_KEY", "gsk-test")
    start = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        instruct_model(model, [("s", "u")], cache_dir=tmp_path)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert url in msg and env_var in msg and "unreachable" in msg
    if model == "olmo2":
        assert "ollama serve" in msg


@pytest.mark.parametrize("model, key", [("gpt-4o-mini", "OPENAI_API_KEY"), ("qwen/qwen3-32b", "GROQ_API_KEY")])
def test_missing_api_key_fails_before_any_request(llm_server, point_clients, monkeypatch, tmp_path, model, key):
    point_clients(llm_server)
    monkeypatch.delenv(key)
    with pytest.raises(BackendUnavailable, match=f"{key} is not set"):
        instruct_model(model, [("s", "u")], cache_dir=tmp_path)
    assert llm_server.hits == 0


def test_bad_requests_are_rejected(tmp_path):
    with pytest.raises(TypeError):
        instruct_model("olmo2", ["just a string"], cache_dir=tmp_path)
    with pytest.raises(ValueError):
        instruct_model("olmo2", [("s", "u")], temperature=-1, cache_dir=tmp_path)
    assert instruct_model("olmo2", [], cache_dir=tmp_path) == []


# --- local backend -----------------------------------------------------------------------------


class _NoTemplateTokenizer:
    chat_template = None


class _NoSystemRoleTokenizer:
    chat_template = "{{ x }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        if any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        return "<user>" + messages[0]["content"] + "<model>"


def test_build_local_prompt_fallbacks():
    assert build_local_prompt(_NoTemplateTokenizer(), "SYS", "USER") == ("SYS\n\nUSER", False)
    assert build_local_prompt(_NoTemplateTokenizer(), "", "USER") == ("USER", False)
    assert build_local_prompt(_NoSystemRoleTokenizer(), "SYS", "USER") == ("<user>SYS\n\nUSER<model>", True)


def test_local_chat_template_carries_system(smollm2):
    text, templated = build_local_prompt(smollm2.tokenizer, LONG_SYSTEM, "What is 2+2?")
    assert templated and LONG_SYSTEM in text and "What is 2+2?" in text
    assert text.rstrip().endswith("assistant")


def test_local_backend_real_generation_is_deterministic(smollm2, tmp_path):
    register_local_model("smollm2-135m-instruct-q4_1", smollm2)
    reqs = [("You are a helpful assistant. Answer briefly.", "Name one colour of the sky.")]
    kwargs = dict(temperature=0.7, max_tokens=24, seed=3)
    first = instruct_model("local:smollm2-135m-instruct-q4_1", reqs, cache_dir=tmp_path / "a", **kwargs)
    second = instruct_model("local:smollm2-135m-instruct-q4_1", reqs, cache_dir=tmp_path / "b", **kwargs)
    assert isinstance(first[0], str) and first[0].strip()
    assert first == second  # sampled, but seeded per request
    # Greedy path (short, the CPU is the bottleneck); a duplicate is generated once.
    greedy = instruct_model("local:smollm2-135m-instruct-q4_1", reqs * 2, temperature=0.0, max_tokens=4,
                            cache_dir=tmp_path / "c")
    assert greedy[0] and greedy[0] == greedy[1]
    assert len(list((tmp_path / "c" / "llm_calls").rglob("*.pkl"))) == 1
    # A cached rerun does not touch the model.
    lb.unregister_local_model("smollm2-135m-instruct-q4_1")
    try:
        register_local_model("smollm2-135m-instruct-q4_1", _ExplodingModel())
        again = instruct_model("local:smollm2-135m-instruct-q4_1", reqs, cache_dir=tmp_path / "a", **kwargs)
        assert again == first
    finally:
        register_local_model("smollm2-135m-instruct-q4_1", smollm2)


class _ExplodingModel:
    """Stands in for the model on a cached rerun: any use would fail."""

    tokenizer = None
    hf_model = None
