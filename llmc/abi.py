"""The artifact ABI: the entry points an artifact declares and the runtime calls by name.

There is one entry point, ``step``: one batched, paged forward step. Its inputs are a flat batch
of ``seq`` tokens that may come from several sequences at once (prefill chunks and single decode
tokens mixed), each with its own position and its sequence's row of the block tables, the rows
whose logits are wanted, and the KV pool::

    step(tokens i64[seq], positions i64[seq], seq_index i64[seq], block_tables i64[seqs, max_blocks],
         logit_rows i64[rows], k_cache, v_cache[, k_scale, v_scale]) -> logits f32[rows, vocab]

The KV pool is ``[layers, blocks, kv_heads, block_size, head_dim]`` per tensor: ``block_size`` is
fixed when the artifact is built, ``blocks`` when it is loaded (the pool belongs to the executor).
Position ``p`` of sequence ``s`` lives in block ``block_tables[s, p // block_size]`` at offset
``p % block_size``; a step writes every token's K/V there before any token attends, so a
prefill chunk sees itself. Single-sequence generation is the batch-of-one case.

The manifest declares the entry with its inputs, outputs and symbolic shapes (``entry_points``)
and the pool's layout (``kv_pool``); ``check_manifest`` refuses an artifact whose declaration is
not the one this runtime calls, and ``check_batch`` a batch the step cannot take, before any
target code runs. Imports numpy and the core only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from llmc import dims
from llmc.artifact import ArtifactError
from llmc.errors import LlmcError
from llmc.types import DTYPE_BYTES, numpy_dtype, parse_type

DEFAULT_BLOCK_SIZE = 16
STEP = "step"
POOL_LAYOUT = "[layers, blocks, kv_heads, block_size, head_dim]"
# The step's inputs before the KV pool, in call order: what the runtime passes each call.
BATCH_INPUTS = (("tokens", "i64[seq]"), ("positions", "i64[seq]"), ("seq_index", "i64[seq]"),
                ("block_tables", "i64[seqs, max_blocks]"), ("logit_rows", "i64[rows]"))
ITEMSIZE = {d: DTYPE_BYTES[d] for d in ("f32", "f16", "bf16", "i8")}     # the dtypes a pool may hold
POOL_TENSORS = {"f32": ("k_cache", "v_cache"), "f16": ("k_cache", "v_cache"),
                "int8": ("k_cache", "v_cache", "k_scale", "v_scale")}


class AbiError(LlmcError):
    """An artifact whose entry points are not the ones this llmc calls, or a batch a step cannot take."""


class EntryPointError(AbiError, ArtifactError):
    """An artifact whose declared entry point or KV pool is not what this llmc calls: rebuild it."""


class BatchError(AbiError):
    """A batch the step cannot take (an index outside the pool, the tables or the step's limits)."""


@dataclass(frozen=True)
class PoolLayout:
    """The KV pool as the manifest declares it: one [layers, blocks, kv_heads, block_size, ...] tensor
    per name."""

    tensors: tuple[tuple[str, str], ...]     # (name, IR type with the symbol ``blocks``)
    block_size: int
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str                               # storage dtype the target keeps the pool in

    def shapes(self, blocks: int) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, IR dtype) of every pool tensor for a pool of ``blocks`` blocks."""
        out = []
        for name, text in self.tensors:
            t = parse_type(text)
            out.append((name, tuple(dims.evaluate(d, {"blocks": blocks}) for d in t.shape), t.dtype))
        return out

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    @staticmethod
    def from_manifest(manifest: Mapping[str, Any]) -> "PoolLayout":
        pool = manifest["kv_pool"]
        return PoolLayout(tuple((n, t) for n, t in pool["tensors"]), int(pool["block_size"]), int(pool["layers"]),
                          int(pool["kv_heads"]), int(pool["head_dim"]), pool["dtype"])


def block_bytes(name: str, t, pool_dtype: str) -> int:
    """Bytes one block of pool tensor ``name`` (IR type ``t``, with the symbol ``blocks``) takes
    in a pool stored as ``pool_dtype``: int8 codes and scales keep their own dtype."""
    stored = t.dtype if name.endswith("_scale") or t.dtype == "i8" else pool_dtype
    return DTYPE_BYTES[stored] * dims.product([d for d in t.shape if d != "blocks"])


def allocate_pool(layout: PoolLayout, blocks: int) -> list[np.ndarray]:
    """Zeroed host arrays for a pool of ``blocks`` blocks, in the step's input order."""
    return [np.zeros(shape, numpy_dtype(dtype)) for _, shape, dtype in layout.shapes(blocks)]


def graph_pool(graph, blocks: int) -> list[np.ndarray]:
    """Zeroed arrays for a step graph's pool inputs, ``blocks`` blocks (for the interpreter)."""
    return [np.zeros(tuple(dims.evaluate(d, {"blocks": blocks}) for d in n.type.shape), numpy_dtype(n.type.dtype))
            for n in graph.inputs[len(BATCH_INPUTS):]]


def one_sequence(graph, tokens, rows: str = "last") -> list[np.ndarray]:
    """The step graph's inputs for one sequence of ``tokens`` from position 0 in a fresh pool that
    just holds it: a whole-sequence run of the step, e.g. to observe activations."""
    block_size = graph.inputs[len(BATCH_INPUTS)].type.shape[3]
    blocks = -(-len(tokens) // block_size)
    batch = Batch.single(np.asarray(tokens, np.int64), 0, np.arange(blocks), rows)
    return list(batch.inputs().values()) + graph_pool(graph, blocks)


# ---------------------------------------------------------------------------------------------
# What a build declares

def declare(graph, max_tokens: int, pool_dtype: str | None = None) -> dict[str, Any]:
    """The manifest's ``entry_points`` and ``kv_pool`` for a step graph (``llmc.ir.Graph``) that a
    target runs with at most ``max_tokens`` tokens a call; ``pool_dtype`` is the dtype the target
    keeps the pool in when it differs from the graph's (a GPU's f16)."""
    names = [n.attrs["name"] for n in graph.inputs]
    expected = [n for n, _ in BATCH_INPUTS]
    if names[:len(expected)] != expected or len(graph.outputs) != 1:
        raise EntryPointError(f"a step graph takes {', '.join(expected)} and the KV pool, and returns logits; this one "
                       f"takes {', '.join(names)}")
    pool = graph.inputs[len(expected):]
    k_cache = pool[0].type
    layers, _, kv_heads, block_size, head_dim = k_cache.shape
    tensors = [[n.attrs["name"], str(n.type)] for n in pool]
    dtype = pool_dtype or k_cache.dtype
    per_block = sum(block_bytes(node.attrs["name"], node.type, dtype) for node in pool)
    return {
        "entry_points": {STEP: {
            "graph": "graph",
            "inputs": [[n.attrs["name"], str(n.type)] for n in graph.inputs],
            "outputs": [["logits", str(graph.outputs[0].type)]],
            "max_tokens": int(max_tokens),
        }},
        "kv_pool": {"layout": POOL_LAYOUT, "block_size": int(block_size), "layers": int(layers),
                    "kv_heads": int(kv_heads), "head_dim": int(head_dim), "dtype": dtype,
                    "tensors": tensors, "bytes_per_block": int(per_block)},
    }


# ---------------------------------------------------------------------------------------------
# What a loader checks

def check_manifest(manifest: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The ``step`` entry of an artifact's manifest, checked against the signature this runtime
    calls; an AbiError that says what is wrong and to rebuild otherwise. The artifact's fields the
    runtime reads are checked first (``llmc.manifest.check_model``)."""
    from llmc.manifest import ManifestError, check_model

    try:
        check_model(manifest)
    except ManifestError as exc:
        raise ArtifactError(f"{path} has a manifest that is not valid: {exc}. Its checksum matches, so a tool "
                            "edited it; rebuild the artifact") from None
    entries = manifest.get("entry_points")
    if not isinstance(entries, dict) or STEP not in entries:
        have = ", ".join(entries) if isinstance(entries, dict) and entries else "none"
        raise EntryPointError(f"{path} has no {STEP!r} entry point (it declares {have}); rebuild it with this llmc")
    entry = entries[STEP]
    try:
        inputs = [(str(n), str(t)) for n, t in entry["inputs"]]
        outputs = [(str(n), str(t)) for n, t in entry["outputs"]]
        max_tokens = int(entry["max_tokens"])
        layout = PoolLayout.from_manifest(manifest)
        vocab = int(manifest["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise EntryPointError(f"{path}: its {STEP!r} entry point or KV pool declaration is malformed; "
                       "rebuild the artifact") from None
    want = list(BATCH_INPUTS) + list(layout.tensors)
    if inputs != want:
        raise EntryPointError(f"{path}: entry point {STEP!r} takes ({_signature(inputs)}), but this llmc calls it with "
                       f"({_signature(want)}); rebuild the artifact with this llmc")
    if outputs != [("logits", f"f32[rows, {vocab}]")]:
        raise EntryPointError(f"{path}: entry point {STEP!r} returns ({_signature(outputs)}), not logits f32[rows, {vocab}]; "
                       "rebuild the artifact with this llmc")
    names = [n for n, _ in layout.tensors]
    if names not in [list(v) for v in POOL_TENSORS.values()] or layout.block_size < 1 or max_tokens < 1:
        raise EntryPointError(f"{path}: its KV pool ({', '.join(names)}, blocks of {layout.block_size}) is not one this "
                       "llmc allocates; rebuild the artifact")
    problem = _pool_problem(manifest["kv_pool"], layout, entry["max_tokens"])
    if problem:
        raise EntryPointError(f"{path}: its KV pool declaration is not consistent ({problem}); rebuild the artifact")
    if not isinstance(entry.get("graph"), str) or entry["graph"] not in manifest["sections"]:
        raise EntryPointError(f"{path}: entry point {STEP!r} names graph section {entry.get('graph')!r}, which it "
                              "lacks; rebuild the artifact")
    return dict(entry)


def _pool_problem(pool: Mapping[str, Any], layout: PoolLayout, max_tokens: int) -> str | None:
    """What is wrong with a declared pool whose names are right: every tensor's type must be
    [layers, blocks, kv_heads, block_size, head_dim] (a scale drops head_dim) of a dtype the pool
    may hold, and bytes_per_block what those need."""
    from llmc.errors import is_int

    sizes = (layout.layers, layout.kv_heads, layout.block_size, layout.head_dim, max_tokens)
    if not all(is_int(pool[k]) for k in ("layers", "kv_heads", "block_size", "head_dim")) or not is_int(max_tokens) or \
            not all(1 <= n <= 1 << 20 for n in sizes) or not isinstance(layout.dtype, str) or \
            layout.dtype not in ITEMSIZE:
        return f"layers, kv_heads, block_size, head_dim and max_tokens must be ints from 1 to 2**20, dtype one of " \
               f"{', '.join(ITEMSIZE)}"
    per_block = 0
    for name, text in layout.tensors:
        try:
            t = parse_type(text)
        except Exception:                  # noqa: BLE001 -- any text that is not a type
            return f"{name}'s type {text!r} does not parse"
        scale = name.endswith("_scale")
        want = [layout.layers, "blocks", layout.kv_heads, layout.block_size] + ([] if scale else [layout.head_dim])
        if list(t.shape) != want or t.dtype not in ITEMSIZE or (scale and t.dtype != "f32"):
            return f"{name} is {text}, not {t.dtype if t.dtype in ITEMSIZE else 'f32'}[{', '.join(map(str, want))}]"
        per_block += block_bytes(name, t, layout.dtype)
    if pool.get("bytes_per_block") != per_block:
        return f"bytes_per_block is {pool.get('bytes_per_block')!r}, its tensors need {per_block}"
    return None


def _signature(pairs) -> str:
    return ", ".join(f"{n}: {t}" for n, t in pairs)


def describe(manifest: Mapping[str, Any]) -> list[str]:
    """Lines for ``llmc inspect``: each entry point with its shapes, and the KV pool's layout."""
    lines = []
    for name, entry in manifest.get("entry_points", {}).items():
        ins = ", ".join(f"{n}: {t}" for n, t in entry["inputs"])
        outs = ", ".join(f"{n}: {t}" for n, t in entry["outputs"])
        limit = f"  (at most {entry['max_tokens']} tokens a call)" if "max_tokens" in entry else ""
        lines.append(f"entry     {name}({ins}) -> {outs}{limit}")
    pool = manifest.get("kv_pool")
    if pool:
        lines.append(f"kv pool   {pool['layout']}: blocks of {pool['block_size']} tokens, {pool['dtype']}, "
                     f"{pool['bytes_per_block']} bytes per block ({', '.join(n for n, _ in pool['tensors'])})")
    return lines


# ---------------------------------------------------------------------------------------------
# A batch

@dataclass
class Batch:
    """The non-pool inputs of one step, by name (int64 arrays)."""

    tokens: np.ndarray
    positions: np.ndarray
    seq_index: np.ndarray
    block_tables: np.ndarray
    logit_rows: np.ndarray

    def inputs(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name, _ in BATCH_INPUTS}

    @staticmethod
    def single(tokens, start: int, table: np.ndarray, rows: str) -> "Batch":
        """A batch of one sequence (block table ``table``): ``tokens`` at ``start..``, logits for the
        last token (``rows="last"``) or for all of them (``"all"``)."""
        n = len(tokens)
        logit_rows = np.arange(n, dtype=np.int64) if rows == "all" else np.array([n - 1], np.int64)
        return Batch(np.ascontiguousarray(tokens, np.int64), np.arange(start, start + n, dtype=np.int64),
                     np.zeros(n, np.int64), np.ascontiguousarray(table, np.int64).reshape(1, -1), logit_rows)


def _span(array: np.ndarray) -> tuple[int, int]:
    """The least and the greatest of a non-empty array, as ints (one element: no reductions)."""
    if array.size == 1:
        value = int(array.item(0))
        return value, value
    return int(array.min()), int(array.max())


def check_batch(batch: Batch, layout: PoolLayout, blocks: int, max_tokens: int, vocab: int,
                positions: int | None = None) -> None:
    """Refuse (AbiError) a batch whose indices would reach outside the pool, the tables, the
    step's limits or the model's ``positions`` (its max_seq), or that writes one slot twice: the
    checks every target's code relies on."""
    arrays = batch.inputs()
    for name, array in arrays.items():
        want = 2 if name == "block_tables" else 1
        if not isinstance(array, np.ndarray) or array.dtype != np.int64 or array.ndim != want \
                or not array.flags.c_contiguous:
            raise BatchError(f"the step's {name} must be a contiguous int64 array of rank {want}")
    n = batch.tokens.size
    if not 1 <= n <= max_tokens:
        raise BatchError(f"a step takes 1 to {max_tokens} tokens, not {n}")
    if batch.positions.size != n or batch.seq_index.size != n:
        raise BatchError("tokens, positions and seq_index must have one entry per token")
    if not 1 <= batch.logit_rows.size <= n:
        raise BatchError(f"logit_rows must name 1 to {n} of the step's {n} token rows")
    low, high = _span(batch.logit_rows)
    if low < 0 or high >= n:
        raise BatchError(f"logit_rows must name 1 to {n} of the step's {n} token rows")
    low, high = _span(batch.tokens)
    if low < 0 or high >= vocab:
        raise BatchError(f"token ids must be in [0, {vocab})")
    seqs, width = batch.block_tables.shape
    if seqs < 1 or width < 1:
        raise BatchError("block_tables needs at least one sequence and one block")
    low, high = _span(batch.seq_index)
    if low < 0 or high >= seqs:
        raise BatchError(f"seq_index must name one of the {seqs} block tables")
    low, high = _span(batch.positions)
    if low < 0:
        raise BatchError("positions must be >= 0")
    if positions is not None and high >= positions:
        raise BatchError(f"position {high} is past the model's {positions} positions")
    if high // layout.block_size >= width:
        raise BatchError(f"position {high} needs more than the {width} blocks of a block table")
    # Every block a token reads (its sequence's positions 0..position) must be in the pool.
    if seqs == 1:                   # one sequence (generation's every step): no scatter
        read = batch.block_tables[0, :high // layout.block_size + 1]
    else:
        logical = batch.positions // layout.block_size
        last = np.full(seqs, -1, np.int64)
        np.maximum.at(last, batch.seq_index, logical)
        read = batch.block_tables[np.arange(width)[None, :] <= last[:, None]]
    low, high = _span(read)
    if low < 0 or high >= blocks:
        raise BatchError(f"a block table names a block outside the pool of {blocks} blocks")
    # Two tokens writing one slot (a position twice, or two sequences sharing a block they both
    # write) would race: the step's result would depend on which write lands last.
    if n == 1:
        return
    logical = batch.positions // layout.block_size
    slots = batch.block_tables[batch.seq_index, logical] * layout.block_size + batch.positions % layout.block_size
    if np.unique(slots).size != n:
        raise BatchError("two tokens of the step write the same KV slot (one position twice, or a block two sequences "
                       "share): give each written position its own slot")
