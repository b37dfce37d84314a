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
        pool = artifact.manifest["kv_pool"]
        self.block_size = int(pool["block_size"])
        self.vocab = int(artifact.manifest["vocab_size"])
        self.rows_dtype = numpy_dtype(target.get("act_dtype", "f32"))
        self.layers, self.kv_heads, self.head_dim = int(pool["layers"]), int(pool["kv_heads"]), int(pool["head_dim"])
        self.pool: list[np.ndarray] = []
        self.rows: Rows | None = None
        self.binding = self.session.io_binding()
        self.bound: tuple | None = None         # the rows' growth and the batch the binding holds
        self.cache_values: list = []            # their OrtValues, kept alive while bound
        self.buffers: dict[str, np.ndarray] = {}    # the arrays bound as inputs and as the logits

    def allocate_pool(self, blocks: int) -> int:
        self.pool = pool_arrays(self.artifact, blocks)
        self.rows = Rows(self.layers, self.kv_heads, self.head_dim, self.block_size, self.rows_dtype, blocks)
        self.bound = None
        return sum(a.nbytes for a in self.pool)

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        k_cache, v_cache = self.pool
        feed = {name: np.ascontiguousarray(value, dtype=np.int64) for name, value in inputs.items()}
        positions, seq_index, tables = feed["positions"], feed["seq_index"], feed["block_tables"]
        blocks, offsets = kv_slots(positions, seq_index, tables, k_cache.shape[1], self.block_size)
        layout = self.rows.place(positions, seq_index, tables, self.pool)
        feed.update(layout.inputs)
        binding = self.binding
        for name, value in feed.items():
            if name in self.inputs:
                self.bind(name, value)
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
        rows = layout.inputs["gqa_slots"][0, :, 0]
        if positions.size == 1:           # a lone decode token: plain indexing, no gather
            b, o, r, p = int(blocks[0]), int(offsets[0]), int(rows[0]), int(positions[0])
            k_cache[:, b, :, o], v_cache[:, b, :, o] = self.rows.k[:, r, :, p], self.rows.v[:, r, :, p]
        else:
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
    """One row of the contiguous caches: the pool blocks its positions [0, length) hold the keys
    and values of, and each block's write count when the row last agreed with it."""

    blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    writes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    length: int = 0
    used: int = 0


@dataclass
class Layout:
    """A step laid out for GroupQueryAttention: the rows its sequences use (batch entries 0..batch-1,
    the others idle) and the model's inputs that say where each token goes."""

    batch: int
    rows: dict[int, tuple[int, int, int]]     # sequence -> (row, first position, tokens)
    tables: np.ndarray
    inputs: dict[str, np.ndarray]


def _spans(positions: np.ndarray, seq_index: np.ndarray) -> tuple[dict[int, tuple[int, int]], np.ndarray | None]:
    """Each sequence of the step as {sequence: (its first position, its tokens)}, and per token its
    sequence's place in that order (None when the step is one sequence's); an LlmcError unless each
    sequence's tokens are consecutive positions."""
    if positions.size == 1:                             # a lone decode token
        return {int(seq_index[0]): (int(positions[0]), 1)}, None
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
    and lengths need (untouched pages cost no memory). A row serves the sequence whose block table
    agrees with its blocks, each block unwritten since the row read it (the pool's blocks are
    written only by steps, which count every write); where it stops agreeing it is filled from the
    pool. So a row holds what the pool holds, and is only ever a faster way to read it."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, block_size: int, dtype, blocks: int):
        self.shape = (layers, kv_heads, head_dim)
        self.block_size = block_size
        self.dtype = dtype
        self.writes = np.zeros(blocks, np.int64)        # per pool block: how many steps wrote into it
        self.rows: list[Row] = []
        self.most = 4                                   # rows kept: the most sequences a step has had, and 2
        self.clock = 0
        self.k = self.v = np.zeros((layers, 0, kv_heads, 0, head_dim), dtype)
        self.grown = 0                                  # times k and v were made anew

    def place(self, positions: np.ndarray, seq_index: np.ndarray, tables: np.ndarray, pool) -> Layout:
        """A row for each sequence in the step, holding its positions before the step's: first the
        sequences that continue the row they left (every block of it theirs and unwritten since:
        also a step back, as a rerun or a rejected draft makes), then the others (a row least
        recently used, or a new one, filled from the pool)."""
        self.clock += 1
        spans, inverse = _spans(positions, seq_index)
        self.most = max(self.most, len(spans) + 2)
        # GroupQueryAttention wants room for every entry's cached tokens plus the padded chunk
        chunk = max(count for _, count in spans.values())
        self._grow(len(self.rows), max(max(first for first, _ in spans.values()) + chunk + 1, positions.size))
        placed: dict[int, tuple[int, int, int]] = {}
        for s, (first, count) in spans.items():
            for r, row in enumerate(self.rows):
                if row.used != self.clock and row.length >= first and self._agreeing(row, tables[s]) == row.length:
                    self._take(r, tables[s], first)
                    placed[s] = (r, first, count)
                    break
        for s, (first, count) in spans.items():
            if s not in placed:
                placed[s] = (self._refill(tables[s], first, pool), first, count)
        batch = max(r for r, _, _ in placed.values()) + 1
        known = np.zeros(batch, np.int32)                   # an idle row: 1 token, none new, nothing appended or read
        fresh = np.zeros(batch, np.int32)
        for r, first, count in placed.values():
            known[r], fresh[r] = first + count - 1, count
        if inverse is None:                                 # one sequence
            (token_rows, first, _), = placed.values()
            offsets = positions - first
        else:
            token_rows = np.array([placed[s][0] for s in spans], np.int64)[inverse]
            offsets = positions - np.array([first for first, _ in spans.values()], np.int64)[inverse]
        index = np.zeros((batch, chunk, 2), np.int64)       # per padded slot, (0, the token it takes; 0 for padding)
        index[token_rows, offsets, 1] = np.arange(positions.size)
        slots = np.empty((1, positions.size, 2), np.int64)  # per token, (its row, its place in the chunk)
        slots[0, :, 0], slots[0, :, 1] = token_rows, offsets
        total = max(max(first + count for first, count in spans.values()), positions.size)  # also the rope tables' rows
        inputs = {"gqa_tokens": index, "gqa_slots": slots, "seqlens_k": known, "query_seqlens": fresh,
                  "total_length": np.array(total, np.int32)}
        return Layout(batch, placed, tables, inputs)

    def written(self, layout: Layout, blocks: np.ndarray) -> None:
        """After a step: count the pool blocks it wrote; each of its rows now holds its sequence to
        the step's last position."""
        self.writes[blocks] += 1          # (a block written twice counts once: a count only has to change)
        for s, (r, first, count) in layout.rows.items():
            row = self.rows[r]
            row.length = first + count
            row.blocks = np.array(layout.tables[s][:-(-row.length // self.block_size)], np.int64)
            row.writes = self.writes[row.blocks]

    def _refill(self, table: np.ndarray, first: int, pool) -> int:
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
        valid = min(self._agreeing(self.rows[r], table), first)
        if valid < first:
            positions = np.arange(valid, first)
            blocks, offsets = table[positions // self.block_size], positions % self.block_size
            for cache, source in ((self.k, pool[0]), (self.v, pool[1])):
                gathered = source[:, blocks, :, offsets]                  # [positions, layers, kv_heads, head_dim]
                cache[:, r, :, valid:first] = gathered.transpose(1, 2, 0, 3)
        self._take(r, table, first)
        return r

    def _take(self, r: int, table: np.ndarray, first: int) -> None:
        row = self.rows[r]
        row.blocks = np.array(table[:-(-first // self.block_size)], np.int64)
        row.writes = self.writes[row.blocks]
        row.length, row.used = first, self.clock

    def _agreeing(self, row: Row, table: np.ndarray) -> int:
        """How many leading positions of ``row`` hold what the pool's blocks in ``table`` hold."""
        n = min(row.blocks.size, table.size)
        same = (row.blocks[:n] == table[:n]) & (row.writes[:n] == self.writes[table[:n]])
        agreeing = n if same.all() else int(np.argmin(same))
        return min(row.length, agreeing * self.block_size)

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
