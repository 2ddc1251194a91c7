"""The 86 seed features of the arithmetic task (spec 2.5), as trusted `Feature` source text.

Every feature is a self-contained `def <name>(prompt, info):` that reads only `info` (the parse
of the prompt's query, see `parse_arithmetic_prompt`) and may use `math`; it returns 1.0/0.0, or
None where the feature is undefined. Labels are exact: they become column names downstream.
All features return None for a prompt whose query did not parse (operator/operands None).
"""

from __future__ import annotations

from string import Template

from lib.features.feature import Feature

__all__ = [
    "make_closed_bins",
    "build_seed_features",
    "seed_feature_labels",
    "RESULT_BINS",
    "OPERAND_BINS",
    "QUOTIENT_BINS",
]

# (start, stop, step) of the closed, edge-sharing bins of the range seeds (spec 2.5 items 12–14).
RESULT_BINS = (0, 300, 25)
OPERAND_BINS = (0, 300, 25)
QUOTIENT_BINS = (0, 30, 3)


def make_closed_bins(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    """Closed bins [lo, lo+step] from start to stop; neighbours share an edge (25 is in two bins)."""
    if step <= 0:
        raise ValueError(f"make_closed_bins: step must be > 0, got {step}")
    if stop <= start:
        raise ValueError(f"make_closed_bins: stop ({stop}) must exceed start ({start})")
    bins: list[tuple[int, int]] = []
    lo = start
    while lo < stop:
        bins.append((lo, min(lo + step, stop)))
        lo += step
    return bins


def _num_text(x: int | float) -> str:
    """A bin edge as written in labels and source (integral values without a decimal point)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _name_part(x: int | float) -> str:
    """A bin edge as part of a Python identifier (`-` → `m`, `.` → `p`)."""
    return _num_text(x).replace("-", "m").replace(".", "p")


# Resolves integer operands: the parsed int, else the float operand when it is integral, else None.
_INT_OPERANDS = """\
    a = info.get("a_int")
    b = info.get("b_int")
    fa = info.get("operand_a")
    fb = info.get("operand_b")
    if a is None and fa is not None and float(fa).is_integer():
        a = int(fa)
    if b is None and fb is not None and float(fb).is_integer():
        b = int(fb)
"""

# Exact operands where possible: the parsed ints, else the float operands.
_EXACT_OPERANDS = """\
    a = info.get("a_int")
    b = info.get("b_int")
    if a is None:
        a = info.get("operand_a")
    if b is None:
        b = info.get("operand_b")
    if a is None or b is None:
        return None
"""


def _src(template: str, **values: str) -> str:
    return Template(template).substitute(
        INT_OPERANDS=_INT_OPERANDS.rstrip("\n"), EXACT_OPERANDS=_EXACT_OPERANDS.rstrip("\n"), **values
    )


_OPERANDS_EQUAL = '''\
def operands_equal(prompt, info):
    """1.0 when a == b."""
    a = info.get("operand_a")
    b = info.get("operand_b")
    if a is None or b is None:
        return None
    return 1.0 if a == b else 0.0
'''

_OPERATOR = '''\
def $name(prompt, info):
    """1.0 when the operator is '$op'."""
    op = info.get("operator")
    if op is None:
        return None
    return 1.0 if op == "$op" else 0.0
'''

_DIGIT_COUNT = '''\
def $name(prompt, info):
    """Compares the digit counts of the operands: len_a $cmp len_b."""
    la = info.get("len_a")
    lb = info.get("len_b")
    if la is None or lb is None:
        return None
    return 1.0 if la $cmp lb else 0.0
'''

_DIVIDES_EVENLY = '''\
def divides_evenly_any_order(prompt, info):
    """1.0 when a mod b == 0 or b mod a == 0; 0.0 when an operand is 0."""
    a = info.get("operand_a")
    b = info.get("operand_b")
    if a is None or b is None:
        return None
    if a == 0 or b == 0:
        return 0.0
    return 1.0 if a % b == 0 or b % a == 0 else 0.0
'''

_GCD = '''\
def gcd_gt_1(prompt, info):
    """1.0 when gcd(|a|, |b|) > 1 (Euclid; gcd(0, b) = b); None for non-integral operands."""
    if info.get("operator") is None:
        return None
$INT_OPERANDS
    if a is None or b is None:
        return None
    x = abs(a)
    y = abs(b)
    while y:
        x, y = y, x % y
    return 1.0 if x > 1 else 0.0
'''

_CARRY = '''\
def carry_in_addition(prompt, info):
    """For '+': 1.0 when some decimal column of |a| + |b| sums to 10 or more; 0.0 for other operators."""
    op = info.get("operator")
    if op is None:
        return None
    if op != "+":
        return 0.0
$INT_OPERANDS
    if a is None or b is None:
        return None
    da = str(abs(a))
    db = str(abs(b))
    n = max(len(da), len(db))
    da = da.rjust(n, "0")
    db = db.rjust(n, "0")
    for i in range(n - 1, -1, -1):
        if int(da[i]) + int(db[i]) >= 10:
            return 1.0
    return 0.0
'''

_BORROW = '''\
def borrow_in_subtraction(prompt, info):
    """For '-': 1.0 when some decimal column of |a| - |b| needs a borrow; 0.0 for other operators."""
    op = info.get("operator")
    if op is None:
        return None
    if op != "-":
        return 0.0
$INT_OPERANDS
    if a is None or b is None:
        return None
    da = str(abs(a))
    db = str(abs(b))
    n = max(len(da), len(db))
    da = da.rjust(n, "0")
    db = db.rjust(n, "0")
    for i in range(n - 1, -1, -1):
        if int(da[i]) < int(db[i]):
            return 1.0
    return 0.0
'''

_POWER_OF_TEN = '''\
def division_denominator_is_power_of_10(prompt, info):
    """For '/': 1.0 when b is 10**k (k >= 0), None when b <= 0; 0.0 for other operators."""
    op = info.get("operator")
    if op is None:
        return None
    if op != "/":
        return 0.0
    fb = info.get("operand_b")
    if fb is None or fb <= 0:
        return None
    if not float(fb).is_integer():
        return 0.0
    n = info.get("b_int")
    if n is None:
        n = int(fb)
    while n % 10 == 0:
        n = n // 10
    return 1.0 if n == 1 else 0.0
'''

_SHARE_DIGIT = '''\
def operands_share_a_digit(prompt, info):
    """1.0 when the digit sets of a and b intersect (digit lists are empty for decimals)."""
    if info.get("operand_a") is None or info.get("operand_b") is None:
        return None
    da = info.get("digits_a") or []
    db = info.get("digits_b") or []
    return 1.0 if set(da) & set(db) else 0.0
'''

_CLOSENESS = '''\
def relative_closeness_le_10pct(prompt, info):
    """1.0 when |a - b| / max(|a|, |b|) <= 0.1 (1.0 when both are 0)."""
    a = info.get("operand_a")
    b = info.get("operand_b")
    if a is None or b is None:
        return None
    m = max(abs(a), abs(b))
    if m == 0:
        return 1.0
    return 1.0 if abs(a - b) / m <= 0.1 else 0.0
'''

_SAME_SIGN = '''\
def same_sign(prompt, info):
    """1.0 when both operands carry the same sign (constant 1.0 on the non-negative default grid)."""
    sa = info.get("sign_a")
    sb = info.get("sign_b")
    if sa is None or sb is None:
        return None
    return 1.0 if sa == sb else 0.0
'''

_RESULT_BIN = '''\
def $name(prompt, info):
    """For '$op' only: 1.0 when $lo <= a $op b <= $hi."""
    if info.get("operator") != "$op":
        return None
$EXACT_OPERANDS
    r = a $op b
    return 1.0 if $lo <= r <= $hi else 0.0
'''

_OPERAND_BIN = '''\
def $name(prompt, info):
    """1.0 when $lo <= $operand <= $hi (any operator)."""
    x = info.get("$key")
    if x is None:
        return None
    return 1.0 if $lo <= x <= $hi else 0.0
'''

_QUOTIENT_BIN = '''\
def $name(prompt, info):
    """For '/' only: 1.0 when $lo <= floor(a / b) <= $hi; None when b == 0."""
    if info.get("operator") != "/":
        return None
$EXACT_OPERANDS
    if b == 0:
        return None
    if isinstance(a, int) and isinstance(b, int):
        q = a // b
    else:
        q = math.floor(a / b)
    return 1.0 if $lo <= q <= $hi else 0.0
'''

_OPERATORS = (("+", "Addition"), ("-", "Subtraction"), ("*", "Multiplication"), ("/", "Division"))
_RESULT_OPS = (("+", "add"), ("-", "sub"), ("*", "mul"))


def _seed(label: str, description: str, src: str) -> Feature:
    return Feature(label=label, description=description, python_src=src, origin="predefined")


def build_seed_features() -> list[Feature]:
    """The 86 seed features in spec order (fixed features, then result, operand and quotient bins)."""
    feats: list[Feature] = [_seed("Operands equal", "Both operands are equal.", _OPERANDS_EQUAL)]
    for op, word in _OPERATORS:
        feats.append(
            _seed(f"Operator: {word}", f"The operator is {word.lower()} ('{op}').",
                  _src(_OPERATOR, name=f"operator_{word.lower()}", op=op))
        )
    for label, name, cmp, desc in (
        ("Same digit count", "same_digit_count", "==", "Both operands have the same number of digits."),
        ("Left has more digits", "left_has_more_digits", ">", "The left operand has more digits."),
        ("Right has more digits", "right_has_more_digits", "<", "The right operand has more digits."),
    ):
        feats.append(_seed(label, desc, _src(_DIGIT_COUNT, name=name, cmp=cmp)))
    feats += [
        _seed("Divides evenly (any order)", "One operand is a multiple of the other (0 if either is 0).",
              _DIVIDES_EVENLY),
        _seed("GCD > 1", "The operands share a common factor greater than 1.", _src(_GCD)),
        _seed("Carry in addition", "Adding the operands column by column produces a carry.", _src(_CARRY)),
        _seed("Borrow in subtraction", "Subtracting column by column needs a borrow.", _src(_BORROW)),
        _seed("Division denominator is power of 10", "Division by 1, 10, 100, ...", _POWER_OF_TEN),
        _seed("Operands share a digit", "Some decimal digit occurs in both operands.", _SHARE_DIGIT),
        _seed("Relative closeness ≤ 10%", "The operands differ by at most 10% of the larger magnitude.",
              _CLOSENESS),
        _seed("Same sign", "Both operands have the same sign (constant on the default grid).", _SAME_SIGN),
    ]
    for op, tag in _RESULT_OPS:
        for lo, hi in make_closed_bins(*RESULT_BINS):
            lo_s, hi_s = _num_text(lo), _num_text(hi)
            feats.append(
                _seed(f"Result in [{lo_s},{hi_s}] ({tag})",
                      f"The exact result of a {op} b lies in [{lo_s}, {hi_s}]; undefined for other operators.",
                      _src(_RESULT_BIN, name=f"result_in_{_name_part(lo)}_{_name_part(hi)}_{tag}",
                           op=op, lo=lo_s, hi=hi_s))
            )
    for which, key in (("op1", "operand_a"), ("op2", "operand_b")):
        for lo, hi in make_closed_bins(*OPERAND_BINS):
            lo_s, hi_s = _num_text(lo), _num_text(hi)
            feats.append(
                _seed(f"{which} in [{lo_s},{hi_s}]",
                      f"The {'left' if which == 'op1' else 'right'} operand lies in [{lo_s}, {hi_s}].",
                      _src(_OPERAND_BIN, name=f"{which}_in_{_name_part(lo)}_{_name_part(hi)}",
                           operand=which, key=key, lo=lo_s, hi=hi_s))
            )
    for lo, hi in make_closed_bins(*QUOTIENT_BINS):
        lo_s, hi_s = _num_text(lo), _num_text(hi)
        feats.append(
            _seed(f"Division: q_int in [{lo_s},{hi_s}]",
                  f"For divisions, the integer quotient floor(a/b) lies in [{lo_s}, {hi_s}].",
                  _src(_QUOTIENT_BIN, name=f"division_q_int_in_{_name_part(lo)}_{_name_part(hi)}",
                       lo=lo_s, hi=hi_s))
        )
    return feats


def seed_feature_labels() -> list[str]:
    """The seed labels in order (the column names they become)."""
    return [f.label for f in build_seed_features()]
