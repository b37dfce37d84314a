"""A GGUF reader: header, metadata and tensor directory parsed straight from a memory map.

It exists for speed and memory: tensors are views into the map until one is dequantized, and
the metadata parser reads the tokenizer's 100k-string arrays in one pass. Q4_0, Q4_1, Q8_0 and
the float types dequantize here with vectorised numpy; other quantization types go through
gguf-py's reference dequantizer. Every malformed or truncated file raises SourceError.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import SourceError

# GGUF metadata value types.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types this module dequantizes itself: type -> (name, elements per block, bytes per block).
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_OWN_TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q4_0: ("Q4_0", 32, 18), Q4_1: ("Q4_1", 32, 20),
              Q8_0: ("Q8_0", 32, 34), BF16: ("BF16", 1, 2)}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]       # numpy order (GGUF lists the fastest-varying dimension first)
    ggml_type: int
    offset: int                  # absolute offset in the file
    nbytes: int


class GGUFFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read {self.path}: {exc}") from None
        if self._map[:4] != b"GGUF":
            raise SourceError(f"{self.path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError, ValueError) as exc:
            raise SourceError(f"{self.path} is not a valid GGUF file ({exc}); is it truncated or corrupt?") from None

    # -- parsing ---------------------------------------------------------------------------

    def _read(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._map, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._read("<Q")
        if length > len(self._map) - self._pos:
            raise ValueError(f"a string of {length} bytes runs past the end of the file")
        text = self._map[self._pos:self._pos + length].decode("utf-8")
        self._pos += length
        return text

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._read(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item_kind, count = self._read("<I"), self._read("<Q")
            if item_kind in _SCALARS and item_kind != 7:
                dtype = np.dtype(_SCALARS[item_kind])
                end = self._pos + count * dtype.itemsize
                if end > len(self._map):
                    raise ValueError("an array runs past the end of the file")
                array = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos).copy()
                self._pos = end
                return array.tolist()
            return [self._value(item_kind) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {kind}")

    def _parse(self) -> None:
        self._pos = 4
        self.version = self._read("<I")
        if self.version not in (2, 3):
            raise SourceError(f"{self.path} is GGUF version {self.version}; llmc reads versions 2 and 3")
        tensor_count, kv_count = self._read("<Q"), self._read("<Q")
        if tensor_count > 1_000_000 or kv_count > 1_000_000:
            raise ValueError("implausible tensor or metadata count")
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            n_dims = self._read("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            ne = [self._read("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(ne)), self._read("<I"), self._read("<Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            block, block_bytes = _block_size(ggml_type)
            count = int(np.prod(shape, dtype=np.int64))
            if shape and shape[-1] % block:
                raise ValueError(f"tensor {name}: row of {shape[-1]} is not a whole number of blocks")
            nbytes = count // block * block_bytes
            start = data_start + offset
            if start + nbytes > len(self._map):
                raise ValueError(f"tensor {name} runs past the end of the file")
            self.tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)

    # -- access ----------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (a view into the file map)."""
        info = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def release_pages(self) -> None:
        """Drop the file's pages from this process's memory (they are re-read if needed again)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy shape order."""
        info = self.tensors[name]
        data = self.raw(name)
        kind = info.ggml_type
        if kind == F32:
            out = data.view(np.float32).copy()
        elif kind == F16:
            out = data.view(np.float16).astype(np.float32)
        elif kind == BF16:
            out = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif kind == Q8_0:
            blocks = data.view(np.dtype([("d", "<f2"), ("qs", "i1", 32)]))
            out = blocks["qs"].astype(np.float32)
            out *= blocks["d"].astype(np.float32)[:, None]
        elif kind in (Q4_0, Q4_1):
            layout = [("d", "<f2")] + ([("m", "<f2")] if kind == Q4_1 else []) + [("qs", "u1", 16)]
            blocks = data.view(np.dtype(layout))
            qs = blocks["qs"]
            # Each block's low nibbles are its elements 0..15, the high nibbles 16..31.
            out = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
            if kind == Q4_0:
                out -= 8.0
            out *= blocks["d"].astype(np.float32)[:, None]
            if kind == Q4_1:
                out += blocks["m"].astype(np.float32)[:, None]
        else:
            import gguf

            out = np.asarray(gguf.quants.dequantize(data.reshape(-1), gguf.GGMLQuantizationType(kind)), np.float32)
        return out.reshape(info.shape)


def _block_size(ggml_type: int) -> tuple[int, int]:
    if ggml_type in _OWN_TYPES:
        return _OWN_TYPES[ggml_type][1:]
    import gguf

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown ggml tensor type {ggml_type}") from None
