"""The stage-2 feature sandbox: static allow-list, escape attempts, OS limits, worker restarts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lib.features.feature import Feature, sanitize_score
from lib.features.sandbox import (
    MAX_SOURCE_CHARS,
    FeatureRejected,
    FeatureSandbox,
    check_feature_source,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _src(body: str, header: str = "def my_feature(prompt: str, info: dict):") -> str:
    return header + "\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"


PROMPTS = [f"{a}+{b}=" if a % 3 else f"{a}*{b}=" for a, b in zip(range(3, 60), range(100, 157))]
INFOS = [
    {"operator": "*" if a % 3 == 0 else "+", "digits_a": [int(c) for c in str(a)], "len_a": len(str(a))}
    for a in range(3, 60)
]

# Ordinary feature code: math, re, string methods, comprehensions, helpers, bool/isinstance, try.
VALID: dict[str, str] = {
    "n_digits": _src("return len(re.findall(r'\\d', prompt))"),
    "log_len": _src("return math.log(len(prompt) + 1)"),
    "is_plus": _src("return bool(info.get('operator') == '+') and isinstance(prompt, str)"),
    "digit_sum": _src("return sum(d for d in info['digits_a'])"),
    "helper_first": (
        "def count_char(text, ch):\n    return len([c for c in text if c == ch])\n\n"
        + _src("n = count_char(prompt, '5')\nreturn n if n else None")
    ),
    "fstring_slice": _src("s = f\"{prompt[:2]}|{prompt[-2:]!r}\"\nreturn len(s) + prompt[::-1].count('1')"),
    "try_bare": _src(
        """
        try:
            return int(prompt.split('+')[1].rstrip('='))
        except:
            return None
        """
    ),
    "dict_walrus": _src(
        """
        counts = {c: prompt.count(c) for c in set(prompt) if c.isdigit()}
        if (m := max(counts.values(), default=0)) > 1:
            return m
        return 0.5
        """
    ),
    "while_loop": _src(
        """
        n, steps = len(prompt), 0
        while n > 1:
            n = n // 2 if n % 2 == 0 else 3 * n + 1
            steps += 1
        return steps
        """
    ),
}


def _in_process_column(src: str) -> np.ndarray:
    """Reference values: the trusted in-process compile of the same source."""
    fn = Feature("ref", "", src).compiled()
    out = []
    for p, info in zip(PROMPTS, INFOS):
        try:
            v = sanitize_score(fn(p, dict(info, digits_a=list(info["digits_a"]))))
        except Exception:
            v = None
        out.append(math.nan if v is None else v)
    return np.array(out, dtype=np.float64)


@pytest.fixture(scope="module")
def sandbox():
    with FeatureSandbox(n_workers=2, timeout_s=20.0, cpu_s=1.0, memory_mb=256) as sb:
        yield sb


# ---- static checks -------------------------------------------------------------------------
STATIC_REJECTS = [
    ("import os\n" + _src("return 1"), "import statement"),
    (_src("from os import path\nreturn 1"), "from-import"),
    (_src("return __import__('os').getpid()"), "'__import__' starts with '_'"),
    (_src("open('/tmp/x', 'w').write('x')\nreturn 1"), "name 'open' is not allowed"),
    (_src("return exec('x = 1')"), "'exec'"),
    (_src("return eval('1')"), "'eval'"),
    (_src("return compile('1', 'x', 'eval')"), "'compile'"),
    (_src("return len(().__class__.__bases__[0].__subclasses__())"), "attribute '.__class__'"),
    (_src("return getattr(prompt, '__class__')"), "'getattr'"),
    (_src("return len(globals())"), "'globals'"),
    (_src("return (x for x in [1]).gi_frame.f_back.f_globals"), "'.gi_frame'"),
    (_src("return len('{0.__class__}'.format(prompt))"), "'.format'"),
    (_src("return re.enum.sys.modules['os'].getpid()"), "'re.enum' is not available"),
    (_src("return socket.socket()"), "name 'socket' is not allowed"),
    (_src("f = lambda x: x\nreturn 1"), "lambda"),
    ("class A:\n    pass\n" + _src("return 1"), "class definition"),
    (_src("global x\nreturn 1"), "global statement"),
    (_src("with x:\n    pass\nreturn 1"), "with statement"),
    (_src("x = [1]\ndel x[0]\nreturn 1"), "del statement"),
    (_src("yield 1"), "yield"),
    ("async def my_feature(prompt, info):\n    return 1\n", "async function"),
    (_src("return type(prompt)"), "'type'"),
    (_src("print(prompt)\nreturn 1"), "'print'"),
    (_src("re.search = None\nreturn 1"), "assigning to attribute"),
    (_src("try:\n    return 1\nexcept Exception:\n    return 0"), "bare 'except:'"),
    (_src("try:\n    return 1\nfinally:\n    return 0"), "try/finally"),
    ("X = 3\n" + _src("return X"), "only function definitions are allowed at module level"),
    ("@re.compile\n" + _src("return 1"), "decorators"),
    (_src("return 1 +"), "syntax error"),
    ("x = 1\n", "only function definitions"),
    ("def my_feature(x):\n    return 1\n", "no top-level function"),
    (_src("return 1") + _src("return 2", "def other(prompt, info):"), "ambiguous"),
    (_src("return 1") + "#" * MAX_SOURCE_CHARS, "source too long"),
]


@pytest.mark.parametrize("src,reason", STATIC_REJECTS, ids=[r for _, r in STATIC_REJECTS])
def test_static_check_rejects(src: str, reason: str) -> None:
    with pytest.raises(FeatureRejected) as info:
        check_feature_source(src)
    assert reason in info.value.reason
    assert str(info.value) == info.value.reason


def test_static_check_reports_line_and_picks_signature_function() -> None:
    with pytest.raises(FeatureRejected, match=r"line 3: name 'eval'"):
        check_feature_source(_src("x = 1\nreturn eval('x')"))
    src = "def helper(a, b):\n    return a\n\n" + _src("return helper(1, 2)", "def score(prompt, info):")
    assert check_feature_source(src) == "score"
    for name, src in VALID.items():
        assert check_feature_source(src), name


# ---- escape attempts inside one evaluate call ----------------------------------------------
RUNTIME_ABUSE = [
    ("import_os", "import os\n" + _src("return 1"), "import statement"),
    ("dunder_import", _src("return __import__('os').getpid()"), "__import__"),
    ("open_write", _src("open('/tmp/sandbox_x', 'w').write('x')\nreturn 1"), "'open'"),
    ("exec", _src("exec('y = 1')\nreturn 1"), "'exec'"),
    ("eval", _src("return eval('2')"), "'eval'"),
    ("compile", _src("return compile('1', 's', 'eval')"), "'compile'"),
    ("subclasses", _src("return len(().__class__.__bases__[0].__subclasses__())"), "'.__class__'"),
    ("getattr", _src("return getattr(prompt, '__class__')"), "'getattr'"),
    ("globals", _src("return len(globals())"), "'globals'"),
    ("frame_walk", _src("g = (x for x in [1])\nreturn g.gi_frame.f_back.f_globals"), "'.gi_frame'"),
    ("format_walk", _src("return len('{0.__class__}'.format(prompt))"), "'.format'"),
    ("re_module_walk", _src("r = re\nreturn len(r.enum.sys.modules)"), "AttributeError"),
    ("infinite_loop", _src("while True:\n    pass"), "CPU time limit"),
    ("memory_list", _src("x = [0] * 10**10\nreturn len(x)"), "memory limit"),
    ("memory_str", _src("return len('a' * 10**9)"), "memory limit"),
    (
        "deep_recursion",
        "def down(n):\n    return down(n + 1) + 1\n\n" + _src("return down(0)"),
        "RecursionError",
    ),
    ("returns_str", _src("return 'abc'"), "returns no numbers"),
    ("returns_none", _src("return None"), "returns no numbers"),
    ("raises_on_sanity", _src("return 1 / 0"), "sanity check: row 0 raised ZeroDivisionError"),
    ("syntax_error", _src("return (1"), "syntax error"),
    ("no_function", "x = 1\n", "only function definitions"),
    ("wrong_signature", "def f(x):\n    return 1\n", "no top-level function"),
    ("two_functions", _src("return 1") + _src("return 2", "def g(prompt, info):"), "ambiguous"),
    ("socket", _src("return socket.create_connection(('127.0.0.1', 80))"), "'socket'"),
]


def test_escape_attempts_rejected_valid_features_kept(sandbox: FeatureSandbox) -> None:
    features: list[Feature] = []
    valid_names = list(VALID)
    for i, (label, src, _) in enumerate(RUNTIME_ABUSE):  # interleave valid and hostile code
        features.append(Feature(label, "abuse", src))
        if i < len(valid_names):
            features.append(Feature(valid_names[i], "valid", VALID[valid_names[i]]))
    assert len(RUNTIME_ABUSE) >= 14 and len(valid_names) <= len(RUNTIME_ABUSE)

    result = sandbox.evaluate(features, PROMPTS, INFOS)

    assert [f.label for f in result.kept] == valid_names
    reasons = {f.label: why for f, why in result.rejected}
    assert set(reasons) == {label for label, _, _ in RUNTIME_ABUSE}
    for label, _, expected in RUNTIME_ABUSE:
        assert expected in reasons[label], (label, reasons[label])
    assert result.matrix.dtype == np.float64 and result.matrix.shape == (len(PROMPTS), len(VALID))
    for j, feat in enumerate(result.kept):
        expected = _in_process_column(VALID[feat.label])
        np.testing.assert_array_equal(result.matrix[:, j], expected, err_msg=feat.label)
        assert feat.fn_name == check_feature_source(feat.python_src)
    assert result.kept[4].fn_name == "my_feature"  # helper defined first is not picked
    assert np.isnan(result.matrix[:, valid_names.index("helper_first")]).any()  # None → NaN


def test_worker_restart_after_timeout_and_crash() -> None:
    loop = Feature("loop", "", _src("while True:\n    pass"))
    # The CPU limit is swallowed by a bare except; the second timer tick ends the worker.
    swallow = Feature(
        "swallow",
        "",
        _src(
            """
            n = 0
            while n >= 0:
                try:
                    while True:
                        n += 1
                except:
                    n += 1
            """
        ),
    )
    ok = Feature("ok", "", VALID["n_digits"])
    with FeatureSandbox(n_workers=1, timeout_s=1.0, cpu_s=30.0, memory_mb=256) as sb:
        res = sb.evaluate([loop, ok], PROMPTS, INFOS)
        assert [f.label for f in res.kept] == ["ok"]
        assert res.rejected[0][1] == "wall-clock timeout 1s"
        assert sb.restarts == 1
    with FeatureSandbox(n_workers=1, timeout_s=20.0, cpu_s=0.5, memory_mb=256) as sb:
        res = sb.evaluate([swallow, ok, loop, ok], PROMPTS, INFOS)
        assert [f.label for f in res.kept] == ["ok", "ok"]
        assert [why for _, why in res.rejected] == ["CPU time limit 0.5s", "CPU time limit 0.5s"]
        np.testing.assert_array_equal(res.matrix[:, 0], _in_process_column(VALID["n_digits"]))
        np.testing.assert_array_equal(res.matrix[:, 0], res.matrix[:, 1])


# ---- OS-level limits ----------------------------------------------------------------------
def test_worker_limits_as_seen_by_feature_code(sandbox: FeatureSandbox) -> None:
    report = sandbox.probe_limits()
    assert report["RLIMIT_FSIZE"] == [0, 0]
    assert report["RLIMIT_CORE"] == [0, 0]
    assert 0 < report["RLIMIT_NOFILE"][0] <= 64
    assert report["RLIMIT_AS"][0] > 0 and report["RLIMIT_CPU"][0] > 0
    assert report["open_write"] == "OSError" and report["open_read"] == "OSError"
    assert report["socket"] == "PermissionError" and report["create_connection"] == "PermissionError"
    assert report["big_alloc"] == "MemoryError"
    assert report["recursion_limit"] <= 1000
    if os.getuid() == 0:
        assert report["uid"] != 0  # root drops privileges
    else:
        assert report["uid"] == os.getuid()  # nothing to drop: the worker keeps the caller's uid
    # the worker still talks over its pipe after the limits (large table, reply > pipe buffer)
    n = 20000
    length = Feature("len", "", _src("return len(prompt)"))
    res = sandbox.evaluate([length], ["x" * (i % 50) for i in range(n)], [{}] * n)
    np.testing.assert_array_equal(res.matrix[:, 0], [i % 50 for i in range(n)])


def test_process_limits_block_writes_files_and_sockets(tmp_path) -> None:
    held, fresh = tmp_path / "held.txt", tmp_path / "fresh.txt"
    code = textwrap.dedent(
        f"""
        import errno, os, socket, sys
        sys.path.insert(0, {REPO!r})
        from lib.features.sandbox import _apply_process_limits
        fd = os.open({str(held)!r}, os.O_WRONLY | os.O_CREAT)
        _apply_process_limits(drop_privileges=False)
        for name, attempt in (
            ("write", lambda: os.write(fd, b"x")),
            ("open", lambda: os.open({str(fresh)!r}, os.O_WRONLY | os.O_CREAT)),
            ("socket", lambda: socket.socket()),
        ):
            try:
                attempt()
                print(name, "allowed")
            except OSError as exc:
                print(name, errno.errorcode.get(exc.errno, type(exc).__name__))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["write EFBIG", "open EMFILE", "socket PermissionError"]
    assert held.stat().st_size == 0 and not fresh.exists()


# ---- semantics ----------------------------------------------------------------------------
def test_sanitising_row_errors_and_info_isolation(sandbox: FeatureSandbox) -> None:
    feats = [
        Feature("mixed", "", _src(
            """
            a = len(prompt)
            if a % 4 == 0:
                return True
            if a % 4 == 1:
                return float('inf')
            if a % 4 == 2:
                return 1e20
            return 'text'
            """
        )),
        Feature("late_error", "", _src("if prompt.startswith('3'):\n    return 1\nreturn 1 / 0")),
        Feature("mutator", "", _src("info['digits_a'].append(99)\ninfo['new'] = 1\ninfo.clear()\nreturn 1")),
        Feature("reader", "", _src("return len(info['digits_a']) + 10 * ('new' in info)")),
    ]
    prompts = ["3" * k for k in range(1, 13)] + ["9+9="] * 3
    infos = [{"digits_a": [1, 2]} for _ in prompts]
    res = sandbox.evaluate(feats * 2, prompts, infos, sanity_rows=5)
    assert [f.label for f in res.kept] == ["mixed", "late_error", "mutator", "reader"] * 2
    expect_mixed = [{0: 1.0, 1: math.nan, 2: 1e12, 3: math.nan}[len(p) % 4] for p in prompts]
    np.testing.assert_array_equal(res.matrix[:, 0], expect_mixed)
    np.testing.assert_array_equal(res.matrix[:, 1], [1.0] * 12 + [math.nan] * 3)
    assert res.row_errors[:2] == [0, 3]
    np.testing.assert_array_equal(res.matrix[:, 3], [2.0] * len(prompts))
    np.testing.assert_array_equal(res.matrix[:, 7], [2.0] * len(prompts))
    assert infos[0] == {"digits_a": [1, 2]}  # the caller's data is untouched


def test_deterministic_across_workers_and_runs() -> None:
    # set iteration order depends on the string hash seed: all workers must share one
    feats = [Feature(f"hash{i}", "", _src("return ''.join(set(prompt)).find('=')")) for i in range(6)]
    feats += [Feature(k, "", v) for k, v in VALID.items()]
    with FeatureSandbox(n_workers=2, cpu_s=2.0) as sb:
        a = sb.evaluate(feats, PROMPTS, INFOS)
        b = sb.evaluate(feats, PROMPTS, INFOS)
    with FeatureSandbox(n_workers=2, cpu_s=2.0) as sb:
        c = sb.evaluate(feats, PROMPTS, INFOS)
    assert [f.label for f in a.kept] == [f.label for f in feats]
    assert a.matrix.tobytes() == b.matrix.tobytes() == c.matrix.tobytes()
    assert len(np.unique(a.matrix[:, 0])) > 1  # really order-dependent
    for j in range(1, 6):
        np.testing.assert_array_equal(a.matrix[:, 0], a.matrix[:, j])


def test_input_validation(sandbox: FeatureSandbox) -> None:
    ok = [Feature("ok", "", _src("return 1"))]
    with pytest.raises(ValueError, match="prompts but"):
        sandbox.evaluate(ok, ["a", "b"], [{}])
    with pytest.raises(TypeError, match="plain Python data"):
        sandbox.evaluate(ok, ["a"], [{"x": np.float32(1)}])
    res = sandbox.evaluate([], ["a"], [{}])
    assert res.matrix.shape == (1, 0) and res.kept == [] and res.rejected == []
