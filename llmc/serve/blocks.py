"""The KV pool's blocks as the engine hands them out: reference counts, a free list, and a prefix
cache of full blocks keyed by their content.

A full block's key is a hash of its parent's key and its own tokens, so equal keys mean equal
token prefixes: a sequence whose prompt starts like one seen before takes the cached blocks
instead of computing them again. A block no sequence holds but that has a key stays cached
(its KV still valid) until a new block is needed and nothing is free: then the least recently
released goes first. A sequence releases its blocks last to first, so its tail leaves the cache
before its head, which other prompts are likelier to share (vLLM's eviction order).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import Sequence

import numpy as np

ROOT = b"llmc-prefix-v1"


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: its parent's key (``ROOT`` for the first) and its tokens."""
    return hashlib.blake2b(parent + np.asarray(tokens, dtype="<i8").tobytes(), digest_size=16).digest()


class BlockPool:
    def __init__(self, blocks: int, block_size: int):
        self.blocks = blocks
        self.block_size = block_size
        self.refs = [0] * blocks
        self.key_of: list[bytes | None] = [None] * blocks
        self.by_key: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(blocks))
        self.evictable: OrderedDict[bytes, int] = OrderedDict()   # keyed, unreferenced; oldest first

    # -- counts ---------------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks a sequence can still get: the free ones and the cached ones nobody holds."""
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        return self.blocks - self.available

    @property
    def cached(self) -> int:
        """Blocks whose KV is kept for the prefix cache (held by a sequence or not)."""
        return len(self.by_key)

    # -- handing out ----------------------------------------------------------------------------

    def allocate(self) -> int | None:
        """A fresh block (held once), evicting the least recently released cached block if no
        block is free; None if every block is held."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            key, block = self.evictable.popitem(last=False)
            del self.by_key[key]
            self.key_of[block] = None
        else:
            return None
        self.refs[block] = 1
        return block

    def lookup(self, tokens: Sequence[int], limit: int) -> tuple[list[int], list[bytes]]:
        """The cached blocks that hold ``tokens``' longest prefix of full blocks covering at most
        ``limit`` tokens, each now held once more, and their keys."""
        size = self.block_size
        hits: list[int] = []
        keys: list[bytes] = []
        for at in range(0, limit - size + 1, size):
            key = block_key(keys[-1] if keys else ROOT, tokens[at: at + size])
            block = self.by_key.get(key)
            if block is None:
                break
            self.hold(block)
            hits.append(block)
            keys.append(key)
        return hits, keys

    def hold(self, block: int) -> None:
        if self.refs[block] == 0:
            key = self.key_of[block]
            if key is not None:
                del self.evictable[key]
        self.refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Give back one hold of each block, last first (see the module's note on eviction order)."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                key = self.key_of[block]
                if key is None:
                    self.free.append(block)
                else:
                    self.evictable[key] = block

    def commit(self, block: int, parent: bytes, tokens: Sequence[int]) -> bytes:
        """Record that ``block`` now holds the full block ``tokens`` after ``parent``; returns its
        key. If another block already holds the same prefix, this one stays private (both are
        valid; the first is the one shared)."""
        key = block_key(parent, tokens)
        if key not in self.by_key and self.key_of[block] is None:
            self.by_key[key] = block
            self.key_of[block] = key
        return key

    def check(self) -> None:
        """The pool's invariants (for tests): every block is exactly one of held, free or evictable."""
        held = {b for b in range(self.blocks) if self.refs[b] > 0}
        free, evictable = set(self.free), set(self.evictable.values())
        assert len(free) == len(self.free) and not (held & free) and not (held & evictable) and not (free & evictable)
        assert len(held) + len(free) + len(evictable) == self.blocks
        assert all(self.key_of[b] == k for k, b in self.by_key.items())
        assert all(self.key_of[b] is None for b in free)
