"""Vectorised evaluation of rule expressions (objects or text) on a feature table: boolean row masks,
with float32 comparisons so a rule selects exactly the rows it was scored on. A module of its own
because it alone needs a table and keeps per-table state (`RuleEvaluator`'s column and atom caches).

Missing values follow IEEE comparisons: NaN makes ``<``, ``<=``, ``>``, ``>=``, ``==`` false and
``!=`` true (as pandas did for the original's text); ``NOT`` complements the final mask. Stage 2
imputes features, so NaN is rare.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from typing import Any, Mapping, Sequence, Union

import numpy as np
import pandas as pd

from lib.rules.expressions import And, Atom, Combo, Expr, Literal, Not, Or, Rule
from lib.rules.language import parse_with_special_names, special_names

__all__ = ["UnknownColumnError", "RuleEvaluator", "evaluate", "evaluate_many", "apply_rule_to_features", "Table"]


class UnknownColumnError(ValueError, LookupError):
    """A rule names a column the table does not have (message lists near matches)."""


Table = Union[pd.DataFrame, Mapping[str, Any]]

_COMPARE = {
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": np.not_equal,
}


class RuleEvaluator:
    """Evaluates rule objects/texts on one table, caching float32 columns and atom masks.

    Masks are boolean arrays over all rows. Atom masks are kept in an LRU cache bounded by
    `max_cache_bytes`, so thousands of rules that share atoms (paths of one tree ensemble)
    cost one comparison per distinct atom."""

    def __init__(self, table: Table, max_cache_bytes: int = 512 * 2**20) -> None:
        if isinstance(table, pd.DataFrame):
            if table.columns.has_duplicates:
                dups = sorted({str(c) for c in table.columns[table.columns.duplicated()]})
                raise ValueError(f"table has duplicate column names: {', '.join(dups)}")
            self._columns = {str(c): c for c in table.columns}
            self.n_rows = len(table)
        else:
            self._columns = {str(c): c for c in table.keys()}
            lengths = {len(np.asarray(v).reshape(-1)) for v in table.values()}
            if len(lengths) > 1:
                raise ValueError(f"table columns have different lengths: {sorted(lengths)}")
            self.n_rows = lengths.pop() if lengths else 0
        self._table = table
        self._float32: dict[str, np.ndarray] = {}
        self._atoms: OrderedDict[Atom, np.ndarray] = OrderedDict()
        self._texts: dict[str, Expr] = {}
        self._special: list[str] | None = None
        self._max_atoms = max(16, int(max_cache_bytes) // max(1, self.n_rows))

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def column(self, name: str) -> np.ndarray:
        """The column as float32 (XGBoost's arithmetic); NaN for missing values."""
        arr = self._float32.get(name)
        if arr is not None:
            return arr
        if name not in self._columns:
            near = difflib.get_close_matches(name, list(self._columns), n=5, cutoff=0.6)
            if near:
                hint = "close matches: " + ", ".join(repr(c) for c in near)
            else:
                some = list(self._columns)[:20]
                hint = "available columns: " + (", ".join(repr(c) for c in some) or "none")
                if len(self._columns) > 20:
                    hint += f", … ({len(self._columns)} in all)"
            raise UnknownColumnError(f"rule refers to unknown column {name!r}; {hint}")
        raw = self._table[self._columns[name]]
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                if isinstance(raw, pd.Series):
                    arr = raw.to_numpy(dtype=np.float32, na_value=np.nan)
                else:
                    arr = np.asarray(raw).reshape(-1)
                    if arr.dtype == object:
                        arr = pd.Series(arr).to_numpy(dtype=np.float32, na_value=np.nan)
                    else:
                        arr = arr.astype(np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"column {name!r} used in a rule is not numeric: {exc}") from None
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        arr.flags.writeable = False
        self._float32[name] = arr
        return arr

    def atom_mask(self, atom: Atom) -> np.ndarray:
        """Read-only mask of one atom: float32(column) op float32(threshold)."""
        mask = self._atoms.get(atom)
        if mask is not None:
            self._atoms.move_to_end(atom)
            return mask
        col = self.column(atom.feature)
        mask = _COMPARE[atom.op](col, np.float32(atom.threshold))
        mask.flags.writeable = False
        self._atoms[atom] = mask
        if len(self._atoms) > self._max_atoms:
            self._atoms.popitem(last=False)
        return mask

    def parse(self, text: str) -> Expr:
        """Parse with this table's column names known; parsed texts are cached."""
        expr = self._texts.get(text)
        if expr is None:
            if self._special is None:
                self._special = special_names(self._columns)
            expr = parse_with_special_names(text, self._special)
            self._texts[text] = expr
        return expr

    def _rule_mask(self, atoms: Sequence[Atom]) -> np.ndarray:
        if not atoms:
            return np.ones(self.n_rows, dtype=bool)
        out = self.atom_mask(atoms[0]).copy()
        for a in atoms[1:]:
            np.logical_and(out, self.atom_mask(a), out=out)
        return out

    def mask(self, expr: Expr | str) -> np.ndarray:
        """Fresh boolean mask (length n_rows) of an expression object or rule text."""
        if isinstance(expr, str):
            expr = self.parse(expr)
        if isinstance(expr, Atom):
            return self.atom_mask(expr).copy()
        if isinstance(expr, Rule):
            return self._rule_mask(expr.atoms)
        if isinstance(expr, Literal):
            m = self._rule_mask(expr.rule.atoms)
            return np.logical_not(m, out=m) if expr.negated else m
        if isinstance(expr, Combo):
            out = np.zeros(self.n_rows, dtype=bool)
            for lit in expr.literals:
                np.logical_or(out, self.mask(lit), out=out)
            return out
        if isinstance(expr, And):
            out = np.ones(self.n_rows, dtype=bool)
            for it in expr.items:
                np.logical_and(out, self.mask(it), out=out)
            return out
        if isinstance(expr, Or):
            out = np.zeros(self.n_rows, dtype=bool)
            for it in expr.items:
                np.logical_or(out, self.mask(it), out=out)
            return out
        if isinstance(expr, Not):
            m = self.mask(expr.item)
            return np.logical_not(m, out=m)
        raise TypeError(f"not a rule expression: {type(expr).__name__}")


def evaluate(expr: Expr | str, table: Table) -> np.ndarray:
    """Boolean mask over the table's rows of one expression object or rule text."""
    return RuleEvaluator(table).mask(expr)


def evaluate_many(exprs: Sequence[Expr | str], table: Table) -> np.ndarray:
    """Masks of many expressions as a bool matrix (n_rows, n_exprs); atoms are compared once."""
    ev = RuleEvaluator(table)
    out = np.empty((ev.n_rows, len(exprs)), dtype=bool)
    for j, expr in enumerate(exprs):
        out[:, j] = ev.mask(expr)
    return out


def apply_rule_to_features(rule_text: str, table: Table, direction: str = "positive") -> np.ndarray:
    """Boolean mask of the rows where `rule_text` holds; complemented unless `direction` is
    "positive" (case-insensitive). Raises RuleSyntaxError / UnknownColumnError on bad rules."""
    mask = evaluate(rule_text, table)
    if str(direction).strip().lower() != "positive":
        np.logical_not(mask, out=mask)
    return mask
