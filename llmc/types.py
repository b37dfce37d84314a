"""Values of the IR below the graph: dtypes, types with symbolic shapes, and the text form of
types and attribute values. The op set (``llmc.ops``) and the graph (``llmc.ir``) both stand on
this module, so neither needs the other to describe a value."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from llmc import dims
from llmc.dims import Dim

DTYPES = ("f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "u8", "bool")
FLOAT_DTYPES = ("f64", "f32", "f16", "bf16")

_NUMPY_DTYPES = {
    "f64": np.float64, "f32": np.float32, "f16": np.float16,
    # numpy has no bfloat16: the interpreter holds bf16 values in float32, rounded to bf16.
    "bf16": np.float32,
    "i64": np.int64, "i32": np.int32, "i16": np.int16, "i8": np.int8, "u8": np.uint8,
    "bool": np.bool_,
}


# Bytes one value takes where it is stored (bf16 too, which the interpreter widens to float32).
DTYPE_BYTES = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "u8": 1, "bool": 1}


def numpy_dtype(dtype: str) -> type:
    return _NUMPY_DTYPES[dtype]


def coerce(value: Any, dtype: str) -> bool | int | float:
    """A Python number as the attribute value of a tensor of ``dtype``."""
    if dtype == "bool":
        return bool(value)
    if dtype.startswith(("i", "u")):
        return int(value)
    return float(value)


def dtype_of_array(array: np.ndarray) -> str:
    for name, np_type in _NUMPY_DTYPES.items():
        if name != "bf16" and array.dtype == np_type:
            return name
    raise IRError(f"numpy dtype {array.dtype} has no llmc equivalent")


class IRError(Exception):
    """A malformed graph or IR text. Raised by the parser and the verifier."""


@dataclass(frozen=True)
class Type:
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise IRError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        object.__setattr__(self, "shape", tuple(dims.canonical(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class TupleType:
    """The type of a node with several results (a fused op); ``get`` picks one."""
    types: tuple[Type, ...]

    def __str__(self) -> str:
        return "(" + ", ".join(str(t) for t in self.types) + ")"


def result_types(t: Type | TupleType) -> tuple[Type, ...]:
    return t.types if isinstance(t, TupleType) else (t,)


# ---------------------------------------------------------------------------------------------
# Text form of attribute values and types

def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise IRError(f"attribute value {value!r} of type {type(value).__name__} has no text form")


def format_attrs(attrs: Mapping[str, Any]) -> str:
    if not attrs:
        return ""
    return "{" + ", ".join(f"{k}={format_value(attrs[k])}" for k in sorted(attrs)) + "}"


_VALUE_TOKEN = re.compile(r"""\s*(?:("(?:[^"\\]|\\.)*")|([\[\],=])|([^\s\[\],=]+))""")


def _parse_scalar(word: str) -> Any:
    if word == "none":
        return None
    if word in ("true", "false"):
        return word == "true"
    if word in ("inf", "-inf", "nan"):
        return float(word)
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    try:
        return float(word)
    except ValueError:
        raise IRError(f"cannot parse attribute value {word!r}") from None


def parse_attrs(text: str) -> dict[str, Any]:
    tokens = [t for t in _VALUE_TOKEN.findall(text)]
    flat = []
    for string, punct, word in tokens:
        flat.append(("str", json.loads(string)) if string else ("p", punct) if punct else ("w", word))
    pos = 0

    def value():
        nonlocal pos
        kind, tok = flat[pos]
        pos += 1
        if kind == "str":
            return tok
        if (kind, tok) == ("p", "["):
            items = []
            while flat[pos] != ("p", "]"):
                items.append(value())
                if flat[pos] == ("p", ","):
                    pos += 1
            pos += 1
            return items
        if kind == "w":
            return _parse_scalar(tok)
        raise IRError(f"unexpected {tok!r} in attributes {text!r}")

    attrs = {}
    try:
        while pos < len(flat):
            kind, key = flat[pos]
            if kind != "w" or flat[pos + 1] != ("p", "="):
                raise IRError(f"expected name=value in attributes {text!r}")
            pos += 2
            attrs[key] = value()
            if pos < len(flat) and flat[pos] == ("p", ","):
                pos += 1
    except IndexError:
        raise IRError(f"truncated attributes {text!r}") from None
    return attrs


def parse_type(text: str) -> Type | TupleType:
    text = text.strip()
    if text.startswith("("):
        return TupleType(tuple(parse_type(t) for t in re.findall(r"\w+\[[^\]]*\]", text)))
    m = re.fullmatch(r"\s*(\w+)\[(.*)\]\s*", text)
    if not m:
        raise IRError(f"cannot parse type {text!r}")
    body = m.group(2).strip()
    shape = [] if not body else [_parse_dim(d) for d in body.split(",")]
    return Type(m.group(1), tuple(shape))


def _parse_dim(text: str) -> Dim:
    text = text.strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else dims.canonical(text)
