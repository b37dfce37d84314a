"""The runtime side of a cuda artifact's plans: read them, stage a step's batch for the device,
pick the plan it runs, and turn each plan step into a launch (kernel, grid, argument values) for
the sizes of one call. Used by the launcher and by the emulator alike; imports neither torch nor
Triton.

A step's batch reaches the device reshaped a little (``stage``): its sequences numbered 0.. in
the order of their ids, their block tables padded to a width fixed when the pool is allocated
(so a captured graph's arguments hold for every step), and the prefill attention's tiles cut on
the host. A batch of one token from each of n sequences is a decode batch: it is padded to the
bucket of the next power of two (the padding tokens write to a spare block past the runtime's
pool, and their logits are dropped) and runs a decode plan, which the launcher captures once per
bucket as a CUDA graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from llmc import dims
from llmc.abi import BATCH_INPUTS, STEP, PoolLayout
from llmc.artifact import Artifact, ArtifactError
from llmc.errors import LlmcError

BATCH = tuple(name for name, _ in BATCH_INPUTS)
POINTER_BASES = BATCH + ("arena", "out", "tiles", "params", "token")
SAMPLE_STEPS = 32          # bisection halvings of the top-k / top-p cut-offs


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, int, int]
    args: list[tuple]            # ("p", base, byte offset) | ("i", int) | ("f", float)


class Plan:
    """One plan's steps with their dims parsed once."""

    def __init__(self, plan: dict, kernels: dict, weights: int, pools: int):
        self.arena_bytes = int(plan["arena_bytes"])
        self.tile_rows = int(plan["tile_rows"])
        self.steps = []
        for step in plan["steps"]:
            if step["kernel"] not in kernels:
                raise ValueError(f"a step launches unknown kernel {step['kernel']}")
            grid = [(dims.evaluator(d), int(div)) for d, div in step["grid"]]
            args = []
            for arg in step["args"]:
                if arg[0] == "p":
                    base = arg[1]
                    if not (base in POINTER_BASES or _indexed(base, "w", weights) or _indexed(base, "c", pools)):
                        raise ValueError(f"a step reads unknown buffer {base}")
                    args.append(("p", base, dims.evaluator(arg[2])))
                elif arg[0] == "i":
                    args.append(("i", dims.evaluator(arg[1])))
                elif arg[0] == "f":
                    args.append(("f", float(arg[1])))
                else:
                    raise ValueError(f"unknown argument kind {arg[0]!r}")
            self.steps.append((step["kernel"], grid, args))

    def launches(self, env: dict[str, int]) -> Iterator[Launch]:
        for kernel, grid, args in self.steps:
            sizes = tuple(max(-(-f(env) // div), 0) for f, div in grid)
            values = [(a[0], a[1], a[2](env)) if a[0] == "p" else (("i", a[1](env)) if a[0] == "i" else a)
                      for a in args]
            yield Launch(kernel, sizes, values)


def _indexed(base: str, prefix: str, count: int) -> bool:
    return base[0] == prefix and base[1:].isdigit() and int(base[1:]) < count


@dataclass
class CudaProgram:
    """What a cuda artifact holds for one arch: its plans and kernel table, and what staging a
    batch needs to know."""
    arch: str
    plans: dict[str, Plan]
    kernels: dict[str, dict]          # key -> {module, function, arguments, constexprs, options}
    cubins: dict[str, dict]           # key -> launch metadata + offset/size in the cubin section
    weights: list[str]
    weight_dtypes: list[str]
    act: str
    max_tokens: int                   # the most tokens one step takes
    decode_batch: int                 # the largest decode bucket
    pool: PoolLayout
    max_seq: int                      # the model's positions: what a block table can need
    sampling: dict[str, str]          # "argmax" / "sample" -> kernel key


def read_program(artifact: Artifact, arch: str | None = None) -> CudaProgram:
    """The artifact's plans for ``arch`` (default: its first); ArtifactError if they are unusable."""
    manifest = artifact.manifest
    target = manifest["target"]
    arches = target.get("arches") or []
    arch = arch or (arches[0] if arches else None)
    if arch not in arches:
        raise ArtifactError(f"{artifact.path} has cubins for {', '.join(arches) or 'no arch'}, not {arch}; "
                            f"rebuild it with --arch {arch}")
    try:
        data = json.loads(bytes(artifact.section("cuda_plan")).decode())
        kernels = data["kernels"]
        pool = PoolLayout.from_manifest(manifest)
        plans = {name: Plan(p, kernels, len(target["weights"]), len(pool.tensors))
                 for name, p in data["plans"][arch].items()}
        return CudaProgram(arch, plans, kernels, data["cubins"][arch], list(target["weights"]),
                           list(target["weight_dtypes"]), target["act_dtype"], int(target["max_tokens"]),
                           int(target["decode_batch"]), pool, int(manifest["model"]["max_seq"]),
                           dict(data["sampling"]))
    except (KeyError, ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{artifact.path}: its cuda plan cannot be read ({exc}); rebuild the artifact") from None


# ---------------------------------------------------------------------------------------------
# A step's batch, staged for the device

@dataclass
class Staged:
    arrays: dict[str, np.ndarray]     # what goes to the device buffer of each name (BATCH, "tiles")
    plan: str
    env: dict[str, int]               # the plan's dims for this call
    rows: int                         # the logit rows asked for: the first rows of ``out``


def decode_bucket(tokens: int, seqs: int, rows: int, largest: int) -> int | None:
    """The decode bucket (1, 2, 4, ...) of a batch with one token of each sequence, or None: the
    batch runs the step plan."""
    bucket = 1 << (tokens - 1).bit_length()
    return bucket if tokens == seqs and rows <= tokens and bucket <= largest else None


def stage(batch: dict[str, np.ndarray], program: CudaProgram, width: int, blocks: int) -> Staged:
    """A checked batch (``llmc.abi.check_batch``) as the device takes it; ``width`` is the tables'
    width on the device and block ``blocks`` the spare one past the runtime's pool."""
    tokens, positions, rows = batch["tokens"], batch["positions"], batch["logit_rows"]
    if positions.max() // program.pool.block_size >= width:
        raise LlmcError(f"position {int(positions.max())} is past the {width * program.pool.block_size} positions a "
                        f"sequence can hold in this KV pool")
    used, seq_index = np.unique(batch["seq_index"], return_inverse=True)
    asked = len(rows)
    bucket = decode_bucket(len(tokens), len(used), asked, program.decode_batch)
    if bucket is not None:
        # The padding tokens are one more sequence, at position 0 of the spare block.
        pad = bucket - len(tokens)
        tokens, positions = (np.r_[a, np.zeros(pad, np.int64)] for a in (tokens, positions))
        seq_index = np.r_[seq_index, np.full(pad, len(used))]
        rows = np.r_[rows, np.zeros(bucket - asked, np.int64)]
    tables = _device_tables(batch["block_tables"][used], bucket or len(used), width, blocks)
    plan = "step" if bucket is None else "decode" if bucket == 1 else "decode_batch"
    tiles = (attention_tiles(seq_index, program.plans["step"].tile_rows) if plan == "step"
             else np.zeros((0, 2), np.int32))
    arrays = {"tokens": tokens, "positions": positions, "seq_index": seq_index, "block_tables": tables,
              "logit_rows": rows, "tiles": tiles}
    arrays = {name: np.ascontiguousarray(a, np.int32 if name == "tiles" else np.int64) for name, a in arrays.items()}
    env = {"seq": len(tokens), "rows": len(rows), "seqs": len(tables), "max_blocks": width, "blocks": blocks + 1,
           "tiles": len(tiles)}
    return Staged(arrays, plan, env, asked)


def _device_tables(tables: np.ndarray, seqs: int, width: int, spare: int) -> np.ndarray:
    """The used sequences' tables as ``seqs`` rows of ``width`` blocks, padded with the spare
    block: a token reads its own sequence's blocks up to its position, so only the padding
    tokens read the padding."""
    out = np.full((seqs, width), spare, np.int64)
    columns = min(width, tables.shape[1])
    out[:len(tables), :columns] = tables[:, :columns]
    return out


class PlanRunner:
    """How a cuda executor runs the step entry point, whatever runs the kernels. A backend
    provides ``program`` and ``vocab`` and: ``_new_pool(blocks, width)`` (a KV pool of ``blocks``
    blocks and a block-table buffer ``width`` wide; returns the pool's bytes), ``_upload(staged)``,
    ``_execute(plan, env)``, ``_logits(rows)`` (the output to the host), ``_launch(launch)``,
    ``_set_params(values)`` and ``_token()`` (the sampled id to the host)."""

    blocks = 0
    width = 0

    def allocate_pool(self, blocks: int) -> int:
        """The KV pool on the device for ``blocks`` blocks of the runtime's, in the activation
        dtype (again: the old pool is dropped), plus one spare block that decode padding writes
        to. Returns the bytes allocated."""
        if blocks < 1:
            raise LlmcError(f"a KV pool needs at least one block, not {blocks}")
        self.blocks = blocks
        self.width = min(-(-self.program.max_seq // self.program.pool.block_size), blocks)
        return self._new_pool(blocks + 1, self.width)

    def run(self, entry: str, batch: dict[str, np.ndarray]) -> np.ndarray:
        """One step: the logits of ``batch["logit_rows"]``, [rows, vocab] float32."""
        return self._logits(self._step(entry, batch))

    def sample(self, entry: str, batch: dict[str, np.ndarray], params, draw: int) -> int:
        """One step whose batch asks for one logit row, then the next token chosen on the device
        (argmax, or a draw after temperature, top-k, top-p and min-p): only its id crosses to the
        host. ``draw`` counts the draws of one generation, for the sampling hash."""
        if len(batch["logit_rows"]) != 1:
            raise LlmcError("sampling on the device takes a step with one logit row")
        self._step(entry, batch)
        if params.temperature == 0:
            args = [("p", "out", 0), ("i", self.vocab), ("p", "token", 0)]
            self._launch(Launch(self.program.sampling["argmax"], (1, 1, 1), args))
        else:
            self._set_params(np.array([params.temperature, params.top_k, params.top_p, params.min_p], np.float32))
            seed = ((params.seed or 0) * 1000003 + draw) & 0x7FFFFFFF
            args = [("p", "out", 0), ("i", self.vocab), ("p", "params", 0), ("i", seed), ("p", "token", 0)]
            self._launch(Launch(self.program.sampling["sample"], (1, 1, 1), args))
        return self._token()

    def _step(self, entry: str, batch: dict[str, np.ndarray]) -> int:
        if entry != STEP:
            raise LlmcError(f"a cuda artifact's entry point is {STEP!r}, not {entry!r}")
        if not self.blocks:
            raise LlmcError("the KV pool is not allocated: call allocate_pool before a step")
        staged = stage(batch, self.program, self.width, self.blocks)
        self._upload(staged)
        self._execute(staged.plan, staged.env)
        return staged.rows


def attention_tiles(seq_index, rows: int):
    """The prefill attention kernel's tiles for a step, int32 [tiles, 2] of (first row, rows):
    each run of consecutive tokens of one sequence, cut every ``rows`` tokens (its BLOCK_M)."""
    n = len(seq_index)
    starts = np.flatnonzero(np.r_[True, seq_index[1:] != seq_index[:-1]])
    ends = np.r_[starts[1:], n]
    per_run = -(-(ends - starts) // rows)
    within = np.arange(per_run.sum()) - np.repeat(np.cumsum(per_run) - per_run, per_run)
    first = np.repeat(starts, per_run) + within * rows
    count = np.minimum(rows, np.repeat(ends, per_run) - first)
    return np.stack([first, count], axis=1).astype(np.int32)


def to_storage(array, dtype: str):
    """A weight as the device stores it (numpy): f16, f32, bf16 as its uint16 bit pattern (round to
    nearest even), integer codes unchanged."""
    if dtype == "bf16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        return (rounded >> 16).astype(np.uint16)
    if dtype in ("f16", "f32"):
        return np.ascontiguousarray(array, dtype=np.float16 if dtype == "f16" else np.float32)
    return np.ascontiguousarray(array)
