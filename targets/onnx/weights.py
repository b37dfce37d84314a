"""The initializers an onnx artifact's executor hands ONNX Runtime, made at load from the
artifact's tensors (numpy only: the runtime side). A float weight is the artifact's own bytes; a
quantized linear's parts become MatMulNBits's:

- "nibbles": q4 codes, two a byte in element order (llmc keeps element j with j + G/2, GGUF's order)
- "bytes":   q8 codes offset by 128 (MatMulNBits's 8-bit codes are unsigned around 128)
- "scales":  the f16 scales as f32, one per group
- "zero_points": a q4 group's min as a float zero point: w = (q - zp) * s = q * s + min, with
  zp = -min / s; a group of scale 0 (one value) gets scale min and zero point code - 1
"""

from __future__ import annotations

import numpy as np


def make(kind: str, sources: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    if kind == "weight":
        return sources[0]
    q = sources[0]
    rows = q.shape[0]
    if kind == "nibbles":
        groups = q.reshape(rows, shape[1], shape[2])                   # [N, K/G, G/2]: j low, j + G/2 high
        codes = np.concatenate([groups & 0x0F, groups >> 4], axis=-1)  # [N, K/G, G] in element order
        return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    if kind == "bytes":
        return (q.astype(np.int16) + 128).astype(np.uint8).reshape(shape)
    scales = sources[1].astype(np.float32).reshape(-1)
    if kind == "scales":
        return np.where(scales == 0, _constant_groups(sources)[0], scales).astype(np.float32) \
            if len(sources) > 2 else scales
    if kind == "zero_points":
        mins = sources[2].astype(np.float32).reshape(-1)
        single, code = _constant_groups(sources)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.where(scales == 0, code - 1.0, -mins / scales)
        return zero.astype(np.float32)
    raise ValueError(f"unknown initializer kind {kind!r}")


def _constant_groups(sources: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(the min, the first code) of each group: what a group of scale 0 stands for."""
    q, scales, mins = sources
    groups = scales.size
    first = (q.reshape(groups, -1)[:, 0] & 0x0F).astype(np.float32)
    return mins.astype(np.float32).reshape(-1), first
