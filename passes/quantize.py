"""The quantize phase: linear and expert weights (and an embedding table tied to a linear) into a
scheme's format.

Every ``linear`` over a 2-D weight becomes ``qlinear`` over the quantized parts (round to nearest;
``f16`` stores the weight in half precision and casts). An embedding that reads the same table as
a quantized linear (tied embeddings, SmolLM2's LM head) becomes ``qembedding`` over the very same
parts, so the tie is kept and the matrix is stored once. Untied embeddings stay f32: a lookup
reads one row per token, so quantizing them saves memory but not time. A ``moe`` block's stacked
expert weights become a ``qmoe`` over their parts; its router stays f32.
"""

from __future__ import annotations

import numpy as np

from llmc.ir import Graph, Node
from llmc.passes.context import PassContext
from llmc.passes.rewrite import add_weight, emit, rebuild
from llmc.quant import parse_scheme, quantize


def quantize_weights(graph: Graph, ctx: PassContext) -> Graph:
    scheme = parse_scheme(ctx.quant)
    if scheme.name == "f32":
        return graph
    weights = graph.weights
    linear_weights = {n.inputs[1].attrs["name"] for n in graph.nodes()
                      if n.op == "linear" and n.inputs[1].op == "weight" and n.inputs[1].type.dtype == "f32"}
    if scheme.passthrough:
        return _passthrough(graph, ctx, linear_weights)
    expert_weights = {i.attrs["name"] for n in graph.nodes() if n.op == "moe" for i in n.inputs[2:]
                      if i.op == "weight" and i.type.dtype == "f32"}
    for name in sorted(linear_weights | expert_weights):
        scheme.check_layer(name, weights[name].shape)
    column_scales = _calibrate(graph, ctx, scheme, linear_weights)
    inverses: dict[str, Node] = {}

    def scaled_input(name: str, x: Node) -> Node:
        """x * (1/s): what a linear whose weight columns were multiplied by s must be fed."""
        if name not in column_scales:
            return x
        if name not in inverses:
            inverses[name] = add_weight(weights, f"{name}.awq_inverse", (1.0 / column_scales[name]).astype(np.float32))
        return emit("mul", [x, inverses[name]])

    parts: dict[str, list[Node]] = {}
    halves: dict[str, Node] = {}

    def half_of(name: str) -> Node:
        if name not in halves:
            halves[name] = add_weight(weights, f"{name}.f16", weights[name].astype(np.float16))
        return halves[name]

    def parts_of(name: str) -> list[Node]:
        if name not in parts:
            weight = weights[name] * column_scales[name][None, :] if name in column_scales else weights[name]
            pieces = quantize(weight, scheme)
            parts[name] = [add_weight(weights, f"{name}.{scheme.name}.{key}", pieces[key])
                           for key in ("q", "scales", "mins") if key in pieces]
        return parts[name]

    def replace(original: Node, inputs: list[Node], rebuilt) -> Node | None:
        if original.op == "linear" and original.inputs[1].op == "weight" \
                and original.inputs[1].attrs["name"] in linear_weights:
            name = original.inputs[1].attrs["name"]
            if not scheme.quantized:     # f16: half-precision storage, widened where it is read
                return emit("linear", [inputs[0], emit("cast", [half_of(name)], dtype="f32")] + inputs[2:])
            return emit("qlinear", [scaled_input(name, inputs[0])] + parts_of(name) + inputs[2:], scheme=scheme.name)
        if original.op == "moe" and all(i.op == "weight" and i.attrs["name"] in expert_weights
                                        for i in original.inputs[2:]):
            # The router stays f32, as llama.cpp keeps it: a rounded logit can change the experts chosen.
            names = [i.attrs["name"] for i in original.inputs[2:]]
            if not scheme.quantized:
                return emit("moe", inputs[:2] + [emit("cast", [half_of(n)], dtype="f32") for n in names],
                            **original.attrs)
            return emit("qmoe", inputs[:2] + parts_of(names[0]) + parts_of(names[1]), scheme=scheme.name,
                        **original.attrs)
        if original.op == "embedding" and original.inputs[0].op == "weight" \
                and original.inputs[0].attrs["name"] in linear_weights:
            name = original.inputs[0].attrs["name"]
            if not scheme.quantized:
                return emit("cast", [emit("embedding", [half_of(name), inputs[1]])], dtype="f32")
            # A tied table's rows are the scaled weight's rows: scale them back the same way.
            return scaled_input(name, emit("qembedding", parts_of(name) + [inputs[1]], scheme=scheme.name))
        return None

    return rebuild(graph, replace)



def _calibrate(graph: Graph, ctx: PassContext, scheme, names: set[str]) -> dict[str, np.ndarray]:
    """Per-column scales for each linear weight from the calibration text (empty without one)."""
    from llmc.errors import LlmcError
    from llmc.passes.calibrate import capture_linear_inputs, search_scales

    if ctx.calibration is None:
        return {}
    if not scheme.quantized:
        raise LlmcError(f"calibration sets the scales of quantized weights; {scheme.name} has none "
                        "(use it with q8, q4g32 or q4g128)")
    # A table also read by an embedding (tied LM head) serves lookups too, where dividing by
    # scales tuned for the head's inputs would amplify the quantization error: leave it RTN.
    looked_up = {n.inputs[0].attrs["name"] for n in graph.nodes() if n.op == "embedding" and n.inputs[0].op == "weight"}
    captured = capture_linear_inputs(graph, ctx.calibration, names - looked_up)
    scales = {}
    for name in sorted(captured):
        column_scales, alpha = search_scales(graph.weights[name], captured[name], scheme)
        if alpha > 0:
            scales[name] = column_scales
    return scales


def _passthrough(graph: Graph, ctx: PassContext, linear_weights: set[str]) -> Graph:
    """--quant gguf: each linear keeps its GGUF blocks (see gguf_blocks.py); others stay f32."""
    from llmc.errors import LlmcError
    from llmc.passes.gguf_blocks import GGUFRows

    source = ctx.source
    if ctx.calibration is not None:
        raise LlmcError("--quant gguf keeps the file's blocks as they are: there is nothing to calibrate")
    if source is None or getattr(source, "kind", None) != "gguf":
        raise LlmcError("--quant gguf keeps a GGUF file's quantized blocks, so the source must be a .gguf file; "
                        "for other sources choose f32, f16, q8, q4g32 or q4g128")
    rows = GGUFRows(source.path)
    weights = graph.weights
    parts: dict[str, tuple[str, list[Node]]] = {}
    kept_f32 = []
    for name in sorted(linear_weights):
        found = rows.parts_for(weights[name])
        if found is None:
            kept_f32.append(name)
            continue
        scheme, pieces = found
        parts[name] = (scheme, [add_weight(weights, f"{name}.gguf.{key}", pieces[key])
                                for key in ("q", "scales", "mins") if key in pieces])
    if kept_f32:
        ctx.note(f"quantize: {len(kept_f32)} linear weights are not stored as Q4_0/Q4_1/Q8_0 blocks in the GGUF "
                 f"and stay f32 (e.g. {kept_f32[0]})")
    routed = sum(n.op == "moe" for n in graph.nodes())
    if routed:
        ctx.note(f"quantize: the experts of {routed} moe blocks stay f32 (--quant gguf keeps the blocks of 2-D "
                 "linear weights only; q8 or q4g32 quantizes experts)")

    def replace(original: Node, inputs: list[Node], rebuilt) -> Node | None:
        if original.op == "linear" and original.inputs[1].op == "weight" and original.inputs[1].attrs["name"] in parts:
            scheme, pieces = parts[original.inputs[1].attrs["name"]]
            return emit("qlinear", [inputs[0]] + pieces + inputs[2:], scheme=scheme)
        if original.op == "embedding" and original.inputs[0].op == "weight" \
                and original.inputs[0].attrs["name"] in parts:
            scheme, pieces = parts[original.inputs[0].attrs["name"]]
            return emit("qembedding", pieces + [inputs[1]], scheme=scheme)
        return None

    return rebuild(graph, replace)
