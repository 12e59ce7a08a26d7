"""Assert-style tests of the code task, checked outside the candidate's interpreter.

A test in a problem file is one of:
- ``"assert CALL == VALUE"`` (or ``VALUE == CALL``, ``!=``), ``"assert CALL is True"`` (also
  ``False``, ``None``), ``"assert CALL"``, ``"assert not CALL"``: VALUE must be a constant
  expression (literals, tuples, lists, dicts, sets, and arithmetic on numbers: ``10**12 + 1``);
  CALL is any expression, evaluated in the solution's namespace inside the sandbox;
- ``{"call": "CALL", "expected": "VALUE"}`` with VALUE as above (a Python literal in a
  string, so tuples stay tuples), optionally ``"abs_tol": x`` / ``"rel_tol": x`` for floats;
- ``{"exec": "STATEMENTS"}``: run as they are in the candidate's interpreter, passing when
  they raise nothing. This is the only form a candidate can game (it controls that
  interpreter: e.g. an object whose ``__eq__`` is always true); use it only where a value
  check cannot say what the test needs, and say so by choosing it.

Any other string (several statements, a comparison without a constant side, ...) is refused
when the file is loaded, naming the form to use. Inside the sandbox only the value of CALL
is computed and sent back, through a strict encoder that accepts exact ``bool``, ``int``,
``float``, ``str``, ``None``, ``list``, ``tuple``, ``dict``, ``set`` and ``frozenset`` of those
(a subclass or any other object fails the test); the expected value never enters the
sandbox and the comparison runs here, on decoded plain values.
"""

from __future__ import annotations

import ast
import base64
import json
import math
import operator
from dataclasses import dataclass

MAX_POW = 10_000  # constant expressions: exponents up to this, results up to MAX_BITS bits
MAX_BITS = 1 << 16
MAX_ITEMS = 100_000  # and repeated strings, tuples and lists up to this length
SEQS = {str, tuple, list}


@dataclass(frozen=True)
class Check:
    """One assert-style test: where it runs (``value`` or ``exec``), the source sent into
    the sandbox (the CALL, or the statements), and for values how the result is judged."""

    mode: str  # "value" or "exec"
    source: str
    op: str = "eq"  # eq, ne, is, truthy, falsy
    expected: object = None
    abs_tol: float | None = None
    rel_tol: float | None = None


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow}  # fmt: skip
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}


def constant(node: ast.AST):
    """The value of a constant expression, or ValueError (nothing else is evaluated)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bool, type(None)):
        return node.value
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        items = [constant(e) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {constant(k): constant(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_number(constant(node.operand), node))
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        left, right = constant(node.left), constant(node.right)
        if isinstance(node.op, ast.Pow):
            _number(left, node), _number(right, node)
            if (
                abs(right) > MAX_POW
                or abs(left) > 2
                and abs(right) * math.log2(abs(left)) > MAX_BITS
            ):
                raise ValueError("constant too large")
        elif isinstance(node.op, ast.Add) and type(left) is type(right) and type(left) in SEQS:
            pass  # joined: 'a' + 'b', (1,) + (2,)
        elif isinstance(node.op, ast.Mult) and {type(left), type(right)} & SEQS:
            n, seq = (right, left) if type(left) in SEQS else (left, right)
            if type(n) is not int or len(seq) * max(n, 0) > MAX_ITEMS:
                raise ValueError(f"not a constant: {ast.unparse(node)[:80]}")
        else:
            _number(left, node), _number(right, node)
        try:
            return _BIN[type(node.op)](left, right)
        except (ArithmeticError, TypeError) as e:
            raise ValueError(str(e)) from None
    raise ValueError(f"not a constant: {ast.unparse(node)[:80]}")


def _number(value, node):
    if type(value) not in (int, float, bool):
        raise ValueError(f"not a number: {ast.unparse(node)[:80]}")
    return value


def parse_check(test, where: str) -> Check:
    """A problem file's test -> Check, or ValueError saying which form to use."""
    if isinstance(test, dict):
        return _from_dict(test, where)
    if not isinstance(test, str):
        raise ValueError(f"{where}: a test is an assert string or an object, got {test!r:.80}")
    hint = ('write it as {"call": ..., "expected": ...}, or {"exec": ...} to run it inside '
            "the sandbox (a candidate can game that form)")  # fmt: skip
    try:
        body = ast.parse(test).body
    except SyntaxError as e:
        raise ValueError(f"{where}: test {test!r:.80} does not parse: {e.msg}") from None
    if len(body) != 1 or not isinstance(body[0], ast.Assert):
        raise ValueError(f"{where}: test {test!r:.80} is not one assert statement; {hint}")
    expr = body[0].test
    if isinstance(expr, ast.Compare) and len(expr.ops) == 1:
        left, right, op = expr.left, expr.comparators[0], expr.ops[0]
        if isinstance(op, ast.Is) and isinstance(right, ast.Constant) and right.value in (True, False, None):  # fmt: skip
            return Check("value", ast.unparse(left), "is", right.value)
        if isinstance(op, ast.Eq | ast.NotEq):
            name = "eq" if isinstance(op, ast.Eq) else "ne"
            for call, value in ((left, right), (right, left)):
                try:
                    expected = constant(value)
                except ValueError:
                    continue
                if not _is_constant(call):
                    return Check("value", ast.unparse(call), name, expected)
        raise ValueError(f"{where}: test {test!r:.80}: compare a call with a constant; {hint}")
    if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not):
        return Check("value", ast.unparse(expr.operand), "falsy")
    return Check("value", ast.unparse(expr), "truthy")


def _is_constant(node) -> bool:
    try:
        constant(node)
    except ValueError:
        return False
    return True


def _from_dict(test: dict, where: str) -> Check:
    if set(test) == {"exec"} and isinstance(test["exec"], str):
        try:
            compile(test["exec"], "test", "exec")
        except SyntaxError as e:
            raise ValueError(f"{where}: exec test does not parse: {e.msg}") from None
        return Check("exec", test["exec"])
    extra = set(test) - {"call", "expected", "abs_tol", "rel_tol"}
    if extra or not isinstance(test.get("call"), str) or not isinstance(test.get("expected"), str):
        raise ValueError(f'{where}: a test object is {{"call": str, "expected": str, "abs_tol"?, '
                         f'"rel_tol"?}} or {{"exec": str}}, got {test!r:.80}')  # fmt: skip
    try:
        compile(test["call"], "call", "eval")
        expected = constant(ast.parse(test["expected"], mode="eval").body)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"{where}: test {test!r:.80}: {e}") from None
    tols = [test.get(k) for k in ("abs_tol", "rel_tol")]
    if any(t is not None and (type(t) not in (int, float) or not t >= 0) for t in tols):
        raise ValueError(f"{where}: abs_tol and rel_tol must be numbers >= 0")
    return Check("value", test["call"], "eq", expected, *tols)


MAX_DEPTH = 64


def decode_value(encoded: str):
    """The plain value the sandbox sent (base64 of the encoder's JSON); ValueError for
    anything else."""
    try:
        tree = json.loads(base64.b64decode(encoded, validate=True))
        return _plain(tree, 0)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
        raise ValueError(f"not a plain value: {e}") from None


def _plain(node, depth):
    if depth > MAX_DEPTH or not isinstance(node, list) or not node:
        raise ValueError("bad node")
    tag = node[0]
    if tag == "n" and len(node) == 1:
        return None
    if len(node) != 2:
        raise ValueError("bad node")
    v = node[1]
    if tag == "b" and type(v) is bool or tag == "s" and type(v) is str:
        return v
    if tag == "i" and type(v) is str:
        return int(v)
    if tag == "f" and type(v) is str:
        return float.fromhex(v)
    if tag in ("l", "t", "S", "F") and type(v) is list:
        items = [_plain(x, depth + 1) for x in v]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d" and type(v) is list:
        return {_plain(k, depth + 1): _plain(x, depth + 1) for k, x in v}
    raise ValueError("bad node")


def passes(check: Check, value) -> bool:
    """Whether a decoded value meets the check (plain values: Python's own comparisons)."""
    if check.op == "is":
        return value is check.expected  # True, False and None are singletons once decoded
    if check.op == "truthy":
        return bool(value)
    if check.op == "falsy":
        return not value
    equal = (
        _close(value, check.expected, check)
        if check.abs_tol or check.rel_tol
        else value == check.expected
    )
    return equal if check.op == "eq" else not equal


def _close(got, want, check: Check) -> bool:
    if type(got) in (int, float) and type(want) in (int, float):
        return math.isclose(got, want, rel_tol=check.rel_tol or 0.0, abs_tol=check.abs_tol or 0.0)
    if type(got) is type(want) and isinstance(got, list | tuple) and len(got) == len(want):
        return all(_close(a, b, check) for a, b in zip(got, want, strict=True))
    return got == want
