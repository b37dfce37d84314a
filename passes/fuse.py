"""The fuse phase, in order: fold weight expressions, put linears in canonical form, recognise
activations, then the pattern table (RMSNorm, RoPE, SwiGLU/GeGLU), mixture-of-experts blocks (before
their router could be merged with a shared expert's linears), merge sibling linears, group
the elementwise chains that remain, fuse residual adds with the norms that read them, and clean up."""

from __future__ import annotations

from llmc.ir import Graph
from llmc.passes import activations, norms, rope
from llmc.passes.cleanup import simplify
from llmc.passes.context import PassContext
from llmc.passes.elementwise import group_elementwise
from llmc.passes.fold import fold_weights
from llmc.passes.linear import canonical_linear, merge_sibling_linears
from llmc.passes.moe import recognise_moe
from llmc.passes.residual import fuse_residual_norms
from llmc.passes.rewrite import rewrite

RULES = norms.RULES + rope.RULES + activations.GATED_RULES


PASSES = [
    ("fold_weights", fold_weights),
    ("canonical_linear", canonical_linear),
    ("recognise_activations", activations.recognise_activations),
    ("norms_rope_gated", lambda graph: rewrite(graph, RULES)),
    ("recognise_moe", recognise_moe),
    ("merge_sibling_linears", merge_sibling_linears),
    ("group_elementwise", group_elementwise),
    ("fuse_residual_norms", fuse_residual_norms),
    ("simplify", simplify),
]


def fuse(graph: Graph, ctx: PassContext) -> Graph:
    for name, run in PASSES:
        graph = ctx.after(name, run(graph))
    return with_used_weights(graph)


def with_used_weights(graph: Graph) -> Graph:
    """The graph over a weights dict holding only what it reads (replaced weights are left behind)."""
    used = {n.attrs["name"] for n in graph.nodes() if n.op == "weight"}
    return Graph(graph.inputs, graph.outputs, {k: v for k, v in graph.weights.items() if k in used}, graph.name)
