"""How results are shown in reports: paper display names and row order, and markdown/LaTeX/CSV table writing.

Shared by the paper tables and scripts 8-11 so every report names tasks and models the same way
and writes tables the same way (atomic writes, `NA` for missing cells).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from lib.core.files_and_cache import atomic_write_text, write_csv_atomic

__all__ = [
    "TASK_DISPLAY",
    "MAIN_TASKS",
    "display_task",
    "display_model",
    "sort_key_task_model",
    "to_markdown",
    "to_latex",
    "write_table",
    "ratio_cell",
]

TASK_DISPLAY = {"arithmetic": "Arithmetic", "bon_jailbreaking": "Jailbreaking", "jailbreaking": "Jailbreaking",
                "hans_nli": "HANS NLI", "hans": "HANS NLI"}
_TASK_ORDER = ["arithmetic", "bon_jailbreaking", "jailbreaking", "hans_nli", "hans"]
MAIN_TASKS = ("arithmetic", "bon_jailbreaking", "jailbreaking")
_MODEL_DISPLAY = {"qwen/qwen2-7b-instruct": "Qwen2-7B", "eleutherai/gpt-j-6b": "GPT-J",
                  "qwen/qwen2-1.5b-instruct": "Qwen2-1.5B"}
_MODEL_ORDER = ["Qwen2-7B", "GPT-J", "Qwen2-1.5B"]


def display_task(task: str) -> str:
    return TASK_DISPLAY.get(task, task)


def display_model(model: str) -> str:
    return _MODEL_DISPLAY.get(model.lower(), model.rsplit("/", 1)[-1])


def sort_key_task_model(task: str, model: str) -> tuple:
    """Paper row order: Arithmetic, Jailbreaking, HANS × Qwen2-7B, GPT-J, Qwen2-1.5B, then others by name."""
    t = _TASK_ORDER.index(task) if task in _TASK_ORDER else len(_TASK_ORDER)
    d = display_model(model)
    m = _MODEL_ORDER.index(d) if d in _MODEL_ORDER else len(_MODEL_ORDER)
    return (t, task, m, model)


def _md_cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NA"
    return str(v).replace("|", "\\|")


_TEX_MAP = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
            "{": r"\{", "}": r"\}"}


def _tex_escape(v: Any) -> str:
    """LaTeX-safe cell text (special characters escaped, a few symbols to math)."""
    s = re.sub(r"[\\&%_#${}]", lambda m: _TEX_MAP[m.group()], _md_cell(v).replace("\\|", "|"))
    return s.replace("∩", r"$\cap$").replace("∪", r"$\cup$").replace("→", r"$\to$").replace("–", "--")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-style markdown table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def to_latex(df: pd.DataFrame, caption: str) -> str:
    """A booktabs tabular with a caption comment."""
    cols = [_tex_escape(c) for c in df.columns]
    out = [f"% {caption}", "\\begin{tabular}{" + "l" * max(1, len(cols)) + "}", "\\toprule",
           " & ".join(cols) + " \\\\", "\\midrule"]
    out += [" & ".join(_tex_escape(v) for v in row) + " \\\\" for row in df.itertuples(index=False)]
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def write_table(df: pd.DataFrame, out_dir: Path, name: str, caption: str) -> list[str]:
    """Write `<name>.csv/.md/.tex` atomically; returns the file names."""
    out_dir = Path(out_dir)
    write_csv_atomic(df, out_dir / f"{name}.csv")
    atomic_write_text(out_dir / f"{name}.md", f"<!-- {caption} -->\n" + to_markdown(df))
    atomic_write_text(out_dir / f"{name}.tex", to_latex(df, caption))
    return [f"{name}.csv", f"{name}.md", f"{name}.tex"]


def ratio_cell(num: int, den: int, digits: int = 1) -> str:
    """`num/den (p%)`, or `0/0 (NA)`."""
    if not den:
        return f"{int(num)}/{int(den)} (NA)"
    return f"{int(num)}/{int(den)} ({100.0 * num / den:.{digits}f}%)"
