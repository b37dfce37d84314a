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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from llmc.errors import LlmcError, UsageError

SCHEMES = ("f32", "f16", "q8", "q4g32", "q4g128", "gguf")


class QuantError(LlmcError):
    """An unknown scheme, or one that does not fit a layer."""


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int            # 32, 16, 8 or 4
    group: int           # elements per scale (0 for float schemes)
    symmetric: bool

    @property
    def quantized(self) -> bool:
        return 0 < self.bits <= 8

    @property
    def passthrough(self) -> bool:
        return self.name == "gguf"

    def check_layer(self, name: str, shape: tuple[int, ...]) -> None:
        if self.quantized and shape[-1] % self.group:
            raise QuantError(f"scheme {self.name} groups {self.group} weights, which does not divide the "
                             f"{shape[-1]} inputs of {name}; choose one of {', '.join(SCHEMES)} whose group divides it")


def parse_scheme(code: str) -> Scheme:
    m = re.fullmatch(r"f32|f16|q8|gguf|q4g(\d+)", code or "")
    if not m or code not in SCHEMES:
        raise UsageError(f"unknown quantization scheme {code!r}; valid schemes: {', '.join(SCHEMES)}")
    if code == "gguf":
        return Scheme(code, 0, 32, False)
    if code == "f32":
        return Scheme(code, 32, 0, True)
    if code == "f16":
        return Scheme(code, 16, 0, True)
    if code == "q8":
        return Scheme(code, 8, 32, True)
    return Scheme(code, 4, int(m.group(1)), False)


def quantize(weight: np.ndarray, scheme: Scheme) -> dict[str, np.ndarray]:
    """Round-to-nearest quantization of a [N, K] weight: {"q": codes, "scales": f16[, "mins": f16]}."""
    scheme.check_layer("this weight", weight.shape)
    rows, cols = weight.shape
    groups = weight.astype(np.float32).reshape(rows, cols // scheme.group, scheme.group)
    if scheme.symmetric:
        scale = np.abs(groups).max(axis=-1) / 127.0
        scale16 = scale.astype(np.float16)
        inverse = np.divide(1.0, scale16.astype(np.float32), out=np.zeros_like(scale), where=scale16 > 0)
        q = np.clip(np.rint(groups * inverse[..., None]), -127, 127).astype(np.int8)
        return {"q": q.reshape(rows, cols), "scales": scale16}
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    scale16 = ((high - low) / 15.0).astype(np.float16)
    low16 = low.astype(np.float16)
    scale = scale16.astype(np.float32)
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.clip(np.rint((groups - low16.astype(np.float32)[..., None]) * inverse[..., None]), 0, 15).astype(np.uint8)
    half = scheme.group // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return {"q": packed.reshape(rows, cols // 2), "scales": scale16, "mins": low16}


def dequantize(parts: dict[str, np.ndarray], scheme: Scheme, cols: int) -> np.ndarray:
    """The float32 [N, K] weight that quantized parts stand for."""
    q = parts["q"]
    rows = q.shape[0]
    scales = parts["scales"].astype(np.float32)[..., None]
    if scheme.symmetric:
        return (q.reshape(rows, cols // scheme.group, scheme.group).astype(np.float32) * scales).reshape(rows, cols)
    half = scheme.group // 2
    packed = q.reshape(rows, cols // scheme.group, half)
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32)
    return (codes * scales + parts["mins"].astype(np.float32)[..., None]).reshape(rows, cols)
