"""A loopback HTTP server that speaks enough of the OpenAI, Groq and Ollama chat protocols.

Used by tests to drive the official client packages for real, without any network:

* `POST /v1/chat/completions` (OpenAI, base URL `<url>/v1`) and
  `POST /openai/v1/chat/completions` (Groq, base URL `<url>`): chat-completion JSON;
* `POST /api/chat` and `POST /api/generate` (Ollama, host `<url>`): non-streaming replies.

Replies come from a script: a list (used in order, the last one repeated) or a function of
`(path, body)`. Every request is recorded (`server.requests`, `server.hits`), and the first
`fail_first` requests can be answered with HTTP `fail_status` (500, 429, …) to exercise retries;
`error_for(path, body)` may return `(status, message)` to reject chosen requests.
The server only ever binds 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Reply = str | list[str] | Callable[[str, dict], str]

OPENAI_PATHS = ("/v1/chat/completions", "/openai/v1/chat/completions")
OLLAMA_PATHS = ("/api/chat", "/api/generate")


@dataclass
class RecordedRequest:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


def echo_reply(path: str, body: dict) -> str:
    """Default script: echo the last user message."""
    if "messages" in body:
        users = [m.get("content", "") for m in body["messages"] if m.get("role") == "user"]
        return f"echo: {users[-1] if users else ''}"
    return f"echo: {body.get('prompt', '')}"


class LLMProtocolServer:
    """Threaded scripted server; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        replies: Reply = echo_reply,
        *,
        fail_first: int = 0,
        fail_status: int = 500,
        error_for: Callable[[str, dict], tuple[int, str] | None] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.replies = replies
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.error_for = error_for
        self.delay_s = delay_s
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._reply_index = 0
        self._in_flight = 0
        self.max_in_flight = 0  # most requests handled at the same time
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> "LLMProtocolServer":
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="llm-protocol-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "LLMProtocolServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- inspection -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hits(self) -> int:
        with self._lock:
            return len(self.requests)

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r.body for r in self.requests if path is None or r.path == path]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._reply_index = 0

    # --- scripting --------------------------------------------------------------------------
    def _next_reply(self, path: str, body: dict) -> str:
        if callable(self.replies):
            return self.replies(path, body)
        if isinstance(self.replies, str):
            return self.replies
        with self._lock:
            i = min(self._reply_index, len(self.replies) - 1)
            self._reply_index += 1
        return self.replies[i]

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _record(self, path: str, body: dict, headers: dict[str, str]) -> int:
        with self._lock:
            self.requests.append(RecordedRequest(path, body, headers))
            return len(self.requests)


def _make_handler(server: LLMProtocolServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: simple and robust

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, ollama: bool) -> None:
            if ollama:
                self._send(status, {"error": message})
            else:
                self._send(status, {"error": {"message": message, "type": "scripted", "code": status}})

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            self._error(404, f"no route GET {self.path}", ollama=self.path.startswith("/api/"))

        def do_POST(self) -> None:  # noqa: N802
            server._enter()
            try:
                self._post()
            finally:
                server._leave()

        def _post(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw.decode("utf-8") or "{}")
            except json.JSONDecodeError:
                body = {"_raw": raw.decode("utf-8", "replace")}
            path = self.path.split("?", 1)[0]
            n = server._record(path, body, {k.lower(): v for k, v in self.headers.items()})
            is_ollama = path in OLLAMA_PATHS
            if path not in OPENAI_PATHS and not is_ollama:
                self._error(404, f"no route POST {path}", ollama=path.startswith("/api/"))
                return
            if server.delay_s:
                time.sleep(server.delay_s)
            if n <= server.fail_first:
                self._error(server.fail_status, f"scripted failure {n} of {server.fail_first}", is_ollama)
                return
            if server.error_for is not None:
                err = server.error_for(path, body)
                if err is not None:
                    self._error(err[0], err[1], is_ollama)
                    return
            text = server._next_reply(path, body)
            model = body.get("model", "")
            if path == "/api/chat":
                self._send(200, {
                    "model": model, "created_at": "2025-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": text},
                    "done": True, "done_reason": "stop", "eval_count": len(text.split()),
                })
            elif path == "/api/generate":
                self._send(200, {
                    "model": model, "created_at": "2025-01-01T00:00:00Z", "response": text,
                    "done": True, "done_reason": "stop",
                })
            else:
                self._send(200, {
                    "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1735689600,
                    "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

    return Handler
