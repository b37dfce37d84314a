"""The compile pipeline: one ordered list of phases, read top to bottom.

1. import     trace the model's own code and import it into llmc IR (llmc.frontend)
2. simplify   CSE, constant folding, no-op and reshape/permute chain cleanup (llmc.passes.cleanup)
3. attention  one batched step over a paged KV pool: per-token positions and sequences, logits
              for the rows asked for (llmc.passes.attention)
4. fuse       RMSNorm, RoPE, SwiGLU/GeGLU, GELU, merged Q/K/V and gate/up linears, elementwise
              chains as single loops (llmc.passes.fuse)
5. quantize   linear weights (and a tied embedding) into the scheme's format (llmc.passes.quantize)

The target then plans memory and lowers the graph (``llmc.targets``; ``llmc compile`` prints it as
the last phase, ``lower``). Each
phase prints one progress line with its time; ``dump_ir`` writes the IR after every phase; the
verifier runs after every pass when ``verify`` is on (tests, or LLMC_VERIFY=1).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from llmc.errors import UsageError
from llmc.ir import Graph, verify as verify_graph


@dataclass(frozen=True)
class Phase:
    name: str
    doc: str
    run: Callable[[Graph, Any], Graph]       # (graph, PassContext) -> graph


def _simplify(graph: Graph, ctx) -> Graph:
    from llmc.passes.cleanup import simplify

    return simplify(graph)


def _attention(graph: Graph, ctx) -> Graph:
    from llmc.passes.attention import rewrite_attention
    from llmc.passes.cleanup import simplify

    graph = ctx.after("rewrite_attention", rewrite_attention(graph, ctx))
    return simplify(graph)


def _fuse(graph: Graph, ctx) -> Graph:
    from llmc.passes.fuse import fuse

    return fuse(graph, ctx)


def _quantize(graph: Graph, ctx) -> Graph:
    from llmc.passes.fuse import with_used_weights
    from llmc.passes.quantize import quantize_weights

    return with_used_weights(quantize_weights(graph, ctx))


PHASES: list[Phase] = [
    Phase("simplify", "CSE, constant folding, no-op and reshape/permute chain cleanup", _simplify),
    Phase("attention", "one batched step over a paged KV pool, logits for the rows asked for", _attention),
    Phase("fuse", "norms, rope, gated MLPs, merged linears, elementwise loops", _fuse),
    Phase("quantize", "linear weights (and a tied embedding) into the quantization scheme", _quantize),
]
PHASE_NAMES = ["import"] + [p.name for p in PHASES]


@dataclass
class PipelineResult:
    graph: Graph
    imported: Any                                   # llmc.frontend.Imported
    timings: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # what passes could not do, and why


def run_pipeline(source: Any, *, until: str | None = None, dump_ir: str | Path | None = None,
                 verify: bool | None = None, progress: TextIO | None = sys.stderr, block_size: int | None = None,
                 quant: str = "f32", kv: str = "f32", calibration: Any = None,
                 **import_options: Any) -> PipelineResult:
    """Run the phases on ``source`` up to and including ``until`` (default: all of them)."""
    from llmc.frontend import import_model

    _check_phase(until)
    from llmc.quant import parse_scheme

    parse_scheme(quant)                      # bad options fail before the model is loaded
    check_kv(kv)
    start = time.perf_counter()
    imported = import_model(source, **import_options)
    return run_phases(imported, until=until, dump_ir=dump_ir, verify=verify, progress=progress,
                      block_size=block_size, quant=quant, kv=kv, calibration=calibration,
                      import_seconds=time.perf_counter() - start)


def run_phases(imported: Any, *, until: str | None = None, dump_ir: str | Path | None = None,
               verify: bool | None = None, progress: TextIO | None = sys.stderr, block_size: int | None = None,
               quant: str = "f32", kv: str = "f32", calibration: Any = None,
               import_seconds: float = 0.0, then: tuple[str, ...] = ()) -> PipelineResult:
    """Run the phases after import on an already imported model (``llmc.frontend.Imported``).
    ``then`` names the phases the caller runs afterwards (a target's lower), counted in the progress."""
    from llmc.frontend import rotary_note
    from llmc.passes.context import PassContext

    until = _check_phase(until)
    check_kv(kv)
    block_size = check_block_size(block_size)
    if verify is None:
        verify = os.environ.get("LLMC_VERIFY") == "1"
    dump_dir = Path(dump_ir) if dump_ir else None
    if dump_dir:
        dump_dir.mkdir(parents=True, exist_ok=True)
    total = PHASE_NAMES.index(until) + 1 + len(then)
    result = PipelineResult(imported.graph, imported)

    def finish(index: int, name: str, graph: Graph, seconds: float, remark: str = "") -> None:
        if verify:
            verify_graph(graph)
        result.timings[name] = seconds
        result.histograms[name] = graph.op_histogram()
        if dump_dir:
            (dump_dir / f"{index:02d}-{name}.ir").write_text(str(graph))
        if progress:
            progress.write(f"[{index}/{total}] {name:<9} {seconds:6.2f} s  {len(graph.nodes())} nodes{remark}\n")
            progress.flush()

    origin = " (a copy of the import above)" if imported.copied else " (from the cache)" if imported.cached else ""
    finish(1, "import", imported.graph, import_seconds, origin)
    graph = imported.graph
    ctx = PassContext(imported.config, imported.max_seq, block_size, result.notes, verify, quant, imported.source, kv,
                      calibration)
    rotary = rotary_note(imported.config, imported.max_seq)
    if rotary:
        result.notes.append(rotary)
    for index, phase in enumerate(PHASES[: total - 1], start=2):
        start = time.perf_counter()
        graph = phase.run(graph, ctx)
        finish(index, phase.name, graph, time.perf_counter() - start)
    if progress:
        for note in result.notes:
            progress.write(f"note: {note}\n")
    result.graph = graph
    return result


KV_FORMATS = ("f16", "f32", "int8")


def check_kv(kv: str) -> None:
    """Refuse a KV cache format llmc does not have."""
    if kv not in KV_FORMATS:
        raise UsageError(f"unknown KV cache format {kv!r}; choose {', '.join(KV_FORMATS)}")


def check_block_size(block_size: int | None) -> int:
    """The KV pool's block size (tokens per block): a power of two from 1 to 256."""
    from llmc.abi import DEFAULT_BLOCK_SIZE

    if block_size is None:
        return DEFAULT_BLOCK_SIZE
    if not isinstance(block_size, int) or isinstance(block_size, bool) or not 1 <= block_size <= 256 \
            or block_size & (block_size - 1):
        raise UsageError(f"the KV block size must be a power of two from 1 to 256 tokens, not {block_size!r}")
    return block_size


def _check_phase(until: str | None) -> str:
    until = until or PHASE_NAMES[-1]
    if until not in PHASE_NAMES:
        raise UsageError(f"unknown phase {until!r}; the phases are {', '.join(PHASE_NAMES)}")
    return until
