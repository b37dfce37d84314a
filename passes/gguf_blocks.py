"""GGUF passthrough: quantized weights keep the blocks of the GGUF they came from.

A GGUF source's float weights are its blocks dequantized, so each row of a final linear weight
(after q/k un-permutation and Q/K/V or gate/up merging, which only move whole rows) is found
again by an exact digest of its bytes among the GGUF's rows. The blocks are then re-laid out
without any arithmetic: Q4_1 -> q4g32 (scale d, min m, same nibble order), Q4_0 -> q4g32
(min = -8 d, exact in f16), Q8_0 -> q8. No dequantize-then-requantize error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from llmc.frontend.gguf_file import Q4_0, Q4_1, Q8_0, GGUFFile

PASSTHROUGH = {Q4_0: "q4g32", Q4_1: "q4g32", Q8_0: "q8"}
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}


def _digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


class GGUFRows:
    """Every row of the file's Q4_0/Q4_1/Q8_0 tensors, findable by the digest of its float values."""

    def __init__(self, path: Path):
        self.file = GGUFFile(path)
        self.rows: dict[bytes, tuple[str, int]] = {}
        for name, info in self.file.tensors.items():
            if info.ggml_type in PASSTHROUGH and len(info.shape) == 2:
                for index, row in enumerate(self.file.dequantize(name)):
                    self.rows.setdefault(_digest(row), (name, index))
        self.file.release_pages()

    def parts_for(self, weight: np.ndarray) -> tuple[str, dict[str, np.ndarray]] | None:
        """(scheme, parts) holding exactly ``weight``'s values, or None if any row is not found
        or the rows come from tensors of different types."""
        found = [self.rows.get(_digest(row)) for row in weight]
        if any(f is None for f in found):
            return None
        kinds = {self.file.tensors[name].ggml_type for name, _ in found}
        if len(kinds) != 1:
            return None
        kind = kinds.pop()
        blocks_per_row = weight.shape[1] // 32
        block = _BLOCK_BYTES[kind]
        rows = np.empty((weight.shape[0], blocks_per_row * block), np.uint8)
        raw: dict[str, np.ndarray] = {}
        for out_row, (name, index) in enumerate(found):
            if name not in raw:
                raw[name] = self.file.raw(name).reshape(self.file.tensors[name].shape[0], -1)
            rows[out_row] = raw[name][index]
        layout = [("d", "<f2")] + ([("m", "<f2")] if kind == Q4_1 else []) + \
                 [("qs", "i1" if kind == Q8_0 else "u1", 32 if kind == Q8_0 else 16)]
        blocks = rows.reshape(-1).view(np.dtype(layout)).reshape(weight.shape[0], blocks_per_row)
        codes = np.ascontiguousarray(blocks["qs"].reshape(weight.shape[0], -1))
        scales = np.ascontiguousarray(blocks["d"])
        if kind == Q8_0:
            return "q8", {"q": codes, "scales": scales}
        mins = np.ascontiguousarray(blocks["m"]) if kind == Q4_1 else (scales.astype(np.float32) * -8).astype(np.float16)
        return "q4g32", {"q": codes, "scales": scales, "mins": mins}
