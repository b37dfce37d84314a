"""Strided views: how a target addresses a tensor without copying it (shared by cpu and cuda).

A value in generated code is a base (a C pointer expression on the cpu target, a named device
buffer on cuda) plus an element offset, a shape and element strides, all symbolic dims (``seq``,
``rows``, ...). reshape, permute, slice and
expand only make new views; a kernel that needs rows or a contiguous block asks for them and gets
``None`` when the view cannot give them, and the lowering then copies the view into a buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llmc import dims
from llmc.dims import Dim


def c_dim(d: Dim) -> str:
    """A dim as a C expression over the generated function's variables (seq, rows, blocks, ...)."""
    return str(d) if isinstance(d, int) else f"({d})"


def contiguous_strides(shape: tuple[Dim, ...]) -> tuple[Dim, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step = dims.mul(step, size)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class View:
    dtype: str
    shape: tuple[Dim, ...]
    strides: tuple[Dim, ...]
    base: str | None = None          # where the data lives (target-defined text); None for a literal
    offset: Dim = 0
    literal: str | None = None       # a scalar expression broadcast over the shape (consts)
    buffer: int | None = None        # the planned buffer it lives in, for liveness

    @staticmethod
    def of_buffer(dtype: str, shape, base: str, buffer: int | None = None) -> "View":
        shape = tuple(shape)
        return View(dtype, shape, contiguous_strides(shape), base, 0, None, buffer)

    @staticmethod
    def scalar(dtype: str, expression: str, shape=()) -> "View":
        return View(dtype, tuple(shape), tuple(0 for _ in shape), literal=expression)

    def pointer(self, ctype: str) -> str:
        """A typed C pointer to this view's first element."""
        start = f"(({ctype}*)({self.base}))"
        return start if self.offset == 0 else f"({start} + {c_dim(self.offset)})"

    @property
    def contiguous(self) -> bool:
        if self.literal is not None:
            return False
        want = contiguous_strides(self.shape)
        return all(s == w for size, s, w in zip(self.shape, self.strides, want) if size != 1)

    def rows(self) -> tuple[Dim, Dim] | None:
        """(row count, row stride) when the view is rows of its last axis, each contiguous and
        evenly spaced; None otherwise."""
        if self.literal is not None or not self.shape or (self.shape[-1] != 1 and self.strides[-1] != 1):
            return None
        lead = [(size, stride) for size, stride in zip(self.shape[:-1], self.strides[:-1]) if size != 1]
        count = dims.product(size for size, _ in lead)
        if not lead:
            return count, self.shape[-1]
        step = lead[-1][1]
        expected = step
        for size, stride in reversed(lead):
            if stride != expected:
                return None
            expected = dims.mul(expected, size)
        return count, step

    # -- view ops --------------------------------------------------------------------------

    def permute(self, perm) -> "View":
        return replace(self, shape=tuple(self.shape[p] for p in perm), strides=tuple(self.strides[p] for p in perm))

    def slice(self, axis: int, start: Dim, end: Dim, step: int, length: Dim) -> "View":
        shape = self.shape[:axis] + (length,) + self.shape[axis + 1:]
        strides = self.strides[:axis] + (dims.mul(self.strides[axis], step),) + self.strides[axis + 1:]
        offset = self.offset if self.literal is not None else dims.add(self.offset, dims.mul(start, self.strides[axis]))
        return replace(self, shape=shape, strides=strides, offset=offset)

    def expand(self, shape) -> "View":
        shape = tuple(shape)
        lead = len(shape) - len(self.shape)
        strides = [0] * lead
        for size, old_size, stride in zip(shape[lead:], self.shape, self.strides):
            strides.append(stride if old_size == size else 0)
        return replace(self, shape=shape, strides=tuple(strides))

    def reshape(self, shape) -> "View | None":
        """The same elements under a new shape, or None when that needs a copy."""
        shape = tuple(shape)
        if self.literal is not None:
            return replace(self, shape=shape, strides=tuple(0 for _ in shape))
        if self.contiguous:
            return replace(self, shape=shape, strides=contiguous_strides(shape))
        # Runs of old axes that are contiguous with each other form segments; each segment must
        # be exactly a run of new axes (by product), which then step through it contiguously.
        segments: list[tuple[Dim, Dim]] = []          # (size, stride of its innermost axis)
        for size, stride in zip(self.shape, self.strides):
            if size == 1:
                continue
            if segments and segments[-1][1] == dims.mul(size, stride):
                segments[-1] = (dims.mul(segments[-1][0], size), stride)
            else:
                segments.append((size, stride))
        new_strides: list[Dim] = [0] * len(shape)
        axis = 0
        for size, inner in segments:
            group: list[int] = []
            total: Dim = 1
            while axis < len(shape) and total != size:
                if shape[axis] != 1:
                    total = dims.mul(total, shape[axis])
                group.append(axis)
                axis += 1
            if total != size:
                return None
            step = inner
            for a in reversed(group):
                new_strides[a] = step
                step = dims.mul(step, shape[a])
        if any(shape[a] != 1 for a in range(axis, len(shape))):
            return None
        return replace(self, shape=shape, strides=tuple(new_strides))
