"""The initializers an onnx artifact's executor hands ONNX Runtime, made at load from the
artifact's tensors (numpy only: the runtime side). A float weight is the artifact's own bytes; a
quantized linear's parts become MatMulNBits's, with its default zero point (8 for 4 bits, 128 for
8), whose kernels are its fast ones:

- "nibbles": q4 codes, two a byte in element order (llmc keeps element j with j + G/2, GGUF's order)
- "bytes":   q8 codes offset by 128
- "scales":  the f16 scales, one per group, in the activations' dtype (MatMulNBits's T)
- "offsets": a q4 group's min plus 8 scales, [K/G, N]: w = q s + min = (q - 8) s + (min + 8 s), the
  second term added as the group sums of x times these

A float initializer is converted at load to the dtype its record declares (f16 in a build with f16
activations; the artifact keeps the weights as every target reads them). Records that differ only
in shape (a tied embedding's GatherBlockQuantized and its lm_head's MatMulNBits) share one array.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from llmc.artifact import ArtifactError
from llmc.types import FLOAT_DTYPES, numpy_dtype

KINDS = ("weight", "nibbles", "bytes", "scales", "offsets")


def make(kind: str, sources: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    if kind == "weight":
        return sources[0]
    q = sources[0]
    rows = q.shape[0]
    if kind == "nibbles":
        groups = q.reshape(rows, sources[1].size // rows, -1)          # [N, K/G, G/2]: j low, j + G/2 high
        codes = np.concatenate([groups & 0x0F, groups >> 4], axis=-1)  # [N, K/G, G] in element order
        return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    if kind == "bytes":
        return (q.astype(np.int16) + 128).astype(np.uint8).reshape(shape)
    scales = sources[1].astype(np.float32)
    if kind == "scales":
        return scales.reshape(-1)
    if kind == "offsets":
        return np.ascontiguousarray((sources[2].astype(np.float32) + 8 * scales).T)
    raise ValueError(f"unknown initializer kind {kind!r}")


def initializers(artifact) -> Iterator[tuple[str, np.ndarray]]:
    """(name, contiguous array of its declared dtype and shape) of each initializer the artifact's
    onnx entry records, made from its tensors; an ArtifactError for one that comes out otherwise."""
    tensors = artifact.weights()
    made: dict[tuple, np.ndarray] = {}      # one array for the records that differ only in shape
    for name, kind, sources, dtype, shape in artifact.manifest["target"]["initializers"]:
        key = (kind, tuple(sources), dtype)
        if key not in made:
            array = make(kind, [tensors[s] for s in sources], tuple(shape))
            if dtype in FLOAT_DTYPES and array.dtype.kind == "f":     # a build with f16 activations: f16 weights
                array = array.astype(numpy_dtype(dtype), copy=False)
            made[key] = np.ascontiguousarray(array)
        array = made[key]
        if array.dtype != numpy_dtype(dtype) or array.size != int(np.prod(shape, dtype=np.int64)):
            raise ArtifactError(f"{artifact.path}: initializer {name} is not {dtype}{list(shape)}; rebuild the artifact")
        yield name, array.reshape(shape)
