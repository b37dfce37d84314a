"""The onnx target's runtime side: an ONNX Runtime InferenceSession over the artifact's model, its
initializers made from the artifact's tensors (weights.py), the ABI's host KV pool, and beside it
each sequence's keys and values laid out contiguously (``Rows``) for GroupQueryAttention, which
appends to them in place. Imports numpy and onnxruntime only.

A step: the executor finds each sequence's row (its own from the last step, or one filled from the
pool: after a prefix-cache hit, a preemption, or a prefill another row served), runs the model with
the rows bound as both GroupQueryAttention's past and present (so ORT writes the new tokens into
them), and copies the step's keys and values from the rows into the pool's slots, which stay the
truth every row is checked against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from llmc.artifact import ArtifactError
from llmc.errors import LlmcError
from llmc.ops import kv_slots
from llmc.types import numpy_dtype

from .. import pool_arrays
from . import PROVIDERS, ort_too_old
from .weights import initializers

KEPT_LOGITS = 8         # a step's logit rows up to this land in one buffer kept bound (a decode's); more, a fresh array


class OnnxExecutor:
    def __init__(self, artifact, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise LlmcError(f"{artifact.path} is an onnx build: running it needs onnxruntime "
                            "(pip install 'llmc-compiler[onnx]')") from None
        too_old = ort_too_old(ort.__version__)
        if too_old:
            raise LlmcError(f"{artifact.path} is an onnx build: running it {too_old}")
        self.ort = ort
        self.artifact = artifact
        target = artifact.manifest["target"]
        provider = PROVIDERS[target["provider"]]
        if provider not in ort.get_available_providers():
            raise LlmcError(f"{artifact.path} was built for ONNX Runtime's {provider}, which this onnxruntime lacks "
                            f"(it has {', '.join(ort.get_available_providers())}); rebuild with --provider cpu")
        self.threads = max(1, int(threads or len(os.sched_getaffinity(0))))
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        made = dict(initializers(artifact))
        self._initializers = list(made.values())        # the arrays ORT reads: kept alive with the session
        options.add_external_initializers(list(made), [ort.OrtValue.ortvalue_from_numpy(a) for a in made.values()])
        try:
            self.session = ort.InferenceSession(bytes(artifact.section("onnx")), options, providers=[provider])
        except Exception as exc:    # ORT raises its own types for a model it cannot run
            raise ArtifactError(f"{artifact.path}: ONNX Runtime cannot load its model ({str(exc)[:200]}); "
                                "rebuild the artifact") from None
        self.inputs = {i.name for i in self.session.get_inputs()}
        # A lone token on the last step's row changes four inputs when the graph reads no others
        # of the batch's (no seq_index, no block_tables): then only those four are written.
        self.lean = {"tokens", "positions", "seqlens_k", "total_length"} <= self.inputs and \
            not {"seq_index", "block_tables"} & self.inputs
        pool = artifact.manifest["kv_pool"]
        self.block_size = int(pool["block_size"])
        self.vocab = int(artifact.manifest["vocab_size"])
        self.rows_dtype = numpy_dtype(target.get("act_dtype", "f32"))
        self.layers, self.kv_heads, self.head_dim = int(pool["layers"]), int(pool["kv_heads"]), int(pool["head_dim"])
        self.pool: list[np.ndarray] = []
        self.rows: Rows | None = None
        self.binding = self.session.io_binding()
        self.bound: tuple | None = None         # the rows' growth and the batch the binding holds
        self.lone: tuple | None = None          # (row, batch) of the lone token the bound inputs lay out
        self.cache_values: list = []            # their OrtValues, kept alive while bound
        self.buffers: dict[str, np.ndarray] = {}    # the arrays bound as inputs and as the logits

    def allocate_pool(self, blocks: int) -> int:
        self.pool = pool_arrays(self.artifact, blocks)
        self.rows = Rows(self.layers, self.kv_heads, self.head_dim, self.block_size, self.rows_dtype, blocks)
        self.bound = self.lone = None
        return sum(a.nbytes for a in self.pool)

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        k_cache, v_cache = self.pool
        feed = {name: np.ascontiguousarray(value, dtype=np.int64) for name, value in inputs.items()}
        positions, seq_index, tables = feed["positions"], feed["seq_index"], feed["block_tables"]
        blocks, offsets = kv_slots(positions, seq_index, tables, k_cache.shape[1], self.block_size)
        layout = self.rows.place(positions, seq_index, tables, self.pool)
        binding = self.binding
        if self.lean and layout.lone is not None and layout.lone == self.lone:
            # A lone token again on the row and batch of the last step's: of the bound inputs
            # only the token, its position and its row's length change.
            (r, first, _), = layout.rows.values()
            self.buffers["tokens"][0], self.buffers["positions"][0] = feed["tokens"][0], first
            self.buffers["seqlens_k"][r], self.buffers["total_length"][...] = first, layout.total
        else:
            feed.update(self.rows.inputs(layout, positions))
            for name, value in feed.items():
                if name in self.inputs:
                    self.bind(name, value)
            self.lone = layout.lone
        wanted = feed["logit_rows"].size
        logits = self.buffers.get("logits")
        if logits is None or logits.shape[0] != wanted:       # ORT writes the logits here
            logits = np.empty((wanted, self.vocab), np.float32)
            binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            self.buffers["logits"] = logits
        if wanted > KEPT_LOGITS:      # a prefill's every row: its own array, not kept (nor copied)
            del self.buffers["logits"]
        caches = (self.rows.grown, layout.batch)
        if caches != self.bound:          # the rows' buffers, bound as they were unless grown or the batch changed
            self.cache_values = []
            for layer in range(self.layers):
                for which, cache in (("k", self.rows.k), ("v", self.rows.v)):
                    value = self.ort.OrtValue.ortvalue_from_numpy(cache[layer, :layout.batch])
                    binding.bind_ortvalue_input(f"past_{which}.{layer}", value)
                    binding.bind_ortvalue_output(f"present_{which}.{layer}", value)     # GQA appends in place
                    self.cache_values.append(value)
            self.bound = caches
        self.session.run_with_iobinding(binding)
        if layout.lone is not None:       # a lone decode token: plain indexing, no gather
            (r, p, _), = layout.rows.values()
            b, o = int(blocks.item(0)), int(offsets.item(0))
            k_cache[:, b, :, o], v_cache[:, b, :, o] = self.rows.k[:, r, :, p], self.rows.v[:, r, :, p]
        else:
            rows = layout.token_rows
            k_cache[:, blocks, :, offsets] = self.rows.k[:, rows, :, positions]    # [seq, layers, kv_heads, head_dim]
            v_cache[:, blocks, :, offsets] = self.rows.v[:, rows, :, positions]
        self.rows.written(layout, blocks)
        return logits.copy() if wanted <= KEPT_LOGITS else logits       # a kept buffer is the next step's

    def bind(self, name: str, value: np.ndarray) -> None:
        """An input of the step, copied into the buffer bound to it when the shape is the bound one
        (a decode's every step), else bound afresh."""
        held = self.buffers.get(name)
        if held is not None and held.shape == value.shape and held.dtype == value.dtype:
            held[...] = value
            return
        self.buffers[name] = value = np.array(value)          # its own: the caller's array may change
        self.binding.bind_cpu_input(name, value)


@dataclass
class Row:
    """One row of the contiguous caches: its positions [0, length) hold the keys and values the
    pool holds in ``blocks`` (one a block_size positions), unless a step has written one of those
    blocks through another row since (Rows.written then cuts the row short of it)."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    used: int = 0


@dataclass
class Layout:
    """A step laid out for GroupQueryAttention: the rows its sequences use (batch entries 0..batch-1,
    the others idle), each sequence's (row, first position, tokens) and its block table's blocks
    the step reaches, and per token its row (None for a lone token, whose row and batch are
    ``lone``)."""

    batch: int
    chunk: int
    total: int                                # GroupQueryAttention's total_length
    rows: dict[int, tuple[int, int, int]]     # sequence -> (row, first position, tokens)
    tables: dict[int, list[int]]              # sequence -> its blocks for positions [0, first + tokens)
    token_rows: np.ndarray | None
    offsets: np.ndarray | None                # per token, its place in its row's chunk
    lone: tuple[int, int] | None = None


def _spans(positions: np.ndarray, seq_index: np.ndarray) -> tuple[dict[int, tuple[int, int]], np.ndarray | None]:
    """Each sequence of the step as {sequence: (its first position, its tokens)}, and per token its
    sequence's place in that order (None when the step is one sequence's); an LlmcError unless each
    sequence's tokens are consecutive positions."""
    if positions.size == 1:                             # a lone decode token
        return {int(seq_index.item(0)): (int(positions.item(0)), 1)}, None
    if seq_index.min() == seq_index.max():              # one sequence (a prefill)
        sequences, inverse, counts = seq_index[:1], None, np.array([positions.size])
        firsts, lasts = positions.min(keepdims=True), positions.max(keepdims=True)
    else:
        sequences, inverse, counts = np.unique(seq_index, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        firsts = np.minimum.reduceat(positions[order], starts)
        lasts = np.maximum.reduceat(positions[order], starts)
    if (lasts - firsts + 1 != counts).any():          # positions are distinct (the ABI's check): a run or not
        s = int(sequences[np.argmax(lasts - firsts + 1 != counts)])
        raise LlmcError(f"the onnx target takes a sequence's tokens in one step at consecutive positions; "
                        f"sequence {s} has positions {sorted(positions[seq_index == s].tolist())[:8]}")
    return dict(zip(sequences.tolist(), zip(firsts.tolist(), counts.tolist()))), inverse


class Rows:
    """Each sequence's keys and values, contiguous per head as GroupQueryAttention reads them:
    [layers, rows, kv_heads, capacity, head_dim] for k and for v, grown (doubled) as sequences
    and lengths need (untouched pages cost no memory). A row serves a sequence whose block table
    starts with the row's blocks: the pool's blocks are written only by steps, and a step that
    writes a block cuts every other row holding it short of that block, so a row holds what the
    pool holds. Where a row stops agreeing it is filled from the pool: a row is only ever a faster
    way to read the pool."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, block_size: int, dtype, blocks: int):
        self.shape = (layers, kv_heads, head_dim)
        self.block_size = block_size
        self.dtype = dtype
        self.rows: list[Row] = []
        self.holders: dict[int, set[int]] = {}         # pool block -> the rows whose blocks include it
        self.most = 4                                   # rows kept: the most sequences a step has had, and 2
        self.clock = 0
        self.k = self.v = np.zeros((layers, 0, kv_heads, 0, head_dim), dtype)
        self.grown = 0                                  # times k and v were made anew

    def place(self, positions: np.ndarray, seq_index: np.ndarray, tables: np.ndarray, pool) -> Layout:
        """A row for each sequence in the step, holding its positions before the step's: first the
        sequences that continue the row they left (every block of it theirs: also a step back, as
        a rerun or a rejected draft makes), then the others (a row least recently used, or a new
        one, filled from the pool)."""
        self.clock += 1
        spans, inverse = _spans(positions, seq_index)
        self.most = max(self.most, len(spans) + 2)
        # GroupQueryAttention wants room for every entry's cached tokens plus the padded chunk
        chunk = max(count for _, count in spans.values())
        self._grow(len(self.rows), max(max(first for first, _ in spans.values()) + chunk + 1, positions.size))
        size = self.block_size
        reached = {s: tables[s, :-(-(first + count) // size)].tolist() for s, (first, count) in spans.items()}
        placed: dict[int, tuple[int, int, int]] = {}
        for s, (first, count) in spans.items():
            for r, row in enumerate(self.rows):
                if row.used != self.clock and row.length >= first and self._continued(row, reached[s], tables[s]):
                    self._take(r, reached[s], first)
                    placed[s] = (r, first, count)
                    break
        for s, (first, count) in spans.items():
            if s not in placed:
                placed[s] = (self._refill(reached[s], first, pool), first, count)
        batch = max(r for r, _, _ in placed.values()) + 1
        total = max(max(first + count for first, count in spans.values()), positions.size)  # also the rope tables' rows
        if inverse is None:                                 # one sequence
            (r, first, _), = placed.values()
            if positions.size == 1:
                return Layout(batch, 1, total, placed, reached, None, None, lone=(r, batch))
            token_rows, offsets = np.full(positions.size, r, np.int64), positions - first
        else:
            token_rows = np.array([placed[s][0] for s in spans], np.int64)[inverse]
            offsets = positions - np.array([first for first, _ in spans.values()], np.int64)[inverse]
        return Layout(batch, chunk, total, placed, reached, token_rows, offsets)

    def inputs(self, layout: Layout, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The model's inputs that say where each of the step's tokens goes (step.json)."""
        index = np.zeros((layout.batch, layout.chunk, 2), np.int64)     # per padded slot, (0, the token it takes)
        slots = np.zeros((1, positions.size, 2), np.int64)              # per token, (its row, its place in the chunk)
        if layout.lone is None:
            index[layout.token_rows, layout.offsets, 1] = np.arange(positions.size)
            slots[0, :, 0], slots[0, :, 1] = layout.token_rows, layout.offsets
        else:
            slots[0, 0, 0] = layout.lone[0]
        known = np.zeros(layout.batch, np.int32)            # an idle row: 1 token, none new, nothing appended or read
        fresh = np.zeros(layout.batch, np.int32)
        for r, first, count in layout.rows.values():
            known[r], fresh[r] = first + count - 1, count
        return {"gqa_tokens": index, "gqa_slots": slots, "seqlens_k": known, "query_seqlens": fresh,
                "total_length": np.array(layout.total, np.int32)}

    def written(self, layout: Layout, blocks: np.ndarray) -> None:
        """After a step: each of its rows holds its sequence to the step's last position, and every
        other row holding a block the step wrote is cut short of it."""
        size = self.block_size
        for s, (r, first, count) in layout.rows.items():
            row = self.rows[r]
            row.length = first + count
            self._hold(r, layout.tables[s][:-(-row.length // size)])
        if layout.lone is not None:
            writers = {int(blocks.item(0)): {layout.lone[0]}}
        else:
            writers = {}
            for block, r in zip(blocks.tolist(), layout.token_rows.tolist()):
                writers.setdefault(block, set()).add(r)
        for block, rows in writers.items():
            for h in self.holders.get(block, set()) - rows:
                row = self.rows[h]
                row.length = min(row.length, row.blocks.index(block) * size)
                self._hold(h, row.blocks[:-(-row.length // size)])

    def _refill(self, table: list[int], first: int, pool) -> int:
        """A row for a sequence no row continues, filled from the pool from where it stops agreeing
        with ``table``: the first row that neither this step nor the last used (its sequence has
        likely ended; low rows keep the batch short), else a new one while fewer than ``most``,
        else the least recently used."""
        idle = [r for r, row in enumerate(self.rows) if row.used < self.clock - 1]
        if idle:
            r = idle[0]
        elif len(self.rows) < self.most or all(row.used == self.clock for row in self.rows):
            self.rows.append(Row())
            r = len(self.rows) - 1
            self._grow(len(self.rows), self.k.shape[3])
        else:
            r = min((r for r, row in enumerate(self.rows) if row.used != self.clock), key=lambda r: self.rows[r].used)
        valid = self._agreeing(self.rows[r], table, first)
        if valid < first:
            positions = np.arange(valid, first)
            blocks, offsets = np.array(table, np.int64)[positions // self.block_size], positions % self.block_size
            for cache, source in ((self.k, pool[0]), (self.v, pool[1])):
                gathered = source[:, blocks, :, offsets]                  # [positions, layers, kv_heads, head_dim]
                cache[:, r, :, valid:first] = gathered.transpose(1, 2, 0, 3)
        self._take(r, table, first)
        return r

    def _take(self, r: int, table: list[int], first: int) -> None:
        """Row ``r`` now holds ``table``'s sequence's positions [0, first)."""
        row = self.rows[r]
        row.length, row.used = first, self.clock
        self._hold(r, table[:-(-first // self.block_size)])

    def _hold(self, r: int, blocks: list[int]) -> None:
        """Row ``r``'s blocks are now ``blocks`` (the pool blocks' holders kept with them)."""
        row = self.rows[r]
        if blocks[:len(row.blocks)] != row.blocks:      # not the row's blocks and more: let go of them all
            for block in row.blocks:
                self.holders[block].discard(r)
            row.blocks = []
        for block in blocks[len(row.blocks):]:
            self.holders.setdefault(block, set()).add(r)
        row.blocks = list(blocks)

    @staticmethod
    def _continued(row: Row, reached: list[int], table: np.ndarray) -> bool:
        """Whether every block of ``row`` is the sequence's of ``table`` (whose blocks the step
        reaches are ``reached``): then the row holds that sequence's first positions."""
        count = len(row.blocks)
        if count <= len(reached):
            return row.blocks == reached[:count]
        return row.blocks[:len(reached)] == reached and row.blocks == table[:count].tolist()     # a step back

    def _agreeing(self, row: Row, table: list[int], upto: int) -> int:
        """How many of the positions [0, upto) ``row`` holds as the pool's blocks in ``table`` do."""
        count = min(-(-upto // self.block_size), len(row.blocks))
        same = count if row.blocks[:count] == table[:count] else 0
        while same < count and row.blocks[same] == table[same]:
            same += 1
        return min(row.length, same * self.block_size, upto)

    def _grow(self, rows: int, length: int) -> None:
        """Room for ``rows`` rows of ``length`` positions (doubling, so growth is rare)."""
        have_rows, capacity = self.k.shape[1], self.k.shape[3]
        if rows <= have_rows and length <= capacity:
            return
        while capacity < length:
            capacity = max(2 * capacity, 64)
        rows = max(rows, 2 * have_rows) if rows > have_rows else have_rows
        layers, kv_heads, head_dim = self.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = np.zeros((layers, rows, kv_heads, capacity, head_dim), self.dtype)
            new[:, :old.shape[1], :, :old.shape[3]] = old
            setattr(self, name, new)
        self.grown += 1
