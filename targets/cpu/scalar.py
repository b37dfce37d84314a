"""Elementwise ops as C scalar expressions: what the generated loops compute per element.

Each function takes the operands' C expressions (already of the op's input dtype) and the node's
attributes, and returns an expression of the result dtype. float math uses the single-precision
libm functions, as numpy's float32 references do, except the activations' exponential (silu,
sigmoid, swiglu), kernels.c's llmc_expf (within 2 ulp), which the compiler vectorises.
"""

from __future__ import annotations

import math

C_TYPES = {"f64": "double", "f32": "float", "f16": "f16", "i64": "int64_t", "i32": "int32_t", "i16": "int16_t",
           "i8": "int8_t", "u8": "uint8_t", "bool": "uint8_t"}


class ScalarError(Exception):
    """An elementwise op or dtype the CPU target has no C form for."""


def c_type(dtype: str) -> str:
    if dtype not in C_TYPES:
        raise ScalarError(f"dtype {dtype} has no C form on the cpu target")
    return C_TYPES[dtype]


def literal(value, dtype: str) -> str:
    """A C literal of ``value`` in ``dtype``."""
    if dtype == "bool":
        return "1" if value else "0"
    if dtype in ("f32", "f16", "f64"):
        v = float(value)
        if math.isnan(v):
            text = "NAN"
        elif math.isinf(v):
            text = "INFINITY" if v > 0 else "-INFINITY"
        else:
            text = repr(v) + ("f" if dtype != "f64" else "")
        return f"(({c_type(dtype)}){text})"
    return f"(({c_type(dtype)}){int(value)}LL)"


def _fn(name: str, dtype: str) -> str:
    """libm's name for ``name`` at this float dtype (f16 computes in float)."""
    return name if dtype == "f64" else name + "f"


def _act_exp(dtype: str) -> str:
    """The exponential of the activations (sigmoid, silu, swiglu): kernels.c's vectorisable
    llmc_expf in float; libm's exp for f64."""
    return "exp" if dtype == "f64" else "llmc_expf"


def _gelu(x: str, dtype: str, approximate: str) -> str:
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        return f"(0.5f * {x} * (1.0f + {_fn('tanh', dtype)}({c!r}f * ({x} + 0.044715f * {x} * {x} * {x}))))"
    return f"(0.5f * {x} * (1.0f + {_fn('erf', dtype)}({x} * {1 / math.sqrt(2.0)!r}f)))"


def expression(op: str, args: list[str], attrs: dict, in_dtype: str, out_dtype: str) -> str:
    """The C expression of one elementwise op over operand expressions."""
    t = c_type(out_dtype)
    d = in_dtype
    x = args[0] if args else ""
    y = args[1] if len(args) > 1 else ""
    unary = {
        "neg": f"(-{x})", "exp": f"{_fn('exp', d)}({x})", "log": f"{_fn('log', d)}({x})",
        "sqrt": f"{_fn('sqrt', d)}({x})", "rsqrt": f"(1 / {_fn('sqrt', d)}({x}))", "reciprocal": f"(1 / {x})",
        "sin": f"{_fn('sin', d)}({x})", "cos": f"{_fn('cos', d)}({x})", "tanh": f"{_fn('tanh', d)}({x})",
        "erf": f"{_fn('erf', d)}({x})", "sigmoid": f"(1 / (1 + {_act_exp(d)}(-{x})))",
        "silu": f"({x} / (1 + {_act_exp(d)}(-{x})))", "relu": f"({x} > 0 ? {x} : 0)", "not": f"(!{x})",
    }
    if op in unary:
        return f"(({t}){unary[op]})"
    if op == "abs":
        return f"(({t})({x} < 0 ? -{x} : {x}))"
    if op == "gelu":
        return f"(({t}){_gelu(x, d, attrs['approximate'])})"
    if op == "cast":
        return f"(({t})({x} != 0))" if out_dtype == "bool" else f"(({t})({x}))"
    binary = {"add": "+", "sub": "-", "mul": "*", "div": "/", "eq": "==", "ne": "!=", "lt": "<", "le": "<=",
              "gt": ">", "ge": ">=", "and": "&&", "or": "||"}
    if op in binary:
        return f"(({t})({x} {binary[op]} {y}))"
    if op == "pow":
        return f"(({t}){_fn('pow', d)}({x}, {y}))"
    if op in ("maximum", "minimum"):
        cmp = ">" if op == "maximum" else "<"
        return f"(({t})({x} {cmp} {y} || {x} != {x} ? {x} : {y}))"
    if op == "where":
        return f"(({t})({x} ? {y} : {args[2]}))"
    if op == "swiglu":
        return f"(({t})({x} / (1 + {_act_exp(d)}(-{x})) * {y}))"
    if op == "geglu":
        return f"(({t})({_gelu(x, d, attrs['approximate'])} * {y}))"
    raise ScalarError(f"op {op} has no elementwise C form")

