"""The `Feature` record (a named Python function of `(prompt, info)`) and trusted compilation.

Seed features shipped with a task are trusted code and are compiled in-process here.
Features proposed by a feature LLM are untrusted and must go through the stage-2 sandbox.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

__all__ = ["Feature", "FEATURE_BUILTINS", "compile_trusted_feature", "sanitize_score"]

# Builtins a feature function may use (the spec's list plus bool/isinstance, see DEVIATIONS).
FEATURE_BUILTINS: dict[str, Any] = {
    name: __builtins__[name] if isinstance(__builtins__, dict) else getattr(__builtins__, name)
    for name in (
        "abs", "min", "max", "sum", "len", "all", "any", "round", "sorted", "set", "list",
        "tuple", "dict", "int", "float", "str", "range", "enumerate", "zip", "bool",
        "isinstance", "reversed", "map", "filter",
    )
}


@dataclass
class Feature:
    """One interpretable prompt feature; `label` becomes the (sanitised) column name."""

    label: str
    description: str
    python_src: str
    fn_name: str = ""
    origin: str = "llm"
    _fn: Callable[[str, dict], Any] | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, str]:
        d = asdict(self)
        d.pop("_fn")
        return d

    def compiled(self) -> Callable[[str, dict], Any]:
        """The callable for trusted (seed) features, compiled once."""
        if self._fn is None:
            self.fn_name, self._fn = compile_trusted_feature(self.python_src)
        return self._fn

    def __call__(self, prompt: str, info: dict) -> float | None:
        return sanitize_score(self.compiled()(prompt, info))


def _feature_function_name(src: str) -> str:
    """Name of the top-level function whose first two parameters are `prompt`, `info`."""
    tree = ast.parse(src)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            params = [a.arg for a in node.args.args]
            if params[:2] == ["prompt", "info"]:
                return node.name
    raise ValueError("no top-level function with parameters (prompt, info)")


def compile_trusted_feature(src: str) -> tuple[str, Callable[[str, dict], Any]]:
    """Exec trusted source with the feature builtins, math and re; return (fn_name, fn)."""
    name = _feature_function_name(src)
    namespace: dict[str, Any] = {"__builtins__": dict(FEATURE_BUILTINS), "math": math, "re": re}
    exec(compile(src, f"<feature {name}>", "exec"), namespace)
    return name, namespace[name]


def sanitize_score(value: Any) -> float | None:
    """Map a feature's return value to a finite float or None (bool → 0/1, clip at ±1e12)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    try:
        import numpy as np

        if isinstance(value, np.generic):
            value = value.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        return None
    x = float(value)
    if not math.isfinite(x):
        return None
    return max(-1e12, min(1e12, x))
