"""The compile pipeline: one ordered list of phases, read top to bottom.

1. import    trace the model's own code and import it into llmc IR (llmc.frontend)
2. simplify  CSE, constant folding, no-op and reshape/permute chain cleanup (llmc.passes.cleanup)

Later phases (attention, fuse, quantize, plan memory, lower) join this list as they land. Each
phase prints one progress line with its time; ``dump_ir`` writes the IR after every phase; the
verifier runs after every phase when ``verify`` is on (tests, or LLMC_VERIFY=1).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from llmc.errors import LlmcError
from llmc.ir import Graph, verify as verify_graph


@dataclass(frozen=True)
class Phase:
    name: str
    doc: str
    run: Callable[[Graph], Graph]


def _simplify(graph: Graph) -> Graph:
    from llmc.passes.cleanup import simplify

    return simplify(graph)


PHASES: list[Phase] = [
    Phase("simplify", "CSE, constant folding, no-op and reshape/permute chain cleanup", _simplify),
]
PHASE_NAMES = ["import"] + [p.name for p in PHASES]


@dataclass
class PipelineResult:
    graph: Graph
    imported: Any                                   # llmc.frontend.Imported
    timings: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, dict[str, int]] = field(default_factory=dict)


def run_pipeline(source: Any, *, until: str | None = None, dump_ir: str | Path | None = None,
                 verify: bool | None = None, progress: TextIO | None = sys.stderr,
                 **import_options: Any) -> PipelineResult:
    """Run the phases on ``source`` up to and including ``until`` (default: all of them)."""
    from llmc.frontend import import_model

    until = until or PHASE_NAMES[-1]
    if until not in PHASE_NAMES:
        raise LlmcError(f"unknown phase {until!r}; the phases are {', '.join(PHASE_NAMES)}")
    if verify is None:
        verify = os.environ.get("LLMC_VERIFY") == "1"
    dump_dir = Path(dump_ir) if dump_ir else None
    if dump_dir:
        dump_dir.mkdir(parents=True, exist_ok=True)
    total = PHASE_NAMES.index(until) + 1

    def finish(index: int, name: str, graph: Graph, seconds: float) -> None:
        if verify:
            verify_graph(graph)
        result.timings[name] = seconds
        result.histograms[name] = graph.op_histogram()
        if dump_dir:
            (dump_dir / f"{index:02d}-{name}.ir").write_text(str(graph))
        if progress:
            progress.write(f"[{index}/{total}] {name:<9} {seconds:6.2f} s  {len(graph.nodes())} nodes\n")
            progress.flush()

    start = time.perf_counter()
    imported = import_model(source, **import_options)
    result = PipelineResult(imported.graph, imported)
    finish(1, "import", imported.graph, time.perf_counter() - start)
    graph = imported.graph
    for index, phase in enumerate(PHASES[: total - 1], start=2):
        start = time.perf_counter()
        graph = phase.run(graph)
        finish(index, phase.name, graph, time.perf_counter() - start)
    result.graph = graph
    return result
