"""The cpu target's own layouts of weights: what its kernels read faster than the scheme's rows.

Quantized weights in groups of 32 whose N is a multiple of 8 are stored in panels of eight W rows
(kernels.c, ``llmc_linear_panels``), so that one 32-bit lane of an AVX2 vector
holds four codes of one W row:

- q4g32 (``q4g32-panels8``): for panel P and block b (K elements 32b .. 32b + 31) 128 bytes of
  codes, byte 32L + 4i + t holding row 8P + i's elements 32b + 8L + t (low nibble) and
  32b + 8L + 4 + t (high nibble);
- q8 (``q8-panels8``): 256 bytes, byte 32L + 4i + t holding row 8P + i's element 32b + 4L + t;

and the scales (and mins) in the same panel-block order, lane i last. Each part keeps its dtype,
shape and size, so the artifact's tensor table is unchanged; the manifest's ``layouts`` names the
weights stored this way.
"""

from __future__ import annotations

import numpy as np

PANEL = 8                # W rows a panel holds (the eight 32-bit lanes of an AVX2 vector)
LAYOUTS = {4: "q4g32-panels8", 8: "q8-panels8"}     # by the codes' bits


def panels_fit(bits: int, group: int, n: int, k: int) -> bool:
    """Whether a quantized [n, k] weight is stored in panels."""
    return bits in LAYOUTS and group == 32 and n % PANEL == 0 and k % 32 == 0


def _nibbles(q: np.ndarray) -> np.ndarray:
    """4-bit codes [N, K] of a q4g32 codes part [N, K/2] (element j low, j + 16 high, per group)."""
    n, half = q.shape
    groups = q.reshape(n, half // 16, 16)
    return np.concatenate([groups & 0x0F, groups >> 4], axis=-1).reshape(n, half * 2)


def _group_values(v: np.ndarray, n: int, blocks: int, inverse: bool = False) -> np.ndarray:
    """Per-group values [N, K/32] in panel-block order (or back)."""
    if inverse:
        return np.ascontiguousarray(v.reshape(n // PANEL, blocks, PANEL).transpose(0, 2, 1).reshape(n, blocks))
    return np.ascontiguousarray(v.reshape(n // PANEL, PANEL, blocks).transpose(0, 2, 1).reshape(n, blocks))


def to_panels(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The parts of a q4g32 (q [N, K/2] u8, scales and mins [N, K/32] f16) or q8 (q [N, K] i8,
    scales) weight laid out as panels."""
    q = parts["q"]
    n = q.shape[0]
    if q.dtype == np.int8:                                                # q8
        k = q.shape[1]
        codes = q.reshape(n // PANEL, PANEL, k // 32, 8, 4).transpose(0, 2, 3, 1, 4)       # P, b, L, i, t
        laid = np.ascontiguousarray(codes.reshape(n, k))
    else:
        k = q.shape[1] * 2
        codes = _nibbles(q).reshape(n // PANEL, PANEL, k // 32, 4, 2, 4)   # P, i, b, L, h, t
        codes = codes.transpose(0, 2, 3, 1, 5, 4)                           # P, b, L, i, t, h
        laid = np.ascontiguousarray((codes[..., 0] | (codes[..., 1] << 4)).astype(np.uint8).reshape(n, k // 2))
    return {"q": laid, **{name: _group_values(v, n, k // 32) for name, v in parts.items() if name != "q"}}


def from_panels(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of ``to_panels``: the parts in the scheme's row layout."""
    q = parts["q"]
    n = q.shape[0]
    if q.dtype == np.int8:
        k = q.shape[1]
        rows = np.ascontiguousarray(q.reshape(n // PANEL, k // 32, 8, PANEL, 4).transpose(0, 3, 1, 2, 4).reshape(n, k))
    else:
        k = q.shape[1] * 2
        packed = q.reshape(n // PANEL, k // 32, 4, PANEL, 4)                   # P, b, L, i, t
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1)             # P, b, L, i, t, h
        codes = codes.transpose(0, 3, 1, 2, 5, 4).reshape(n, k // 32, 32)    # P, i, b, L, h, t
        rows = np.ascontiguousarray((codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8).reshape(n, k // 2))
    return {"q": rows, **{name: _group_values(v, n, k // 32, inverse=True) for name, v in parts.items() if name != "q"}}
