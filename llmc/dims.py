"""Symbolic dimensions: an int, or a polynomial over named symbols such as ``seq``.

A dimension is stored in its canonical text form (``"seq"``, ``"seq+1"``, ``"2*seq"``) so
that two equal expressions compare equal as strings and print the same way. Arithmetic goes
through a small polynomial (monomial -> integer coefficient); that covers every shape a
traced decoder produces (sums, products and exact divisions of sizes).
"""

from __future__ import annotations

import re
from typing import Mapping, Union

Dim = Union[int, str]

# A monomial is a sorted tuple of symbol names (with repetition); () is the constant term.
_Poly = dict

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z_0-9]*)|(.))")


class DimError(ValueError):
    """A dimension expression that is malformed or outside what llmc can represent."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out = []
    for number, name, other in _TOKEN.findall(text):
        if number:
            out.append(("int", number))
        elif name:
            out.append(("name", name))
        elif other.strip():
            out.append(("op", other))
    return out


def _poly_add(a: _Poly, b: _Poly, sign: int = 1) -> _Poly:
    out = dict(a)
    for mono, coeff in b.items():
        out[mono] = out.get(mono, 0) + sign * coeff
    return {m: c for m, c in out.items() if c != 0}


def _poly_mul(a: _Poly, b: _Poly) -> _Poly:
    out: _Poly = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            mono = tuple(sorted(ma + mb))
            out[mono] = out.get(mono, 0) + ca * cb
    return {m: c for m, c in out.items() if c != 0}


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def parse(self) -> _Poly:
        poly = self.sum()
        if self.i != len(self.toks):
            raise DimError(f"cannot parse dimension {self.text!r}")
        return poly

    def sum(self) -> _Poly:
        poly = self.product()
        while self.peek() in (("op", "+"), ("op", "-")):
            sign = 1 if self.take()[1] == "+" else -1
            poly = _poly_add(poly, self.product(), sign)
        return poly

    def product(self) -> _Poly:
        poly = self.atom()
        while self.peek() == ("op", "*"):
            self.take()
            poly = _poly_mul(poly, self.atom())
        return poly

    def atom(self) -> _Poly:
        kind, value = self.take()
        if kind == "int":
            return {(): int(value)} if int(value) else {}
        if kind == "name":
            return {(value,): 1}
        if (kind, value) == ("op", "-"):
            return _poly_mul({(): -1}, self.atom())
        if (kind, value) == ("op", "("):
            poly = self.sum()
            if self.take() != ("op", ")"):
                raise DimError(f"unbalanced parentheses in dimension {self.text!r}")
            return poly
        raise DimError(f"cannot parse dimension {self.text!r}")


def _poly(d: Dim) -> _Poly:
    if isinstance(d, bool):
        raise DimError(f"not a dimension: {d!r}")
    if isinstance(d, int):
        return {(): d} if d else {}
    if isinstance(d, str):
        return _Parser(d).parse()
    raise DimError(f"not a dimension: {d!r}")


def _format(poly: _Poly) -> Dim:
    if not poly:
        return 0
    if set(poly) == {()}:
        return poly[()]
    # Highest degree first, then alphabetical; the constant term goes last.
    terms = sorted(poly.items(), key=lambda mc: (-len(mc[0]), mc[0]))
    text = ""
    for mono, coeff in terms:
        body = "*".join(mono)
        magnitude = abs(coeff)
        if not body:
            piece = str(magnitude)
        elif magnitude == 1:
            piece = body
        else:
            piece = f"{magnitude}*{body}"
        if not text:
            text = piece if coeff > 0 else "-" + piece
        else:
            text += ("+" if coeff > 0 else "-") + piece
    return text


def canonical(d: Dim) -> Dim:
    """The canonical form of a dimension (ints stay ints; ``"1+seq"`` becomes ``"seq+1"``)."""
    return _format(_poly(d))


def add(a: Dim, b: Dim) -> Dim:
    return _format(_poly_add(_poly(a), _poly(b)))


def sub(a: Dim, b: Dim) -> Dim:
    return _format(_poly_add(_poly(a), _poly(b), -1))


def mul(a: Dim, b: Dim) -> Dim:
    return _format(_poly_mul(_poly(a), _poly(b)))


def exact_div(a: Dim, b: int) -> Dim:
    """``a / b`` where every coefficient of ``a`` is divisible by the integer ``b``."""
    poly = _poly(a)
    if b == 0 or any(c % b for c in poly.values()):
        raise DimError(f"{a} is not divisible by {b}")
    return _format({m: c // b for m, c in poly.items()})


def product(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = mul(out, d)
    return out


def symbols(d: Dim) -> set[str]:
    return {name for mono in _poly(d) for name in mono}


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def evaluate(d: Dim, env: Mapping[str, int]) -> int:
    """The integer value of ``d`` once every symbol is bound in ``env``."""
    if isinstance(d, int):
        return d
    total = 0
    for mono, coeff in _poly(d).items():
        term = coeff
        for name in mono:
            if name not in env:
                raise DimError(f"symbol {name!r} of dimension {d!r} is not bound")
            term *= env[name]
        total += term
    return total


def evaluator(d: Dim):
    """``evaluate`` with ``d`` parsed once: a function of ``env`` (for dims evaluated per call)."""
    if isinstance(d, int) and not isinstance(d, bool):
        return lambda env: d
    terms = [(coeff, mono) for mono, coeff in _poly(d).items()]

    def value(env: Mapping[str, int]) -> int:
        total = 0
        for coeff, mono in terms:
            for name in mono:
                coeff *= env[name]
            total += coeff
        return total

    return value
