"""The text form of the rule language of stages 3–7: writing rule objects (`lib.rules.expressions`)
as exact text, and parsing text — ours and the original's — back into them.

A module of its own because the grammar below, its writer and its parser change together, and only
they depend on it.
Evaluating rules on a table is `lib.rules.evaluation`; reading rule files is `lib.rules.rule_files`.

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
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from lib.rules.expressions import And, Atom, Combo, Expr, Literal, Not, Or, Rule, _as_float32_value

__all__ = [
    "RuleSyntaxError",
    "format_threshold",
    "format_feature",
    "format_expression",
    "parse_expression",
    "parse_rule",
    "parse_literal",
    "iter_atoms",
    "special_names",
    "parse_with_special_names",
]

_FLIPPED = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "==": "==", "!=": "!="}
_KEYWORDS = frozenset({"and", "or", "not", "true", "false"})
_INF_WORDS = frozenset({"inf", "infinity"})
_RESERVED_WORDS = _KEYWORDS | _INF_WORDS | {"nan"}  # names that need backticks
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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


def special_names(columns: Iterable[Any] | None) -> list[str]:
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
    return parse_with_special_names(text, special_names(columns))


def parse_with_special_names(text: str, special_names: Sequence[str]) -> Expr:
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
