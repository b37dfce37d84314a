"""Weight quantization schemes: a short code names the format, a dataclass validates it, and the
scheme is part of the artifact's identity.

| code     | storage per weight                     | format                                               |
| -------- | -------------------------------------- | ---------------------------------------------------- |
| f32      | 4 bytes                                | as traced                                            |
| f16      | 2 bytes                                | IEEE half                                            |
| q8       | 1 byte + f16 scale per 32              | symmetric: w = q * scale, q in [-127, 127]           |
| q4g32    | 4 bits + f16 scale and min per 32      | asymmetric: w = q * scale + min, q in [0, 15]        |
| q4g128   | 4 bits + f16 scale and min per 128     | as q4g32, groups of 128                              |
| gguf     | as the GGUF source stores it           | Q4_0/Q4_1 blocks as q4g32, Q8_0 as q8, losslessly;   |
|          |                                        | weights of other types stay f32                      |

Groups run along a row (the input dimension K of a [N, K] linear weight), so a GEMV reads each
group's scale once. 4-bit codes pack two per byte: byte j of a group holds element j in its low
nibble and element j + group/2 in its high nibble (the GGUF Q4_1 order).

SCHEMES is the one registry: each Scheme names its Format (the parts it stores with their dtypes
and shapes, and its quantize / dequantize), which the quantize phase, the ops' type checks and
reference, and the targets' lowerings all read. A new scheme of an existing format (q4 with
groups of 64) is one entry; a new format is one Format plus the targets' kernels for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from llmc.errors import LlmcError, UsageError

class QuantError(LlmcError):
    """An unknown scheme, or one that does not fit a layer."""


@dataclass(frozen=True)
class Format:
    """How a family of schemes stores a [N, K] weight in groups of G along K: the parts it keeps
    (codes first, then f16 per-group values), the codes' dtype and how many fit a byte, and its
    round trip. A new scheme is one entry of SCHEMES; a new storage format, one Format with its
    quantize and dequantize (and the targets' kernels for its bits)."""
    parts: tuple[str, ...]                               # "q" (codes), "scales"[, "mins"]
    code_dtype: str                                      # the codes' IR dtype
    codes_per_byte: int
    quantize: Callable[[np.ndarray, int], dict[str, np.ndarray]]       # (groups [N, K/G, G], G) -> parts
    dequantize: Callable[[dict[str, np.ndarray], int, int], np.ndarray]   # (parts, K, G) -> f32 [N, K]


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int            # 32, 16, 8 or 4
    group: int           # elements per scale (0 for float schemes)
    format: Format | None = None      # None: float storage (f32, f16) or the GGUF passthrough's own

    @property
    def quantized(self) -> bool:
        return 0 < self.bits <= 8

    @property
    def passthrough(self) -> bool:
        return self.name == "gguf"

    @property
    def parts(self) -> tuple[str, ...]:
        """The names of the weight parts, in the order ops take them (codes, scales[, mins])."""
        return self.format.parts if self.format else ()

    def part_types(self, rows: int, cols: int) -> list[tuple[str, tuple[int, int]]]:
        """(IR dtype, shape) of each part of a quantized [rows, cols] weight."""
        f = self.format
        return [(f.code_dtype, (rows, cols // f.codes_per_byte))] + \
               [("f16", (rows, cols // self.group))] * (len(f.parts) - 1)

    def cols(self, stored: int) -> int:
        """K of a weight whose codes hold ``stored`` bytes a row."""
        return stored * self.format.codes_per_byte

    def check_layer(self, name: str, shape: tuple[int, ...]) -> None:
        if self.quantized and shape[-1] % self.group:
            raise QuantError(f"scheme {self.name} groups {self.group} weights, which does not divide the "
                             f"{shape[-1]} inputs of {name}; choose one of {', '.join(SCHEMES)} whose group divides it")


def _int8_quantize(groups: np.ndarray, group: int) -> dict[str, np.ndarray]:
    rows = groups.shape[0]
    scale = np.abs(groups).max(axis=-1) / 127.0
    scale16 = scale.astype(np.float16)
    inverse = np.divide(1.0, scale16.astype(np.float32), out=np.zeros_like(scale), where=scale16 > 0)
    q = np.clip(np.rint(groups * inverse[..., None]), -127, 127).astype(np.int8)
    return {"q": q.reshape(rows, -1), "scales": scale16}


def _int8_dequantize(parts: dict[str, np.ndarray], cols: int, group: int) -> np.ndarray:
    q = parts["q"]
    rows = q.shape[0]
    scales = parts["scales"].astype(np.float32)[..., None]
    return (q.reshape(rows, cols // group, group).astype(np.float32) * scales).reshape(rows, cols)


def _nibble_quantize(groups: np.ndarray, group: int) -> dict[str, np.ndarray]:
    rows = groups.shape[0]
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    scale16 = ((high - low) / 15.0).astype(np.float16)
    low16 = low.astype(np.float16)
    scale = scale16.astype(np.float32)
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.clip(np.rint((groups - low16.astype(np.float32)[..., None]) * inverse[..., None]), 0, 15).astype(np.uint8)
    half = group // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return {"q": packed.reshape(rows, -1), "scales": scale16, "mins": low16}


def _nibble_dequantize(parts: dict[str, np.ndarray], cols: int, group: int) -> np.ndarray:
    q = parts["q"]
    rows = q.shape[0]
    scales = parts["scales"].astype(np.float32)[..., None]
    packed = q.reshape(rows, cols // group, group // 2)
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32)
    return (codes * scales + parts["mins"].astype(np.float32)[..., None]).reshape(rows, cols)


# symmetric: w = q * scale, q in [-127, 127]
INT8 = Format(("q", "scales"), "i8", 1, _int8_quantize, _int8_dequantize)
# asymmetric: w = q * scale + min, q in [0, 15], two codes a byte (element j low, j + G/2 high)
NIBBLE_MIN = Format(("q", "scales", "mins"), "u8", 2, _nibble_quantize, _nibble_dequantize)

SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("f32", 32, 0),
    Scheme("f16", 16, 0),
    Scheme("q8", 8, 32, INT8),
    Scheme("q4g32", 4, 32, NIBBLE_MIN),
    Scheme("q4g128", 4, 128, NIBBLE_MIN),
    Scheme("gguf", 0, 32),              # each linear keeps its GGUF blocks, re-laid out as q4g32 or q8
)}


def parse_scheme(code: str) -> Scheme:
    if not isinstance(code, str) or code not in SCHEMES:
        raise UsageError(f"unknown quantization scheme {code!r}; valid schemes: {', '.join(SCHEMES)}")
    return SCHEMES[code]


def quantize(weight: np.ndarray, scheme: Scheme) -> dict[str, np.ndarray]:
    """Round-to-nearest quantization of a [N, K] weight into the scheme's parts
    ({"q": codes, "scales": f16[, "mins": f16]})."""
    scheme.check_layer("this weight", weight.shape)
    rows, cols = weight.shape
    groups = weight.astype(np.float32).reshape(rows, cols // scheme.group, scheme.group)
    return scheme.format.quantize(groups, scheme.group)


def dequantize(parts: dict[str, np.ndarray], scheme: Scheme, cols: int) -> np.ndarray:
    """The float32 [N, K] weight that quantized parts stand for."""
    return scheme.format.dequantize(parts, cols, scheme.group)
