"""Sandboxed scoring of untrusted feature code proposed by the stage-2 feature LLM.

Feature code is a small Python function `def f(prompt, info)` written by an LLM, so it is treated as
hostile. Two independent barriers stand between it and the pipeline:

1. **Static allow-list** (`check_feature_source`, run in the parent and again in the worker): the
   source is parsed with `ast` and only the node types plain feature code needs are accepted
   (function definitions, assignments, control flow, comprehensions, calls, operators, literals,
   bare `try/except`). Imports, classes, lambdas, `with`, `global`, `yield`, `del`, names or
   attributes starting with `_`, reflective/I-O builtins (`eval`, `getattr`, `open`, `type`, ...)
   and frame/code-walking attributes (`gi_frame`, `f_globals`, `format`, `mro`, ...) are rejected
   with the offending construct and line. At run time the code sees only `FEATURE_BUILTINS`, `math`
   and a stripped-down `re` namespace (no `re.enum` / `re.functools`, which lead to `sys`).
2. **Process isolation with OS limits** (`FeatureSandbox`): code runs in `spawn`-started worker
   processes that, before any feature runs, switch from root to `nobody` when started as root,
   forbid file writes (RLIMIT_FSIZE=0), new file descriptors and therefore new files or sockets
   (RLIMIT_NOFILE at the lowest free descriptor), core dumps and forks (RLIMIT_NPROC=0; not binding
   on root), close the inherited resource-tracker pipe and replace the socket constructors. Each
   feature runs under an address-space cap (RLIMIT_AS), a CPU-time limit (ITIMER_PROF, backed by
   RLIMIT_CPU for C-level loops) and a parent-side wall-clock timeout; a worker that dies or
   overruns is killed and replaced, only that feature is rejected. The parent decodes worker replies
   with an unpickler that refuses every class, so a compromised worker cannot run code in the parent
   through its reply.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import re
import resource
import signal
import socket
import sys
import threading
import time
import types
from array import array
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from lib.features.feature import FEATURE_BUILTINS, Feature, sanitize_score

if TYPE_CHECKING:  # numpy is imported lazily so the worker's own import stays cheap
    import numpy as np

__all__ = [
    "FeatureRejected",
    "FeatureSandbox",
    "SandboxResult",
    "check_feature_source",
    "MAX_SOURCE_CHARS",
]

MAX_SOURCE_CHARS = 4000

# ---- static allow-list ----------------------------------------------------------------------
_ALLOWED_NODES: tuple[type, ...] = (
    ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.keyword,
    # statements
    ast.Return, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.For, ast.While, ast.If, ast.Expr,
    ast.Pass, ast.Break, ast.Continue, ast.Try, ast.ExceptHandler, ast.Raise, ast.Assert,
    # expressions
    ast.BoolOp, ast.NamedExpr, ast.BinOp, ast.UnaryOp, ast.IfExp, ast.Dict, ast.Set, ast.List,
    ast.Tuple, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.comprehension,
    ast.Compare, ast.Call, ast.FormattedValue, ast.JoinedStr, ast.Constant, ast.Attribute,
    ast.Subscript, ast.Slice, ast.Starred, ast.Name, ast.Load, ast.Store,
    ast.boolop, ast.operator, ast.unaryop, ast.cmpop,
)

# Friendly names for the constructs people (and LLMs) try most often.
_NODE_WORDS: dict[type, str] = {
    ast.Import: "import statement", ast.ImportFrom: "from-import statement",
    ast.Global: "global statement", ast.Nonlocal: "nonlocal statement", ast.With: "with statement",
    ast.Lambda: "lambda", ast.ClassDef: "class definition", ast.AsyncFunctionDef: "async function",
    ast.AsyncFor: "async for", ast.AsyncWith: "async with", ast.Await: "await",
    ast.Yield: "yield", ast.YieldFrom: "yield from", ast.Delete: "del statement",
    ast.Match: "match statement", ast.Del: "deletion",
}
if hasattr(ast, "TryStar"):
    _NODE_WORDS[ast.TryStar] = "try/except* statement"

_DENIED_NAMES = frozenset({
    "eval", "exec", "compile", "open", "globals", "locals", "vars", "getattr", "setattr",
    "delattr", "hasattr", "input", "breakpoint", "help", "memoryview", "type", "object", "super",
    "classmethod", "staticmethod", "property", "dir", "id", "exit", "quit", "print",
    # not reachable anyway (no imports); named for a clear message
    "os", "sys", "subprocess", "socket", "shutil", "pathlib", "importlib", "builtins", "io",
    "ctypes", "signal", "resource", "multiprocessing", "threading", "pickle", "marshal",
})
_DENIED_ATTRS = frozenset({"format", "format_map", "mro"})
_DENIED_ATTR_PREFIXES = ("_", "gi_", "cr_", "ag_", "f_", "tb_", "co_", "func_")

# The part of `re` a feature may use; the real module also exposes `enum`, `functools`, `copyreg`.
_RE_PUBLIC = (
    "compile", "search", "match", "fullmatch", "findall", "finditer", "sub", "subn", "split",
    "escape", "A", "ASCII", "I", "IGNORECASE", "M", "MULTILINE", "S", "DOTALL", "X", "VERBOSE",
    "U", "UNICODE", "NOFLAG",
)
_RE_PUBLIC_SET = frozenset(_RE_PUBLIC)

# Method names that mutate their receiver: a feature using none of them (and no subscript store or
# augmented assignment) cannot change the shared `info` dicts, so they need not be copied for it.
_MUTATING_METHODS = frozenset({
    "append", "extend", "insert", "pop", "popitem", "remove", "clear", "update", "setdefault",
    "sort", "reverse", "add", "discard", "difference_update", "intersection_update",
    "symmetric_difference_update",
})


class FeatureRejected(Exception):
    """A feature refused by the static check or by the sandbox; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _where(node: ast.AST) -> str:
    return f"line {getattr(node, 'lineno', '?')}"


def _check_identifier(name: str | None, what: str, node: ast.AST) -> None:
    if name is None:
        return
    if name.startswith("_"):
        raise FeatureRejected(f"{_where(node)}: {what} '{name}' starts with '_' (not allowed)")
    if name in _DENIED_NAMES:
        raise FeatureRejected(f"{_where(node)}: {what} '{name}' is not allowed")


def _check_node(node: ast.AST) -> None:
    """Raise FeatureRejected if one AST node is outside the allow-list or breaks a per-node rule."""
    if not isinstance(node, _ALLOWED_NODES):
        word = _NODE_WORDS.get(type(node), type(node).__name__)
        raise FeatureRejected(f"{_where(node)}: {word} is not allowed")
    if isinstance(node, ast.Name):
        _check_identifier(node.id, "name", node)
    elif isinstance(node, ast.Attribute):
        attr = node.attr
        if attr.startswith(_DENIED_ATTR_PREFIXES) or attr in _DENIED_ATTRS:
            raise FeatureRejected(f"{_where(node)}: attribute '.{attr}' is not allowed")
        if not isinstance(node.ctx, ast.Load):
            raise FeatureRejected(f"{_where(node)}: assigning to attribute '.{attr}' is not allowed")
        if isinstance(node.value, ast.Name) and node.value.id == "re" and attr not in _RE_PUBLIC_SET:
            allowed = ", ".join(_RE_PUBLIC[:10])
            raise FeatureRejected(f"{_where(node)}: 're.{attr}' is not available (only {allowed}, flags)")
    elif isinstance(node, ast.FunctionDef):
        _check_identifier(node.name, "function name", node)
        if node.decorator_list:
            raise FeatureRejected(f"{_where(node)}: decorators are not allowed")
    elif isinstance(node, ast.arg):
        _check_identifier(node.arg, "parameter", node)
    elif isinstance(node, ast.keyword):
        _check_identifier(node.arg, "keyword argument", node)
    elif isinstance(node, ast.Try):
        if node.finalbody:
            raise FeatureRejected(f"{_where(node)}: try/finally is not allowed")
    elif isinstance(node, ast.ExceptHandler):
        if node.type is not None or node.name is not None:
            raise FeatureRejected(f"{_where(node)}: only a bare 'except:' is allowed")


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _position(node: ast.AST) -> tuple[float, ...]:
    """Sort key in reading order (inner attribute chains first); nodes without a position last."""
    keys = ("lineno", "col_offset", "end_lineno", "end_col_offset")
    return tuple(math.inf if getattr(node, k, None) is None else getattr(node, k) for k in keys)


def _analyse_source(src: str) -> tuple[str, bool]:
    """Static check; return (name of the (prompt, info) function, whether the code may mutate data)."""
    if not isinstance(src, str):
        raise FeatureRejected(f"source is {type(src).__name__}, not str")
    if len(src) > MAX_SOURCE_CHARS:
        raise FeatureRejected(f"source too long ({len(src)} chars > {MAX_SOURCE_CHARS})")
    try:
        tree = ast.parse(src, mode="exec")
    except SyntaxError as exc:
        raise FeatureRejected(f"syntax error: line {exc.lineno}: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise FeatureRejected(f"unparsable source: {type(exc).__name__}: {exc}") from None
    candidates: list[str] = []
    for i, stmt in enumerate(tree.body):
        if isinstance(stmt, ast.FunctionDef):
            params = [a.arg for a in stmt.args.posonlyargs + stmt.args.args]
            if params[:2] == ["prompt", "info"]:
                candidates.append(stmt.name)
        elif not (i == 0 and _is_docstring(stmt)):
            word = _NODE_WORDS.get(type(stmt), type(stmt).__name__)
            raise FeatureRejected(
                f"{_where(stmt)}: only function definitions are allowed at module level (found {word})"
            )
    may_mutate = False
    # Iterative walk (deep expressions cannot exhaust the parent's stack), checked in reading
    # order so the reason names the first offending construct.
    for node in sorted(ast.walk(tree), key=_position):
        _check_node(node)
        if isinstance(node, ast.AugAssign):
            may_mutate = True
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            may_mutate = True
        elif isinstance(node, ast.Attribute) and node.attr in _MUTATING_METHODS:
            may_mutate = True
    if not candidates:
        raise FeatureRejected("no top-level function whose first two parameters are (prompt, info)")
    if len(candidates) > 1:
        raise FeatureRejected(f"ambiguous: several functions take (prompt, info): {', '.join(candidates)}")
    return candidates[0], may_mutate


def check_feature_source(src: str) -> str:
    """Apply the static allow-list to feature source; return the name of its (prompt, info) function."""
    return _analyse_source(src)[0]


# ---- results --------------------------------------------------------------------------------
@dataclass
class SandboxResult:
    """Scores of the kept features (columns in input order, NaN = missing) and the rejections."""

    matrix: "np.ndarray"
    kept: list[Feature]
    rejected: list[tuple[Feature, str]]
    row_errors: list[int] = field(default_factory=list)  # per kept feature: rows whose call raised


# ---- wire format ----------------------------------------------------------------------------
class _PlainPickler(pickle.Pickler):
    """Pickles only plain data (str, bytes, numbers, bool, None, list, tuple, dict, set)."""

    def reducer_override(self, obj: Any) -> Any:
        raise TypeError(
            f"prompts/infos must hold plain Python data (str, int, float, bool, None, list, tuple, "
            f"dict, set); found {type(obj).__module__}.{type(obj).__qualname__}"
        )


def _plain_dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _PlainPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every global, so decoding a (possibly compromised) worker's reply cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"worker reply references {module}.{name}")


def _plain_loads(data: bytes) -> Any:
    return _PlainUnpickler(io.BytesIO(data)).load()


# ---- worker side ----------------------------------------------------------------------------
_EXIT_CPU = 86
_EXIT_MEMORY = 87
_CPU_GRACE_S = 0.5
_RECURSION_LIMIT = 400
_NOBODY = 65534


@dataclass(frozen=True)
class _Limits:
    cpu_s: float
    memory_mb: int
    drop_privileges: bool = True


class _CPULimit(BaseException):
    """Raised in the worker by the ITIMER_PROF handler when a feature exhausts its CPU budget."""


_cpu_state = {"armed": False, "fired": False}


def _on_cpu_timer(signum: int, frame: Any) -> None:
    if not _cpu_state["armed"]:
        return
    if _cpu_state["fired"]:  # the first _CPULimit was swallowed (bare except): stop hard
        os._exit(_EXIT_CPU)
    _cpu_state["fired"] = True
    signal.setitimer(signal.ITIMER_PROF, _CPU_GRACE_S)
    raise _CPULimit()


def _no_network(*args: Any, **kwargs: Any) -> Any:
    raise PermissionError("network access is disabled in the feature sandbox")


def _safe_re() -> types.ModuleType:
    mod = types.ModuleType("re", "Restricted view of the re module for feature code.")
    for name in _RE_PUBLIC:
        setattr(mod, name, getattr(re, name))
    return mod


def _close_resource_tracker_fd() -> None:
    """Close the inherited pipe to multiprocessing's resource tracker (it runs as the parent's user)."""
    with contextlib.suppress(Exception):
        from multiprocessing import resource_tracker

        tracker = resource_tracker._resource_tracker  # private; best effort
        if getattr(tracker, "_fd", None) is not None:
            os.close(tracker._fd)
            tracker._fd = None


def _apply_process_limits(drop_privileges: bool = True) -> int:
    """Lock the current process down for good; return an fd on /proc/self/statm for memory reads."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail with EFBIG, not a kill
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        if hasattr(socket, name):
            setattr(socket, name, _no_network)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    statm_fd = os.open("/proc/self/statm", os.O_RDONLY)
    _close_resource_tracker_fd()
    if drop_privileges and os.getuid() == 0:
        with contextlib.suppress(OSError):
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    probe = os.open("/dev/null", os.O_RDONLY)  # the lowest free descriptor number
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, probe))  # every fd below it is in use
    return statm_fd


class _Worker:
    """State of one sandbox worker process: the current table and the limits applied per feature."""

    def __init__(self, limits: _Limits) -> None:
        import numpy  # noqa: F401  (sanitize_score imports it lazily; no new files later)

        self.limits = limits
        self.re = _safe_re()
        self.blob = b""
        self.prompts: list[str] = []
        self.infos: list[dict] = []
        signal.signal(signal.SIGPROF, _on_cpu_timer)
        sys.setrecursionlimit(_RECURSION_LIMIT)
        self.statm_fd = _apply_process_limits(limits.drop_privileges)

    def _vm_bytes(self) -> int:
        return int(os.pread(self.statm_fd, 128, 0).split()[0]) * resource.getpagesize()

    @contextlib.contextmanager
    def _limited(self) -> Iterator[None]:
        """Address-space and CPU caps (soft limits, lifted afterwards) around untrusted code."""
        as_hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        cap = self._vm_bytes() + self.limits.memory_mb * 2**20
        if as_hard != resource.RLIM_INFINITY:
            cap = min(cap, as_hard)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_cap = int(usage.ru_utime + usage.ru_stime + self.limits.cpu_s + _CPU_GRACE_S) + 2
        if cpu_hard != resource.RLIM_INFINITY:
            cpu_cap = min(cpu_cap, cpu_hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, as_hard))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_cap, cpu_hard))
        _cpu_state.update(armed=True, fired=False)
        signal.setitimer(signal.ITIMER_PROF, self.limits.cpu_s)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            _cpu_state["armed"] = False
            resource.setrlimit(resource.RLIMIT_AS, (as_hard, as_hard))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_hard, cpu_hard))

    def load(self, blob: bytes) -> None:
        self.blob = blob
        self.prompts, self.infos = pickle.loads(blob)

    def run(self, src: str, sanity_rows: int) -> tuple:
        """Score one feature on all rows: ('ok', values, n_errors, first_error) or ('rejected', why)."""
        try:
            with self._limited():
                return self._score(src, sanity_rows)
        except _CPULimit:
            return ("rejected", f"CPU time limit {self.limits.cpu_s:g}s")

    def _score(self, src: str, sanity_rows: int) -> tuple:
        try:
            name, may_mutate = _analyse_source(src)
        except FeatureRejected as exc:
            return ("rejected", f"static check: {exc.reason}")
        namespace: dict[str, Any] = {"__builtins__": dict(FEATURE_BUILTINS), "math": math, "re": self.re}
        try:
            exec(compile(src, f"<feature {name}>", "exec"), namespace)
            fn = namespace[name]
        except Exception as exc:
            return ("rejected", f"definition failed: {_describe(exc)}")
        prompts = self.prompts
        # Fresh copies when the code could mutate `info`, so features cannot influence each other.
        infos = pickle.loads(self.blob)[1] if may_mutate else self.infos
        n = len(prompts)
        k = min(max(sanity_rows, 0), n)
        out = [math.nan] * n
        n_errors = 0
        first_error: str | None = None
        for i in range(n):
            try:
                value = sanitize_score(fn(prompts[i], infos[i]))
            except Exception as exc:
                if i < k:
                    if isinstance(exc, MemoryError):
                        mb = self.limits.memory_mb
                        return ("rejected", f"memory limit {mb} MB (MemoryError on sanity row {i})")
                    return ("rejected", f"sanity check: row {i} raised {_describe(exc)}")
                n_errors += 1
                if first_error is None:
                    first_error = f"row {i}: {_describe(exc)}"
                continue
            if value is not None:
                out[i] = value
        return ("ok", array("d", out).tobytes(), n_errors, first_error)

    def probe(self) -> dict[str, Any]:
        """Report the limits as untrusted code would meet them (used by tests and diagnostics)."""
        report: dict[str, Any] = {}
        with self._limited():
            for name in ("RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_AS", "RLIMIT_CPU",
                         "RLIMIT_NPROC"):
                report[name] = list(resource.getrlimit(getattr(resource, name)))
            report["uid"] = os.getuid()
            report["recursion_limit"] = sys.getrecursionlimit()
            for label, attempt in (
                ("open_write", lambda: open(os.path.join("/tmp", f"sandbox_probe_{os.getpid()}"), "w")),
                ("open_read", lambda: open("/etc/hostname")),
                ("socket", lambda: socket.socket()),
                ("create_connection", lambda: socket.create_connection(("127.0.0.1", 9))),
                ("big_alloc", lambda: bytearray((self.limits.memory_mb + 64) * 2**20)),
            ):
                try:
                    attempt()
                    report[label] = "allowed"
                except BaseException as exc:  # noqa: BLE001 - recording what happened
                    report[label] = type(exc).__name__
        return report


def _describe(exc: BaseException) -> str:
    msg = str(exc)
    if len(msg) > 200:
        msg = msg[:200] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _worker_main(conn: mp_connection.Connection, limits: _Limits) -> None:
    """Entry point of a sandbox worker: set limits, then serve data/run/probe/stop messages."""
    try:
        worker = _Worker(limits)
        while True:
            try:
                msg = conn.recv()  # from the trusted parent
            except (EOFError, OSError):
                return
            kind = msg[0]
            if kind == "data":
                worker.load(msg[2])
                reply: tuple = ("loaded", msg[1])
            elif kind == "run":
                reply = ("result", msg[1], *worker.run(msg[2], msg[3]))
            elif kind == "probe":
                reply = ("probe", worker.probe())
            else:
                return
            conn.send_bytes(_plain_dumps(reply))
    except _CPULimit:
        os._exit(_EXIT_CPU)
    except MemoryError:
        os._exit(_EXIT_MEMORY)


# ---- parent side ----------------------------------------------------------------------------
_START_TIMEOUT_S = 120.0
_ENV_LOCK = threading.Lock()
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """Environment inherited by a spawned worker: one BLAS thread, a fixed hash seed (determinism)."""
    overrides = dict(_WORKER_ENV)
    overrides["PYTHONHASHSEED"] = os.environ.get("PYTHONHASHSEED", "0")
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in overrides}
        os.environ.update(overrides)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _exit_reason(exitcode: int | None, limits: _Limits) -> str:
    if exitcode == _EXIT_CPU or exitcode == -signal.SIGXCPU:
        return f"CPU time limit {limits.cpu_s:g}s"
    if exitcode == _EXIT_MEMORY:
        return f"memory limit {limits.memory_mb} MB"
    if exitcode is not None and exitcode < 0:
        try:
            sig = signal.Signals(-exitcode).name
        except ValueError:
            sig = "unknown signal"
        return f"worker crashed: exit code {exitcode} ({sig})"
    return f"worker crashed: exit code {exitcode}"


@dataclass
class _Slot:
    """Parent-side handle of one worker process."""

    proc: Any
    conn: mp_connection.Connection
    state: str = "starting"  # starting -> loading -> idle <-> busy
    gen: int = -1
    job: int | None = None
    deadline: float = math.inf


class FeatureSandbox:
    """Pool of locked-down worker processes that score untrusted feature code (context manager)."""

    def __init__(
        self,
        n_workers: int = min(2, os.cpu_count() or 1),
        timeout_s: float = 10.0,
        cpu_s: float = 5.0,
        memory_mb: int = 1024,
    ) -> None:
        if n_workers < 1:
            raise ValueError("n_workers must be >= 1")
        self.n_workers = n_workers
        self.timeout_s = float(timeout_s)
        self.limits = _Limits(cpu_s=float(cpu_s), memory_mb=int(memory_mb))
        self._ctx = mp.get_context("spawn")
        self._slots: list[_Slot] = []
        self._gen = 0
        self._blob: bytes | None = None
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "FeatureSandbox":
        self._ensure_workers()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Stop every worker (politely, then by force)."""
        for slot in self._slots:
            with contextlib.suppress(Exception):
                slot.conn.send(("stop",))
        for slot in self._slots:
            slot.proc.join(timeout=2)
            self._kill(slot)
        self._slots = []

    def _spawn(self) -> _Slot:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child_conn, self.limits), daemon=True,
                                 name="feature-sandbox")
        with _worker_environment():
            proc.start()
        child_conn.close()
        slot = _Slot(proc=proc, conn=parent_conn, deadline=time.monotonic() + _START_TIMEOUT_S)
        if self._blob is not None:
            self._send_data(slot)
        return slot

    def _ensure_workers(self) -> None:
        while len(self._slots) < self.n_workers:
            self._slots.append(self._spawn())

    @staticmethod
    def _kill(slot: _Slot) -> None:
        if slot.proc.is_alive():
            slot.proc.kill()
        slot.proc.join(timeout=5)
        with contextlib.suppress(Exception):
            slot.conn.close()

    def _replace(self, slot: _Slot) -> _Slot:
        self._kill(slot)
        self.restarts += 1
        new = self._spawn()
        self._slots[self._slots.index(slot)] = new
        return new

    def _send_data(self, slot: _Slot) -> None:
        try:
            slot.conn.send(("data", self._gen, self._blob))
        except (OSError, ValueError):
            pass  # the worker died; its sentinel reports it
        slot.state = "loading"
        slot.deadline = time.monotonic() + _START_TIMEOUT_S

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(
        self,
        features: list[Feature],
        prompts: list[str],
        infos: list[dict],
        sanity_rows: int = 10,
    ) -> SandboxResult:
        """Score every feature on every row in the workers; reject unsafe, failing or empty features."""
        import numpy as np

        prompts = list(prompts)
        infos = list(infos)
        if len(prompts) != len(infos):
            raise ValueError(f"{len(prompts)} prompts but {len(infos)} infos")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be str")
        n = len(prompts)
        outcome: list[tuple | None] = [None] * len(features)
        jobs: deque[int] = deque()
        names: dict[int, str] = {}
        for i, feat in enumerate(features):
            try:
                names[i] = check_feature_source(feat.python_src)
                jobs.append(i)
            except FeatureRejected as exc:
                outcome[i] = ("rejected", f"static check: {exc.reason}")
        if jobs:
            self._gen += 1
            self._blob = _plain_dumps((prompts, infos))
            self._ensure_workers()
            for slot in self._slots:
                self._send_data(slot)
            self._schedule(jobs, features, sanity_rows, outcome)

        kept: list[Feature] = []
        columns: list[np.ndarray] = []
        rejected: list[tuple[Feature, str]] = []
        row_errors: list[int] = []
        for i, feat in enumerate(features):
            res = outcome[i]
            assert res is not None
            if res[0] == "ok":
                values = np.frombuffer(res[1], dtype=np.float64)
                if values.shape != (n,):
                    rejected.append((feat, "protocol error: wrong number of values"))
                elif not np.isfinite(values).any():
                    rejected.append((feat, f"returns no numbers (all {n} rows missing or non-numeric)"))
                else:
                    kept.append(replace(feat, fn_name=names[i]))
                    columns.append(values)
                    row_errors.append(int(res[2]))
            else:
                rejected.append((feat, str(res[1])))
        matrix = np.empty((n, len(columns)), dtype=np.float64)
        for j, col in enumerate(columns):
            matrix[:, j] = col
        return SandboxResult(matrix=matrix, kept=kept, rejected=rejected, row_errors=row_errors)

    def _schedule(self, jobs: deque[int], features: Sequence[Feature], sanity_rows: int,
                  outcome: list[tuple | None]) -> None:
        """Feed jobs to idle workers; collect replies, enforce deadlines, replace dead workers."""
        while True:
            for slot in self._slots:
                if slot.state == "idle" and jobs:
                    i = jobs.popleft()
                    try:
                        slot.conn.send(("run", i, features[i].python_src, int(sanity_rows)))
                    except (OSError, ValueError):
                        pass  # death is noticed below through the sentinel
                    slot.state, slot.job = "busy", i
                    slot.deadline = time.monotonic() + self.timeout_s
            if not jobs and not any(s.state == "busy" for s in self._slots):
                return
            wait_s = max(0.0, min(s.deadline for s in self._slots) - time.monotonic())
            handles: list[Any] = [s.conn for s in self._slots] + [s.proc.sentinel for s in self._slots]
            mp_connection.wait(handles, timeout=wait_s)
            for slot in list(self._slots):
                self._poll(slot, outcome)

    def _poll(self, slot: _Slot, outcome: list[tuple | None]) -> None:
        """Handle whatever one worker has to say, or its death, or its overrun deadline."""
        try:
            while slot.conn.poll():
                msg = _plain_loads(slot.conn.recv_bytes())
                self._handle(slot, msg, outcome)
        except (EOFError, OSError, pickle.UnpicklingError, ValueError, TypeError, IndexError):
            slot.proc.join(timeout=1)
            if slot.proc.is_alive():  # garbage on the wire: treat as a crash
                slot.proc.kill()
                slot.proc.join(timeout=5)
        if not slot.proc.is_alive():
            if slot.state == "busy" and slot.job is not None:
                outcome[slot.job] = ("rejected", _exit_reason(slot.proc.exitcode, self.limits))
            elif slot.state in ("starting", "loading"):
                code = slot.proc.exitcode
                self._kill(slot)
                raise RuntimeError(f"feature sandbox worker died during start-up (exit code {code})")
            self._replace(slot)
            return
        if time.monotonic() > slot.deadline:
            if slot.state == "busy" and slot.job is not None:
                outcome[slot.job] = ("rejected", f"wall-clock timeout {self.timeout_s:g}s")
                self._replace(slot)
            elif slot.state in ("starting", "loading"):
                self._kill(slot)
                raise RuntimeError(f"feature sandbox worker did not start within {_START_TIMEOUT_S:g}s")

    def _handle(self, slot: _Slot, msg: tuple, outcome: list[tuple | None]) -> None:
        kind = msg[0]
        if kind == "loaded":
            if msg[1] == self._gen and slot.state in ("starting", "loading"):
                slot.state, slot.gen, slot.deadline = "idle", msg[1], math.inf
        elif kind == "result":
            if slot.state != "busy" or msg[1] != slot.job:
                raise ValueError("unexpected result from worker")
            outcome[slot.job] = tuple(msg[2:])
            slot.state, slot.job, slot.deadline = "idle", None, math.inf
        else:
            raise ValueError(f"unknown worker message {kind!r}")

    def probe_limits(self) -> dict[str, Any]:
        """Run the trusted limit probe in a worker: rlimits and what opening files/sockets does there."""
        self._ensure_workers()
        slot = self._slots[0]
        slot.conn.send(("probe",))
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if not slot.conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("probe timed out")
            msg = _plain_loads(slot.conn.recv_bytes())
            if msg[0] == "probe":
                return msg[1]
            if msg[0] == "loaded" and msg[1] == self._gen:
                slot.state, slot.gen, slot.deadline = "idle", msg[1], math.inf
