"""Assert-style tests of the code task, checked outside the candidate's interpreter.

A test in a problem file is one of:
- ``"assert CALL == VALUE"`` (or ``VALUE == CALL``, ``!=``), ``"assert CALL is True"`` (also
  ``is not``, ``False``, ``None``), ``"assert CALL in VALUE"`` (``not in``), ``"assert
  CALL"``, ``"assert not CALL"``, ``"assert math.isclose(CALL, VALUE, rel_tol=x)"``,
  ``"assert abs(CALL - VALUE) < x"``: VALUE must be a constant expression (literals,
  tuples, lists, dicts, sets, ``set((4, 5))``, ``float('inf')``, and bounded arithmetic:
  ``10**12 + 1``); CALL is evaluated in the solution's namespace inside the sandbox, and
  where the verdict is CALL's own value (``CALL``, ``not CALL``, ``is``, ``in``) it may not
  compare or combine anything itself (``f(1) == 2 and f(2) == 3`` would be judged inside);
- ``{"call": "CALL", "expected": "VALUE"}`` with VALUE as above (a Python expression in a
  string, so tuples stay tuples), optionally ``"abs_tol": x`` / ``"rel_tol": x`` for floats;
- ``{"exec": "STATEMENTS"}``: run as they are in the candidate's interpreter, passing when
  they raise nothing. This is the only form a candidate can game (it controls that
  interpreter: e.g. an object whose ``__eq__`` is always true); use it only where a value
  check cannot say what the test needs, and say so by choosing it.

Any other string (several statements, a comparison without a constant side, ...) is refused
when the file is loaded, naming the form to use. Inside the sandbox only the value of CALL
is computed and sent back as plain data (``bool``, ``int``, ``float``, ``str``, ``None``,
lists, tuples, dicts, sets: a subclass such as ``Counter`` or a namedtuple goes as its base
type's content, read through the base type's own methods; any other object fails the
test); the expected value never enters the sandbox and the comparison runs here.
"""

from __future__ import annotations

import ast
import base64
import json
import math
import operator
from dataclasses import dataclass, replace

MAX_POW = 10_000  # constant expressions: exponents up to this, results up to MAX_BITS bits
MAX_BITS = 1 << 16
MAX_ITEMS = 100_000  # and strings, tuples and lists up to this length
SEQS = {str, tuple, list}


@dataclass(frozen=True)
class Check:
    """One assert-style test: where it runs (``value`` or ``exec``), the source sent into
    the sandbox (the CALL, or the statements), and for values how the result is judged."""

    mode: str  # "value" or "exec"
    source: str
    op: str = "eq"  # eq, ne, is, isnot, in, notin, truthy, falsy
    expected: object = None
    abs_tol: float | None = None
    rel_tol: float | None = None


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow}  # fmt: skip
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_CONVERT = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list}
_FLOATS = ("inf", "-inf", "+inf", "nan", "infinity", "-infinity")


def constant(node: ast.AST):
    """The value of a constant expression, or ValueError (nothing else is evaluated; every
    intermediate result is bounded in size)."""
    return _sized(_constant(node))


def _sized(value):
    if (
        type(value) is int
        and value.bit_length() > MAX_BITS
        or (type(value) in SEQS and len(value) > MAX_ITEMS)
    ):
        raise ValueError("constant too large")
    return value


def _constant(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str, bool, type(None)):
        return node.value
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        if len(node.elts) > MAX_ITEMS:
            raise ValueError("constant too large")
        items = [constant(e) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {constant(k): constant(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        name, args = node.func.id, node.args
        if name in _CONVERT and len(args) <= 1:  # set(), set((4, 5)), tuple([1, 2])
            return _CONVERT[name](*(constant(a) for a in args))
        if name == "float" and len(args) == 1 and isinstance(args[0], ast.Constant):
            if str(args[0].value).strip().lower() in _FLOATS:
                return float(args[0].value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_number(constant(node.operand), node))
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        return _binop(node, constant(node.left), constant(node.right))
    raise ValueError(f"not a constant: {ast.unparse(node)[:80]}")


def _binop(node: ast.BinOp, left, right):
    op = node.op
    if isinstance(op, ast.Pow):
        _number(left, node), _number(right, node)
        if abs(right) > MAX_POW or abs(left) > 2 and abs(right) * math.log2(abs(left)) > MAX_BITS:
            raise ValueError("constant too large")
    elif isinstance(op, ast.Add) and type(left) is type(right) and type(left) in SEQS:
        if len(left) + len(right) > MAX_ITEMS:  # joined: 'a' + 'b', (1,) + (2,)
            raise ValueError("constant too large")
    elif isinstance(op, ast.Mult) and {type(left), type(right)} & SEQS:
        n, seq = (right, left) if type(left) in SEQS else (left, right)
        if type(n) is not int or len(seq) * max(n, 0) > MAX_ITEMS:
            raise ValueError(f"not a constant: {ast.unparse(node)[:80]}")
    else:
        _number(left, node), _number(right, node)
        if isinstance(op, ast.Mult) and type(left) is int and type(right) is int:
            if left.bit_length() + right.bit_length() > MAX_BITS:
                raise ValueError("constant too large")
    try:
        return _sized(_BIN[type(op)](left, right))
    except (ArithmeticError, TypeError) as e:
        raise ValueError(str(e)) from None


def _number(value, node):
    if type(value) not in (int, float, bool):
        raise ValueError(f"not a number: {ast.unparse(node)[:80]}")
    return value


def _try_constant(node: ast.AST) -> tuple | None:
    """(value,) of a constant expression, None otherwise."""
    try:
        return (constant(node),)
    except ValueError:
        return None


HINT = ("write one test per call, each comparing a call of the solution's function with a "
        'constant (assert f(1) == 2), or {"exec": ...} to run it inside the sandbox (a '
        "candidate can game that form)")  # fmt: skip


def parse_check(test, where: str) -> Check:
    """A problem file's test -> Check, or ValueError saying which form to use."""
    if isinstance(test, dict):
        return _from_dict(test, where)
    if not isinstance(test, str):
        raise ValueError(f"{where}: a test is an assert string or an object, got {test!r:.80}")
    try:
        body = ast.parse(test).body
        if len(body) != 1 or not isinstance(body[0], ast.Assert):
            raise ValueError(f"{where}: test {test!r:.80} is not one assert statement; {HINT}")
        check = _assert_check(body[0].test)
    except SyntaxError as e:
        raise ValueError(f"{where}: test {test!r:.80} does not parse: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"{where}: test {test!r:.80} is nested too deeply") from None
    if check is None:
        raise ValueError(f"{where}: test {test!r:.80}: compare a call with a constant; {HINT}")
    return check


def _assert_check(expr: ast.AST) -> Check | None:
    """The Check of an assert's expression, or None when it has no form checked outside."""
    negate = isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not)
    inner = expr.operand if negate else expr
    close = _isclose(inner)
    if close is not None:  # math.isclose(X, C, rel_tol=..), abs(X - C) < tol
        call, expected, abs_tol, rel_tol = close
        check = _plain_call(call, "ne" if negate else "eq", expected)
        return None if check is None else replace(check, abs_tol=abs_tol, rel_tol=rel_tol)
    if negate:
        return _plain_call(inner, "falsy")
    if not isinstance(expr, ast.Compare):
        return _plain_call(expr, "truthy")
    if len(expr.ops) != 1:
        return None
    left, right, op = expr.left, expr.comparators[0], expr.ops[0]
    if isinstance(op, ast.Is | ast.IsNot):
        if isinstance(right, ast.Constant) and right.value in (True, False, None):
            return _plain_call(left, "is" if isinstance(op, ast.Is) else "isnot", right.value)
        return None
    if isinstance(op, ast.In | ast.NotIn):
        expected = _try_constant(right)
        if expected is None or _try_constant(left) is not None:
            return None
        return _plain_call(left, "in" if isinstance(op, ast.In) else "notin", expected[0])
    if isinstance(op, ast.Eq | ast.NotEq):
        name = "eq" if isinstance(op, ast.Eq) else "ne"
        for call, value in ((left, right), (right, left)):
            expected = _try_constant(value)
            if expected is not None and _try_constant(call) is None:
                return _plain_call(call, name, expected[0])
    return None


def _plain_call(node, op: str, expected=None) -> Check | None:
    """A check judged here on the value of ``node``; None unless ``node`` is calls of named
    functions (``f``, ``mod.f``, ``sorted``) whose arguments are constants, names, lambdas
    or such calls. Anything else would be computed in the sandbox on the candidate's
    objects, whose methods decide it: ``(f(1) == 2) == True``, ``f(1) - 3 == 0`` (its
    ``__sub__``), ``f(1).startswith('Hi')``, ``[f(1)].count(42) == 1``,
    ``operator.eq(f(1), 42)``."""
    if isinstance(node, str):
        node = ast.parse(node, mode="eval").body
    return Check("value", ast.unparse(node), op, expected) if _direct(node) else None


COMPARING = {"isclose", "eq", "ne", "lt", "le", "gt", "ge", "contains", "is_", "is_not",
             "all", "any", "isinstance", "issubclass", "callable", "hasattr"}  # fmt: skip


def _direct(node: ast.AST, top: bool = True) -> bool:
    if _try_constant(node) is not None or not top and isinstance(node, ast.Name | ast.Lambda):
        return True  # an argument: its value goes to a function, which is judged by its result
    if not isinstance(node, ast.Call) or any(k.arg is None for k in node.keywords):
        return False
    func = node.func
    while isinstance(func, ast.Attribute):  # mod.f, pkg.mod.f: a dotted name
        func = func.value
    if not isinstance(func, ast.Name) or _name(node.func) in COMPARING:
        return False
    args = [*node.args, *(k.value for k in node.keywords)]
    return all(_direct(a, top=False) for a in args)


def _name(func: ast.AST) -> str:
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else ""


def _isclose(node: ast.AST) -> tuple | None:
    """(CALL source, expected, abs_tol, rel_tol) of ``isclose(CALL, C, ...)`` or
    ``abs(CALL - C) < tol`` (either order inside); None for anything else."""
    if isinstance(node, ast.Call) and _name(node.func) == "isclose" and len(node.args) == 2:
        kw = {k.arg: _try_constant(k.value) for k in node.keywords}
        if not set(kw) <= {"rel_tol", "abs_tol"} or any(v is None for v in kw.values()):
            return None
        for call, value in (node.args, node.args[::-1]):
            expected = _try_constant(value)
            if expected is not None and _try_constant(call) is None:
                rel = kw["rel_tol"][0] if "rel_tol" in kw else 1e-9  # math.isclose's default
                return ast.unparse(call), expected[0], kw.get("abs_tol", (None,))[0], rel
        return None
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1
            and isinstance(node.ops[0], ast.Lt | ast.LtE) and isinstance(node.left, ast.Call)
            and _name(node.left.func) == "abs" and len(node.left.args) == 1
            and isinstance(node.left.args[0], ast.BinOp)
            and isinstance(node.left.args[0].op, ast.Sub)):  # fmt: skip
        return None
    tol, diff = _try_constant(node.comparators[0]), node.left.args[0]
    for call, value in ((diff.left, diff.right), (diff.right, diff.left)):
        expected = _try_constant(value)
        if tol is not None and expected is not None and _try_constant(call) is None:
            return ast.unparse(call), expected[0], tol[0], None
    return None


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
        check = _plain_call(
            test["call"], "eq", constant(ast.parse(test["expected"], mode="eval").body)
        )
    except (SyntaxError, ValueError, RecursionError) as e:
        raise ValueError(f"{where}: test {test!r:.80}: {e}") from None
    if check is None:
        raise ValueError(f"{where}: test {test!r:.80}: the call must be calls of named "
                         f"functions on constants; {HINT}")  # fmt: skip
    tols = [test.get(k) for k in ("abs_tol", "rel_tol")]
    if any(t is not None and (type(t) not in (int, float) or not t >= 0) for t in tols):
        raise ValueError(f"{where}: abs_tol and rel_tol must be numbers >= 0")
    return replace(check, source=test["call"], abs_tol=tols[0], rel_tol=tols[1])


MAX_DEPTH = 64
MAX_NODES = 100_000  # values in one reported result
MAX_REPORT = 4 << 20  # characters of one reported result


class Unhashed:
    """A reported set or dict, kept as the list the sandbox sent: comparing it with an
    expected set or dict never hashes the candidate's elements (crafted colliding hashes
    make building a real set quadratic, here in the caller); it costs at most
    len(expected)² element comparisons, after the sizes agree."""

    __slots__ = ("kind", "items")
    __hash__ = None

    def __init__(self, kind: type, items: list):
        self.kind, self.items = kind, items

    def __eq__(self, other):
        if self.kind is dict:
            if type(other) is not dict or len(other) != len(self.items):
                return False
            return all(any(k == kk and v == vv for kk, vv in self.items) for k, v in other.items())
        if type(other) not in (set, frozenset) or len(other) != len(self.items):
            return False
        return all(any(x == y for y in self.items) for x in other) and all(
            any(y == x for x in other) for y in self.items
        )

    def __ne__(self, other):
        return not self == other

    def __len__(self) -> int:
        return len(self.items)


def decode_value(encoded: str):
    """The plain value the sandbox sent (base64 of the encoder's JSON); ValueError for
    anything else. Sets and dicts come back as ``Unhashed``."""
    if len(encoded) > MAX_REPORT:
        raise ValueError("result too large")
    try:
        tree = json.loads(base64.b64decode(encoded, validate=True))
        return _plain(tree, 0, [MAX_NODES])
    except (ValueError, TypeError, KeyError, IndexError, RecursionError, ArithmeticError) as e:
        raise ValueError(f"not a plain value: {e}") from None


def _plain(node, depth: int, budget: list):
    budget[0] -= 1
    if depth > MAX_DEPTH or budget[0] < 0 or not isinstance(node, list) or not node:
        raise ValueError("bad node")
    tag = node[0]
    if tag == "n" and len(node) == 1:
        return None
    if len(node) != 2:
        raise ValueError("bad node")
    v = node[1]
    if tag == "b" and type(v) is bool or tag == "s" and type(v) is str:
        return v
    if tag == "i" and type(v) is str and len(v) <= MAX_BITS // 4 + 2:
        return int(v, 16)  # hex: no digit limit, linear
    if tag == "f" and type(v) is str:
        return float.fromhex(v)
    if tag in ("l", "t", "S", "F") and type(v) is list:
        items = [_plain(x, depth + 1, budget) for x in v]
        if tag in ("S", "F"):
            return Unhashed(set, items)
        return items if tag == "l" else tuple(items)
    if tag == "d" and type(v) is list:
        pairs = [(_plain(k, depth + 1, budget), _plain(x, depth + 1, budget)) for k, x in v]
        return Unhashed(dict, pairs)
    raise ValueError("bad node")


def passes(check: Check, value) -> bool:
    """Whether a decoded value meets the check (Python's own comparisons, on plain values)."""
    if check.op in ("is", "isnot"):  # True, False and None are singletons once decoded
        return (value is check.expected) == (check.op == "is")
    if check.op in ("in", "notin"):
        want = check.expected
        if type(want) is str:  # a substring, as ``in`` means for strings
            found = type(value) is str and value in want
        else:
            found = any(_equal(value, x, check) for x in want)
        return found == (check.op == "in")
    if check.op == "truthy":
        return bool(value)
    if check.op == "falsy":
        return not value
    equal = _equal(value, check.expected, check)
    return equal if check.op == "eq" else not equal


def _equal(got, want, check: Check) -> bool:
    if check.abs_tol or check.rel_tol:
        return _close(got, want, check)
    return got == want


def _close(got, want, check: Check) -> bool:
    if type(got) in (int, float) and type(want) in (int, float):
        return math.isclose(got, want, rel_tol=check.rel_tol or 0.0, abs_tol=check.abs_tol or 0.0)
    if type(got) is type(want) and isinstance(got, list | tuple) and len(got) == len(want):
        return all(_close(a, b, check) for a, b in zip(got, want, strict=True))
    return got == want
