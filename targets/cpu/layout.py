"""The cpu target's own layouts of weights: what its kernels read faster than the scheme's rows.

q4g32 weights whose N is a multiple of 8 are stored in panels of eight W rows (kernels.c,
``llmc_linear_q4p``): for panel P and block b (K elements 32b .. 32b + 31) 128 bytes of codes, byte
32L + 4i + t holding row 8P + i's elements 32b + 8L + t (low nibble) and 32b + 8L + 4 + t (high
nibble); the scales and mins in the same panel-block order, lane i last. Each part keeps its
dtype, shape and size, so the artifact's tensor table is unchanged; the manifest's ``layouts``
names the weights stored this way.
"""

from __future__ import annotations

import numpy as np

PANEL = 8                # W rows a panel holds (the eight 32-bit lanes of an AVX2 vector)
Q4_PANELS = "q4g32-panels8"


def q4_panels_fit(n: int, k: int) -> bool:
    """Whether a q4g32 weight of [n, k] is stored in panels."""
    return n % PANEL == 0 and k % 32 == 0


def _codes(q: np.ndarray) -> np.ndarray:
    """4-bit codes [N, K] of a q4g32 codes part [N, K/2] (element j low, j + 16 high, per group)."""
    n, half = q.shape
    groups = q.reshape(n, half // 16, 16)
    return np.concatenate([groups & 0x0F, groups >> 4], axis=-1).reshape(n, half * 2)


def to_panels(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The q4g32 parts (q [N, K/2] u8, scales and mins [N, K/32] f16) laid out as panels."""
    q = parts["q"]
    n, k = q.shape[0], q.shape[1] * 2
    codes = _codes(q).reshape(n // PANEL, PANEL, k // 32, 4, 2, 4)       # P, i, b, L, h, t
    codes = codes.transpose(0, 2, 3, 1, 5, 4)                           # P, b, L, i, t, h
    packed = (codes[..., 0] | (codes[..., 1] << 4)).astype(np.uint8)
    out = {"q": np.ascontiguousarray(packed.reshape(n, k // 2))}
    for name in ("scales", "mins"):
        v = parts[name].reshape(n // PANEL, PANEL, k // 32).transpose(0, 2, 1)
        out[name] = np.ascontiguousarray(v.reshape(n, k // 32))
    return out


def from_panels(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of ``to_panels``: q4g32 parts in the scheme's row layout."""
    q = parts["q"]
    n, k = q.shape[0], q.shape[1] * 2
    packed = q.reshape(n // PANEL, k // 32, 4, PANEL, 4)                   # P, b, L, i, t
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1)             # P, b, L, i, t, h
    codes = codes.transpose(0, 3, 1, 2, 5, 4).reshape(n, k // 32, 32)    # P, i, b, L, h, t
    rows = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)
    out = {"q": np.ascontiguousarray(rows.reshape(n, k // 2))}
    for name in ("scales", "mins"):
        v = parts[name].reshape(n // PANEL, k // 32, PANEL).transpose(0, 2, 1)
        out[name] = np.ascontiguousarray(v.reshape(n, k // 32))
    return out
