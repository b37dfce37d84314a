"""Target ``ref``: the optimised step graph as IR text, run by the numpy reference interpreter.
Portable and slow: the oracle the compiled targets are checked against. Every artifact carries
the same IR text (section "graph"), so any of them can be replayed here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import DEFAULT_MAX_TOKENS, Build, pool_arrays


@dataclass(frozen=True)
class Options:
    """The reference interpreter has nothing to choose."""


def check(options: Options) -> None:
    """Every Options is valid."""


def emit(graph, options: Options, progress=None) -> Build:
    """Nothing beyond the IR text every artifact holds."""
    return Build({}, {"name": "ref", "executor": "reference interpreter (numpy)"}, DEFAULT_MAX_TOKENS,
                 summary="the IR as it is, run by the numpy interpreter")


def describe(artifact) -> list[str]:
    return []


def runs_here(manifest) -> tuple[bool, None]:
    return True, None


def read_graphs(artifact) -> dict:
    """Entry name -> its step graph, read from the artifact's IR text over its weights and
    verified; an ArtifactError when the text or a weight does not fit the graph."""
    from llmc.artifact import ArtifactError
    from llmc.ir import IRError, parse_graph, verify

    weights = artifact.weights()
    try:
        graphs = {name: parse_graph(bytes(artifact.section(entry["graph"])).decode(), weights)
                  for name, entry in artifact.manifest["entry_points"].items()}
        for graph in graphs.values():
            verify(graph)
    except KeyError as exc:
        raise ArtifactError(f"{artifact.path}: its graph reads weight {exc}, which its manifest's tensors lack; "
                            "rebuild the artifact") from None
    except (IRError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{artifact.path}: its graph cannot be read ({exc}); rebuild the artifact") from None
    return graphs


def check_artifact(artifact) -> None:
    """The graph reads, and every weight it names is in the manifest with its type."""
    read_graphs(artifact)


class ReferenceExecutor:
    """The artifact's step graph, run by the reference interpreter over a host KV pool."""

    def __init__(self, artifact, threads: int | None = None):
        self.artifact = artifact
        self.graphs = read_graphs(artifact)
        self.pool: list[np.ndarray] = []

    def allocate_pool(self, blocks: int) -> int:
        self.pool = pool_arrays(self.artifact, blocks)
        return sum(a.nbytes for a in self.pool)

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        from llmc.interpret import run

        graph = self.graphs[entry]
        pool = dict(zip((n.attrs["name"] for n in graph.inputs[len(inputs):]), self.pool))
        return run(graph, {**inputs, **pool})[0]


def executor(artifact, threads: int | None = None) -> ReferenceExecutor:
    return ReferenceExecutor(artifact, threads)
