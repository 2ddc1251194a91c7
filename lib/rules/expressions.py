"""The data types of the rule language of stages 3–7: `Atom` (one comparison), `Rule` (a conjunction of
atoms), `Literal` (a rule or its negation), `Combo` (a disjunction of literals), the general `And` /
`Or` / `Not` trees that parsed text may give, and the comparison operators `OPS`.

They live apart from the text syntax (`lib.rules.language`) and from evaluation
(`lib.rules.evaluation`) so that code which builds, compares or walks rules needs neither. Every type
is a frozen dataclass, so equal rules are equal values (usable as dict keys and cache keys). An atom
keeps its threshold as the float32 value XGBoost compares with, and each type's `str()` is its exact
rule text (written by `lib.rules.language.format_expression`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np

__all__ = ["OPS", "Atom", "Rule", "Literal", "Combo", "And", "Or", "Not", "Expr"]

OPS: tuple[str, ...] = ("<", ">=", "<=", ">", "==", "!=")
_UPPER_OPS = ("<", "<=")
_LOWER_OPS = (">", ">=")
# Canonical order inside a feature: lower bounds, upper bounds, equalities.
_OP_ORDER = {">": 0, ">=": 1, "<": 2, "<=": 3, "==": 4, "!=": 5}


def _as_float32_value(value: float) -> float:
    """The float32 value nearest to `value`, as a Python float (-0.0 becomes 0.0); also used by the writer."""
    if -3.4e38 < value < 3.4e38:  # common case: no overflow warning possible
        v = float(np.float32(value))
    else:
        with np.errstate(over="ignore"):
            v = float(np.float32(value))
    if math.isnan(v):
        raise ValueError("a rule threshold must not be NaN")
    return v + 0.0



@dataclass(frozen=True)
class Atom:
    """One comparison `feature op threshold`; the threshold is stored as its float32 value."""

    feature: str
    op: str
    threshold: float

    def __post_init__(self) -> None:
        if not isinstance(self.feature, str) or not self.feature:
            raise ValueError(f"an atom needs a non-empty feature name, got {self.feature!r}")
        if self.op not in OPS:
            raise ValueError(f"unknown comparison operator {self.op!r}; expected one of {', '.join(OPS)}")
        object.__setattr__(self, "threshold", _as_float32_value(self.threshold))

    @classmethod
    def from_split(cls, feature: str, threshold: float, goes_left: bool) -> "Atom":
        """Condition of one XGBoost branch: "yes"/left is `x < t`, "no"/right is `x >= t`."""
        return cls(feature, "<" if goes_left else ">=", threshold)

    def __str__(self) -> str:
        return _text(self)


@dataclass(frozen=True)
class Rule:
    """Conjunction of atoms in the given order; the empty rule is TRUE."""

    atoms: tuple[Atom, ...] = ()

    def __post_init__(self) -> None:
        atoms = tuple(self.atoms)
        for a in atoms:
            if not isinstance(a, Atom):
                raise TypeError(f"Rule atoms must be Atom objects, got {type(a).__name__}")
        object.__setattr__(self, "atoms", atoms)

    def canonical(self) -> "Rule":
        """Same rows, standard form: per feature the tightest lower and upper bound (`x < 3 & x < 5`
        → `x < 3`), duplicates dropped, sorted by feature, then op (>, >=, <, <=, ==, !=), then threshold."""
        lower: dict[str, Atom] = {}
        upper: dict[str, Atom] = {}
        others: set[Atom] = set()
        for a in self.atoms:
            if a.op in _UPPER_OPS:
                cur = upper.get(a.feature)
                # smaller threshold is tighter; at equal thresholds `<` is tighter than `<=`
                if cur is None or (a.threshold, a.op != "<") < (cur.threshold, cur.op != "<"):
                    upper[a.feature] = a
            elif a.op in _LOWER_OPS:
                cur = lower.get(a.feature)
                # larger threshold is tighter; at equal thresholds `>` is tighter than `>=`
                if cur is None or (a.threshold, a.op == ">") > (cur.threshold, cur.op == ">"):
                    lower[a.feature] = a
            else:
                others.add(a)
        kept = list(lower.values()) + list(upper.values()) + list(others)
        kept.sort(key=lambda a: (a.feature, _OP_ORDER[a.op], a.threshold))
        return Rule(tuple(kept))

    def __str__(self) -> str:
        return _text(self)


@dataclass(frozen=True)
class Literal:
    """A rule or its negation (`NOT(rule)`): the unit the OR-combo selector works with."""

    rule: Rule
    negated: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rule, Rule):
            raise TypeError(f"Literal.rule must be a Rule, got {type(self.rule).__name__}")
        object.__setattr__(self, "negated", bool(self.negated))

    def __str__(self) -> str:
        return _text(self)


@dataclass(frozen=True)
class Combo:
    """Disjunction of literals; the empty combo is FALSE."""

    literals: tuple[Literal, ...] = ()

    def __post_init__(self) -> None:
        lits = tuple(self.literals)
        for lit in lits:
            if not isinstance(lit, Literal):
                raise TypeError(f"Combo literals must be Literal objects, got {type(lit).__name__}")
        object.__setattr__(self, "literals", lits)

    def __str__(self) -> str:
        return _text(self)


@dataclass(frozen=True)
class And:
    """General conjunction (for parsed text that is not rule/literal/combo shaped); () is TRUE."""

    items: tuple["Expr", ...] = ()

    def __str__(self) -> str:
        return _text(self)


@dataclass(frozen=True)
class Or:
    """General disjunction; () is FALSE."""

    items: tuple["Expr", ...] = ()

    def __str__(self) -> str:
        return _text(self)


@dataclass(frozen=True)
class Not:
    """General negation (complement of the mask)."""

    item: "Expr"

    def __str__(self) -> str:
        return _text(self)


Expr = Union[Atom, Rule, Literal, Combo, And, Or, Not]


def _text(expr: Expr) -> str:
    """Rule text of an expression; the writer is imported on use because `lib.rules.language` is built
    on these types."""
    from lib.rules.language import format_expression

    return format_expression(expr)
