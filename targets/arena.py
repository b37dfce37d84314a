"""The activation arena: one block of memory per step function, its buffers placed by liveness.

Lowering records, for every buffer, its size (symbolic in ``seq``) and the first and last node
that touch it; ``plan_arena`` gives each an offset so that buffers alive at the same time never
overlap. Shared by the cpu and cuda targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from llmc import dims
from llmc.dims import Dim


@dataclass
class Buffer:
    nbytes: Dim          # symbolic in seq
    first: int           # the node indices that write it first and read it last
    last: int
    offset: int = 0
    size: int = 0        # bytes at the planned sizes, aligned


def plan_arena(buffers: list[Buffer], sizes: Mapping[str, int], align: int) -> int:
    """Offsets for every buffer (sizes evaluated at ``sizes``, e.g. seq = chunk), reusing memory
    whose live ranges do not overlap: first fit, largest buffers placed first. Returns the arena's
    size in bytes."""
    def size_of(buffer: Buffer) -> int:
        return -(-dims.evaluate(buffer.nbytes, sizes) // align) * align

    placed: list[Buffer] = []
    for buffer in sorted(buffers, key=lambda b: -dims.evaluate(b.nbytes, sizes)):
        size = size_of(buffer)
        clashes = sorted((p.offset, p.offset + p.size) for p in placed
                         if not (p.last < buffer.first or buffer.last < p.first))
        offset = 0
        for lo, hi in clashes:
            if offset + size <= lo:
                break
            offset = max(offset, hi)
        buffer.offset = offset
        buffer.size = size
        placed.append(buffer)
    return max((b.offset + b.size for b in placed), default=0)
