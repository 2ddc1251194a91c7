"""The one rule language of stages 3–7: data model, exact text form, parser, vectorised evaluation,
and the rule-file loaders that stages 4–7 use.

Rules come from XGBoost paths. XGBoost sends a row to the "yes" child when
``float32(value) < float32(split_condition)``, so an atom built from a split is ``x < t`` (yes)
or ``x >= t`` (no), its threshold is kept as the float32 value XGBoost used, its text carries
that value at full precision, and evaluation compares in float32. Re-applying a rule's text
therefore selects exactly the rows the rule was scored on (the original truncated thresholds
to two decimals and wrote ``<=``/``>``, which does not).

Grammar of the text we write (``parse_expression`` reads it back exactly)::

    atom    := feature " " op " " number          op ∈ <  >=  <=  >  ==  !=
    rule    := atom (" & " atom)*  |  "TRUE"         conjunction; TRUE = no atom
    literal := rule  |  "NOT(" rule ")"
    combo   := "(" literal ")" (" OR " "(" literal ")")*  |  "FALSE"
    feature := identifier [A-Za-z_][A-Za-z0-9_]* (not a keyword), else `backticked` (`` = `)
    number  := shortest decimal that parses back to the same float32: positional for
               1e-4 <= |t| < 1e8 ("0.7", "-2.5", "3" — integers without ".0"), scientific
               otherwise ("1e-07", "1.5e+20"); "inf" / "-inf" for infinities

The parser also reads everything the original wrote and more: ``AND``/``OR``/``NOT`` in any
case, ``&``, ``|``, ``~``, nested parentheses, ``TRUE``/``FALSE``, truncated decimals, ``+``/``-``
signs, exponents, ``number op feature``, a bare feature (meaning ``feature != 0``), backticked
names, and (given the table's columns) unquoted column names containing spaces or symbols.
Precedence: NOT binds tightest, then AND, then OR. No ``eval``/``DataFrame.query`` is used.

Missing values follow IEEE comparisons: NaN makes ``<``, ``<=``, ``>``, ``>=``, ``==`` false and
``!=`` true (as pandas did for the original's text); ``NOT`` complements the final mask. Stage 2
imputes features, so NaN is rare.
"""

from __future__ import annotations

import difflib
import functools
import glob
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence, Union

import numpy as np
import pandas as pd

from lib.core.files_and_cache import ArtifactError

__all__ = [
    "OPS",
    "Atom",
    "Rule",
    "Literal",
    "Combo",
    "And",
    "Or",
    "Not",
    "Expr",
    "RuleSyntaxError",
    "UnknownColumnError",
    "format_threshold",
    "format_feature",
    "format_expression",
    "parse_expression",
    "parse_rule",
    "parse_literal",
    "iter_atoms",
    "RuleEvaluator",
    "evaluate",
    "evaluate_many",
    "find_rule_files",
    "load_rules",
    "apply_rule_to_features",
    "detect_prompt_col",
    "guess_filetype",
    "RULE_TEXT_COLUMNS",
    "PROMPT_COLUMNS",
]

OPS: tuple[str, ...] = ("<", ">=", "<=", ">", "==", "!=")
_UPPER_OPS = ("<", "<=")
_LOWER_OPS = (">", ">=")
# Canonical order inside a feature: lower bounds, upper bounds, equalities.
_OP_ORDER = {">": 0, ">=": 1, "<": 2, "<=": 3, "==": 4, "!=": 5}
_FLIPPED = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "==": "==", "!=": "!="}
_KEYWORDS = frozenset({"and", "or", "not", "true", "false"})
_INF_WORDS = frozenset({"inf", "infinity"})
_RESERVED_WORDS = _KEYWORDS | _INF_WORDS | {"nan"}  # names that need backticks
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _as_float32_value(value: float) -> float:
    """The float32 value nearest to `value`, as a Python float (-0.0 becomes 0.0)."""
    if -3.4e38 < value < 3.4e38:  # common case: no overflow warning possible
        v = float(np.float32(value))
    else:
        with np.errstate(over="ignore"):
            v = float(np.float32(value))
    if math.isnan(v):
        raise ValueError("a rule threshold must not be NaN")
    return v + 0.0


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


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
        return format_expression(self)


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
        return format_expression(self)


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
        return format_expression(self)


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
        return format_expression(self)


@dataclass(frozen=True)
class And:
    """General conjunction (for parsed text that is not rule/literal/combo shaped); () is TRUE."""

    items: tuple["Expr", ...] = ()

    def __str__(self) -> str:
        return format_expression(self)


@dataclass(frozen=True)
class Or:
    """General disjunction; () is FALSE."""

    items: tuple["Expr", ...] = ()

    def __str__(self) -> str:
        return format_expression(self)


@dataclass(frozen=True)
class Not:
    """General negation (complement of the mask)."""

    item: "Expr"

    def __str__(self) -> str:
        return format_expression(self)


Expr = Union[Atom, Rule, Literal, Combo, And, Or, Not]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def format_threshold(value: float) -> str:
    """Shortest decimal text that parses back to the same float32 (see the module grammar)."""
    return _format_float32(_as_float32_value(value))


@functools.lru_cache(maxsize=1 << 16)
def _format_float32(value: float) -> str:
    v = np.float32(value)
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if 1e-4 <= abs(float(v)) < 1e8:
        return np.format_float_positional(v, unique=True, trim="-")
    return np.format_float_scientific(v, unique=True, trim="-")


def format_feature(name: str) -> str:
    """`name` as written in rule text: bare if a plain identifier, else in backticks."""
    if _PLAIN_NAME.match(name) and name.lower() not in _RESERVED_WORDS:
        return name
    return "`" + name.replace("`", "``") + "`"


def _fmt_rule(rule: Rule) -> str:
    if not rule.atoms:
        return "TRUE"
    return " & ".join(format_expression(a) for a in rule.atoms)


def _fmt_literal(lit: Literal) -> str:
    body = _fmt_rule(lit.rule)
    return f"NOT({body})" if lit.negated else body


def format_expression(expr: Expr) -> str:
    """Text of any rule object (Atom, Rule, Literal, Combo or a general And/Or/Not tree)."""
    if isinstance(expr, Atom):
        return f"{format_feature(expr.feature)} {expr.op} {format_threshold(expr.threshold)}"
    if isinstance(expr, Rule):
        return _fmt_rule(expr)
    if isinstance(expr, Literal):
        return _fmt_literal(expr)
    if isinstance(expr, Combo):
        if not expr.literals:
            return "FALSE"
        return " OR ".join(f"({_fmt_literal(lit)})" for lit in expr.literals)
    if isinstance(expr, And):
        if not expr.items:
            return "TRUE"
        parts = []
        for item in expr.items:
            text = format_expression(item)
            parts.append(f"({text})" if isinstance(item, (Or, Combo)) and text != "FALSE" else text)
        return " & ".join(parts)
    if isinstance(expr, Or):
        if not expr.items:
            return "FALSE"
        return " OR ".join(f"({format_expression(item)})" for item in expr.items)
    if isinstance(expr, Not):
        return f"NOT({format_expression(expr.item)})"
    raise TypeError(f"not a rule expression: {type(expr).__name__}")


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


class RuleSyntaxError(ValueError):
    """Rule text that does not parse; carries the text and the 0-based character position."""

    def __init__(self, message: str, text: str, position: int) -> None:
        self.message = message
        self.text = text
        self.position = position
        super().__init__(f"{message} at position {position} in rule text {text!r}\n    {text}\n    {' ' * position}^")


_NUMBER_RE = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_DIGIT_NAME_RE = re.compile(r"[0-9][A-Za-z0-9_]*")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_]")


_TOKEN_RE = re.compile(
    r"""\s*(?:
      (?P<NUM>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<WORD>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<OP><=|>=|==|!=|<|>)
    | (?P<AND>&&?) | (?P<OR>\|\|?) | (?P<NOT>~) | (?P<SIGN>[+-])
    | (?P<LP>\() | (?P<RP>\)) | (?P<BT>`)
    )""",
    re.VERBOSE,
)
_WORD_KINDS = {"and": "AND", "or": "OR", "not": "NOT", "true": "TRUE", "false": "FALSE"}


class _Tok(NamedTuple):
    kind: str  # NAME NUM OP LP RP AND OR NOT TRUE FALSE SIGN END
    value: Any
    pos: int
    quoted: bool = False


def _backticked(text: str, i: int) -> tuple[str, int]:
    """Name inside backticks starting at text[i] == '`' (a doubled `` is a literal backtick)."""
    j, buf = i + 1, []
    while True:
        k = text.find("`", j)
        if k < 0:
            raise RuleSyntaxError("unterminated backticked name", text, i)
        buf.append(text[j:k])
        if text.startswith("``", k):
            buf.append("`")
            j = k + 2
            continue
        name = "".join(buf)
        if not name:
            raise RuleSyntaxError("empty backticked name", text, i)
        return name, k + 1


def _tokenize(text: str, special_names: Sequence[str]) -> list[_Tok]:
    """Split rule text into tokens; `special_names` are column names matched verbatim first."""
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while True:
        if special_names:
            while i < n and text[i].isspace():
                i += 1
            hit = None
            for name in special_names:
                end = i + len(name)
                if text.startswith(name, i) and not (
                    _IDENT_CHAR.match(name[-1]) and end < n and _IDENT_CHAR.match(text[end])
                ):
                    hit = name
                    break
            if hit is not None:
                toks.append(_Tok("NAME", hit, i, quoted=True))
                i += len(hit)
                continue
        m = _TOKEN_RE.match(text, i)
        kind = m.lastgroup if m is not None else None
        if kind is None:
            j = i
            while j < n and text[j].isspace():
                j += 1
            if j >= n:
                break
            raise RuleSyntaxError(f"unexpected character {text[j]!r}", text, j)
        value, start, end = m.group(kind), m.start(kind), m.end()
        if kind == "NUM" and end < n and _IDENT_CHAR.match(text[end]):
            # a name that starts with a digit (stage 2 allows e.g. `3_digit_sum`)
            dm = _DIGIT_NAME_RE.match(text, start)
            if dm is None or dm.end() < end:
                raise RuleSyntaxError("malformed number", text, start)
            toks.append(_Tok("NAME", dm.group(), start))
            i = dm.end()
            continue
        if kind == "WORD":
            kind = _WORD_KINDS.get(value.lower(), "NAME")
        elif kind == "BT":
            name, end = _backticked(text, start)
            toks.append(_Tok("NAME", name, start, quoted=True))
            i = end
            continue
        toks.append(_Tok(kind, value, start))
        i = end
    toks.append(_Tok("END", None, n))
    return toks


class _Parser:
    """Recursive descent over tokens: or_expr := and_expr (OR and_expr)*; and_expr := not_expr
    (AND not_expr)*; not_expr := NOT not_expr | primary; primary := ( or_expr ) | TRUE | FALSE | comparison."""

    def __init__(self, text: str, special_names: Sequence[str]) -> None:
        self.text = text
        self.toks = _tokenize(text, special_names)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, message: str, tok: _Tok | None = None) -> RuleSyntaxError:
        tok = tok or self.peek()
        return RuleSyntaxError(message, self.text, tok.pos)

    def parse(self) -> Expr:
        if self.peek().kind == "END":
            raise self.fail("empty rule text")
        node = self.or_expr()
        if self.peek().kind != "END":
            raise self.fail(f"unexpected {self.peek().value!r}")
        return node

    def or_expr(self) -> Expr:
        items = [self.and_expr()]
        while self.peek().kind == "OR":
            self.take()
            items.append(self.and_expr())
        if len(items) == 1:
            return items[0]
        flat: list[Expr] = []
        for it in items:
            flat.extend(it.items if isinstance(it, Or) else (it,))
        return Or(tuple(flat))

    def and_expr(self) -> Expr:
        items = [self.not_expr()]
        while self.peek().kind == "AND":
            self.take()
            items.append(self.not_expr())
        if len(items) == 1:
            return items[0]
        flat: list[Expr] = []
        for it in items:
            flat.extend(it.items if isinstance(it, And) else (it,))
        return And(tuple(flat))

    def not_expr(self) -> Expr:
        if self.peek().kind == "NOT":
            self.take()
            return Not(self.not_expr())
        return self.primary()

    def primary(self) -> Expr:
        tok = self.peek()
        if tok.kind == "LP":
            self.take()
            if self.peek().kind == "RP":
                raise self.fail("empty parentheses")
            node = self.or_expr()
            if self.peek().kind != "RP":
                raise self.fail("expected ')'" if self.peek().kind != "END" else "missing ')'")
            self.take()
            return node
        if tok.kind == "TRUE":
            self.take()
            return And(())
        if tok.kind == "FALSE":
            self.take()
            return Or(())
        if tok.kind == "NAME" and not self._is_inf_word(tok):
            self.take()
            if self.peek().kind != "OP":
                return Atom(tok.value, "!=", 0.0)  # bare (boolean) feature: truthy
            op = self.take().value
            return Atom(tok.value, op, self.number())
        if tok.kind in ("NUM", "SIGN") or (tok.kind == "NAME" and self._is_inf_word(tok)):
            value = self.number()
            if self.peek().kind != "OP":
                raise self.fail("expected a comparison operator after the number")
            op = self.take().value
            name = self.take()
            if name.kind != "NAME":
                raise self.fail("expected a feature name", name)
            return Atom(name.value, _FLIPPED[op], value)
        if tok.kind == "END":
            raise self.fail("unexpected end of rule text")
        raise self.fail(f"unexpected {tok.value!r}")

    @staticmethod
    def _is_inf_word(tok: _Tok) -> bool:
        return not tok.quoted and str(tok.value).lower() in _INF_WORDS

    def number(self) -> float:
        sign = 1.0
        while self.peek().kind == "SIGN":
            if self.take().value == "-":
                sign = -sign
        tok = self.take()
        if tok.kind == "NUM":
            value = float(tok.value)
        elif tok.kind == "NAME" and self._is_inf_word(tok):
            value = math.inf
        elif tok.kind == "NAME" and not tok.quoted and str(tok.value).lower() == "nan":
            raise self.fail("a threshold must not be NaN", tok)
        else:
            raise self.fail("expected a number", tok)
        return sign * value


def _rule_of(node: Expr) -> Rule | None:
    if isinstance(node, Atom):
        return Rule((node,))
    if isinstance(node, And) and all(isinstance(it, Atom) for it in node.items):
        return Rule(tuple(node.items))  # type: ignore[arg-type]
    return None


def _literal_of(node: Expr) -> Literal | None:
    if isinstance(node, Not):
        rule = _rule_of(node.item)
        return None if rule is None else Literal(rule, True)
    rule = _rule_of(node)
    return None if rule is None else Literal(rule, False)


def _as_combo(node: Expr) -> Combo | None:
    items = node.items if isinstance(node, Or) else (node,)
    lits = [_literal_of(it) for it in items]
    if any(lit is None for lit in lits):
        return None
    return Combo(tuple(lits))  # type: ignore[arg-type]


def _special_names(columns: Iterable[Any] | None) -> list[str]:
    """Column names the generic lexer would split (spaces, symbols), longest first."""
    if columns is None:
        return []
    out = []
    for c in columns:
        s = str(c)
        if not s or _PLAIN_NAME.match(s) or _DIGIT_NAME_RE.fullmatch(s) or _NUMBER_RE.fullmatch(s):
            continue
        if "`" in s or s.strip() != s or s[0] in "()&|~<>=!+-" or not re.search(r"[A-Za-z0-9_]", s):
            continue  # names starting with syntax characters must be backticked
        out.append(s)
    return sorted(set(out), key=len, reverse=True)


def parse_expression(text: str, columns: Iterable[Any] | None = None) -> Expr:
    """Parse rule text. Rule/literal/combo-shaped text (every original and every text we write)
    gives a `Combo`; anything else a general And/Or/Not/Atom tree. `columns` (optional) lets
    unquoted column names with spaces or symbols be read as names."""
    return _parse(text, _special_names(columns))


def _parse(text: str, special_names: Sequence[str]) -> Expr:
    if not isinstance(text, str):
        raise TypeError(f"rule text must be a string, got {type(text).__name__}")
    node = _Parser(text, special_names).parse()
    combo = _as_combo(node)
    return node if combo is None else combo


def parse_literal(text: str, columns: Iterable[Any] | None = None) -> Literal:
    """Parse text that is a single rule or `NOT(rule)`; RuleSyntaxError otherwise."""
    expr = parse_expression(text, columns)
    if not (isinstance(expr, Combo) and len(expr.literals) == 1):
        raise RuleSyntaxError("expected a single rule or NOT(rule)", text, 0)
    return expr.literals[0]


def parse_rule(text: str, columns: Iterable[Any] | None = None) -> Rule:
    """Parse text that is a conjunction of atoms (or TRUE); RuleSyntaxError otherwise."""
    lit = parse_literal(text, columns)
    if lit.negated:
        raise RuleSyntaxError("expected a conjunction of atoms, got a negation", text, 0)
    return lit.rule


def iter_atoms(expr: Expr) -> Iterator[Atom]:
    """All atoms of an expression, in text order (with repeats), e.g. to count them."""
    if isinstance(expr, Atom):
        yield expr
    elif isinstance(expr, Rule):
        yield from expr.atoms
    elif isinstance(expr, Literal):
        yield from expr.rule.atoms
    elif isinstance(expr, Combo):
        for lit in expr.literals:
            yield from lit.rule.atoms
    elif isinstance(expr, (And, Or)):
        for it in expr.items:
            yield from iter_atoms(it)
    elif isinstance(expr, Not):
        yield from iter_atoms(expr.item)
    else:
        raise TypeError(f"not a rule expression: {type(expr).__name__}")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


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
                self._special = _special_names(self._columns)
            expr = _parse(text, self._special)
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


# --------------------------------------------------------------------------------------------
# Rule files (the original loader API, without pandas.query)
# --------------------------------------------------------------------------------------------

RULE_TEXT_COLUMNS: tuple[str, ...] = ("string_rule", "rule_string", "expr", "rule_expression", "expression")
PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "input", "text", "question", "query")


def find_rule_files(directory: str | Path, prefix: str) -> list[tuple[str, Path]]:
    """(target_name, path) for every `<prefix>_*.csv` in `directory`, sorted by file name.

    The target name is what follows `<prefix>_`, so `optimal_rule_set` also yields the pseudo
    targets `test_selected_<t>` and `all_fit_<t>`; callers keep the exact target they want.
    A missing folder gives an empty list (as the original's glob did)."""
    d = Path(directory)
    pattern = str(d / (glob.escape(prefix) + "_*.csv"))
    out = []
    for p in sorted(glob.glob(pattern), key=lambda s: Path(s).name):
        name = Path(p).name
        out.append((name[len(prefix) + 1 : -len(".csv")], Path(p)))
    return out


def guess_filetype(path: str | Path) -> str:
    """'csv', 'tsv', 'json', 'jsonl', 'parquet' or 'pickle' from the extension; unknown
    extensions are sniffed ('json' if the file starts with '{' or '[', else 'csv')."""
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".gz", ".bz2", ".xz", ".zip") and len(suffixes) > 1:
        ext = suffixes[-2]
    by_ext = {
        ".csv": "csv",
        ".tsv": "tsv",
        ".tab": "tsv",
        ".json": "json",
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
        ".parquet": "parquet",
        ".pq": "parquet",
        ".pkl": "pickle",
        ".pickle": "pickle",
    }
    if ext in by_ext:
        return by_ext[ext]
    try:
        with open(p, "rb") as fh:
            head = fh.read(256).lstrip()
    except OSError:
        return "csv"
    return "json" if head[:1] in (b"{", b"[") else "csv"


def _read_rule_table(p: Path) -> pd.DataFrame:
    kind = guess_filetype(p)
    try:
        if kind == "csv":
            return pd.read_csv(p)
        if kind == "tsv":
            return pd.read_csv(p, sep="\t")
        if kind == "jsonl":
            return pd.read_json(p, lines=True)
        if kind == "json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "rules" in data:
                data = data["rules"]
            if isinstance(data, list):
                if all(isinstance(x, str) for x in data):
                    return pd.DataFrame({"rule": data})
                if all(isinstance(x, dict) for x in data):
                    return pd.DataFrame.from_records(data)
                raise ArtifactError(f"rules file '{p}': 'rules' must be a list of strings or objects")
            if isinstance(data, dict):
                return pd.DataFrame(data)
            raise ArtifactError(f"rules file '{p}' holds {type(data).__name__}, not rules")
        if kind == "parquet":
            return pd.read_parquet(p)
        return pd.read_pickle(p)
    except ArtifactError:
        raise
    except pd.errors.EmptyDataError:
        raise ArtifactError(f"rules file '{p}' is empty (not even a header)") from None
    except (ValueError, OSError, json.JSONDecodeError, pd.errors.ParserError) as exc:
        raise ArtifactError(f"cannot read rules file '{p}': {exc}") from None


def load_rules(path: str | Path) -> pd.DataFrame:
    """Rules of a CSV/JSON file as columns `rule_id`, `rule`, `coefficient_sign`, `component_type`.

    Rule text comes from `rule`, else the first of `RULE_TEXT_COLUMNS` (then every row is a
    positive rule). Missing `rule_id` → row position 0..k−1; missing sign/type → positive/rule.
    A header-only file gives zero rows (an empty selection)."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"rules file '{p}' does not exist")
    df = _read_rule_table(p)
    out = pd.DataFrame(index=range(len(df)))
    if "rule" in df.columns:
        out["rule"] = df["rule"].to_numpy()
        sign = df["coefficient_sign"].to_numpy() if "coefficient_sign" in df.columns else "positive"
        ctype = df["component_type"].to_numpy() if "component_type" in df.columns else "rule"
    else:
        src = next((c for c in RULE_TEXT_COLUMNS if c in df.columns), None)
        if src is None:
            raise ArtifactError(
                f"rules file '{p}' has no rule column (looked for 'rule', "
                f"{', '.join(repr(c) for c in RULE_TEXT_COLUMNS)}); it has: "
                f"{', '.join(repr(str(c)) for c in df.columns) or 'no columns'}"
            )
        out["rule"] = df[src].to_numpy()
        sign, ctype = "positive", "rule"
    bad = [i for i, r in enumerate(out["rule"]) if not isinstance(r, str) or not r.strip()]
    if bad:
        raise ArtifactError(f"rules file '{p}': empty rule text in row(s) {', '.join(map(str, bad[:10]))}")
    out["rule_id"] = df["rule_id"].to_numpy() if "rule_id" in df.columns else np.arange(len(df))
    out["coefficient_sign"] = sign
    out["component_type"] = ctype
    return out[["rule_id", "rule", "coefficient_sign", "component_type"]]


def apply_rule_to_features(rule_text: str, table: Table, direction: str = "positive") -> np.ndarray:
    """Boolean mask of the rows where `rule_text` holds; complemented unless `direction` is
    "positive" (case-insensitive). Raises RuleSyntaxError / UnknownColumnError on bad rules."""
    mask = evaluate(rule_text, table)
    if str(direction).strip().lower() != "positive":
        np.logical_not(mask, out=mask)
    return mask


def detect_prompt_col(df: pd.DataFrame) -> str | None:
    """The first of prompt/input/text/question/query present (exact name, then any case)."""
    cols = [str(c) for c in df.columns]
    for name in PROMPT_COLUMNS:
        if name in cols:
            return name
    lower = {c.lower(): c for c in reversed(cols)}
    for name in PROMPT_COLUMNS:
        if name in lower:
            return lower[name]
    return None
