"""Mixture-of-experts blocks recovered from the traced routing, as one ``moe`` op.

What the trace holds (transformers' "batched_mm" experts, see llmc.frontend.trace), for T tokens
x, E experts, top k, P = T * k (token, choice) pairs:

    probs   = softmax(linear(x, router))                    [T, E]
    w, ids  = topk(probs, k)                                [T, k]   (w / sum(w) when normalised;
                                                                      or softmax(topk(logits)): the same)
    h       = matmul(index(gate_up, ids), x repeated k)     [P, G]   each pair's expert weights
    a       = swiglu(h[:, :I], h[:, I:])  or  act(h)         [P, I]
    y       = matmul(index(down, ids), a) * w               [P, H]
    out     = sum over the k choices of y                   [T, H]

The pass matches that dataflow by what it computes (any weight names, any family), checks that
the ids, the weights and both expert matmuls come from the same router's top-k, and replaces the
sum with ``moe(x, router, gate_up, down)`` over the expert weights stacked as 2-D [E * rows,
cols] (a quantized scheme then stores them as it stores any linear weight). Shared experts are
ordinary dense MLPs in the trace and stay so. A block it cannot match keeps the traced ops, which
read every selected expert's whole weight per token pair: correct in the reference, and refused by
name by a target without kernels for those ops.
"""

from __future__ import annotations

from llmc.ir import Graph, Node, Type
from llmc.ops import OpError, infer
from llmc.passes.rewrite import add_weight, commuted, emit, rebuild

GATED = {"swiglu": lambda n: "silu",
         "geglu": lambda n: "gelu_tanh" if n.attrs["approximate"] == "tanh" else "gelu"}
PLAIN = {"silu": lambda n: "silu", "relu": lambda n: "relu",
         "gelu": lambda n: "gelu_tanh" if n.attrs["approximate"] == "tanh" else "gelu"}


def _through_reshapes(node: Node) -> Node:
    while node.op == "reshape":
        node = node.inputs[0]
    return node


def _expert_matmul(node: Node) -> tuple[Node, Node, Node] | None:
    """(weight [E, N, K], ids [P], v [P, K]) for ``reshape(matmul(index(weight, ids), reshape(v,
    [P, K, 1])), [P, N])``: each pair's row v through its own expert's matrix."""
    if node.op != "reshape" or node.type.rank != 2 or node.inputs[0].op != "matmul":
        return None
    picked, column = node.inputs[0].inputs
    if picked.op != "index" or picked.attrs["axes"] != [0] or len(picked.inputs) != 2:
        return None
    weight, ids = picked.inputs
    if weight.op != "weight" or weight.type.rank != 3 or weight.type.dtype != "f32" or ids.type.rank != 1:
        return None
    pairs, rows, cols = ids.type.shape[0], weight.type.shape[1], weight.type.shape[2]
    if column.op != "reshape" or column.type.shape != (pairs, cols, 1) or node.type.shape != (pairs, rows):
        return None
    return weight, ids, column.inputs[0]


def _activation(a: Node, h: Node) -> tuple[str, bool] | None:
    """(act, gated) if ``a`` is the experts' activation of their first matmul's result ``h``."""
    if a.op in GATED:
        gate, up = a.inputs
        inner = a.type.shape[1]
        halves = [(n.op, n.inputs[0] if n.op == "slice" else None, n.attrs) for n in (gate, up)]
        want = [(0, inner), (inner, 2 * inner)]
        if all(op == "slice" and src is h and at["axis"] == 1 and at["step"] == 1 and (at["start"], at["end"]) == w
               for (op, src, at), w in zip(halves, want)):
            return GATED[a.op](a), True
        return None
    if a.op in PLAIN and a.inputs[0] is h:
        return PLAIN[a.op](a), False
    return None


def _route(ids: Node, weights: Node, tokens, top_k) -> tuple[Node, Node, bool] | None:
    """(x, router, normalize) if the pairs' ids and weights are one router's top-k choices:
    ids = reshape(topk(softmax(linear(x, router)))[1]), weights its values (over their sum), or
    ids = topk(linear(x, router))[1] and weights the softmax of its values (Granite MoE)."""
    chosen = _through_reshapes(ids)
    if chosen.op != "get" or chosen.attrs["index"] != 1 or chosen.inputs[0].op != "topk":
        return None
    topk = chosen.inputs[0]
    if topk.attrs["k"] != top_k or topk.attrs["axis"] != topk.type.types[0].rank - 1 or topk.type.types[0].rank != 2:
        return None
    values = _through_reshapes(weights)
    scores = topk.inputs[0]
    if scores.op == "softmax" and scores.attrs["axis"] == 1:       # softmax, top k (then over their sum)
        logits, normalize = scores.inputs[0], False
        if values.op == "div":
            top, total = values.inputs
            if not (total.op == "sum" and total.inputs[0] is top and total.attrs["axes"] == [1]
                    and total.attrs["keepdim"]):
                return None
            values, normalize = top, True
    elif values.op == "softmax" and values.attrs["axis"] == 1:    # top k of the logits, then their softmax:
        logits, values, normalize = scores, values.inputs[0], True   # the same weights, renormalised
    else:
        return None
    if not (values.op == "get" and values.attrs["index"] == 0 and values.inputs[0] is topk):
        return None
    if logits.op != "linear" or len(logits.inputs) != 2 or logits.inputs[1].op != "weight":
        return None
    x, router = logits.inputs
    if x.type.shape[0] != tokens:
        return None
    return x, router, normalize


def _stacked(weights: dict, node: Node) -> Node:
    """A 3-D expert weight [E, N, K] as the 2-D [E * N, K] the moe op reads (the same bytes)."""
    name = node.attrs["name"]
    array = weights[name]
    return add_weight(weights, f"{name}.rows", array.reshape(-1, array.shape[-1]))


def recognise_moe(graph: Graph) -> Graph:
    weights = graph.weights

    def replace(original: Node, inputs: list[Node], rebuilt) -> Node | None:
        if original.op != "sum" or original.attrs["axes"] != [1] or original.attrs["keepdim"]:
            return None
        grouped = original.inputs[0]
        if grouped.op != "reshape" or grouped.type.rank != 3 or grouped.inputs[0].op != "mul":
            return None
        tokens, top_k, hidden = grouped.type.shape
        if not isinstance(top_k, int):
            return None
        for y, w in commuted(grouped.inputs[0]):
            down = _expert_matmul(y)
            if down is None or w.type.shape != (y.type.shape[0], 1):
                continue
            down_weight, ids, a = down
            if not a.inputs or (a.op in GATED and not a.inputs[0].inputs):
                continue
            h = a.inputs[0].inputs[0] if a.op in GATED and a.inputs[0].op == "slice" else a.inputs[0]
            up = _expert_matmul(h)
            act = _activation(a, h) if up is not None and up[1] is ids else None
            if act is None:
                continue
            up_weight, _, repeated = up
            route = _route(ids, w, tokens, top_k)
            if route is None:
                continue
            x, router, normalize = route
            # the pairs' rows must be x's rows, each repeated top_k times in a row
            if not (repeated.op == "expand" and repeated.type.shape == (tokens, top_k, hidden)
                    and repeated.inputs[0].type.shape == (tokens, 1, hidden)
                    and _through_reshapes(repeated.inputs[0]) is _through_reshapes(x)):
                continue
            experts = up_weight.type.shape[0]
            if router.type.shape[0] != experts or down_weight.type.shape[0] != experts \
                    or down_weight.type.shape[1] != hidden:
                continue
            attrs = dict(experts=experts, top_k=top_k, normalize=normalize, act=act[0], gated=act[1])
            operands = [rebuilt(x), rebuilt(router)]
            stacked = [Type("f32", (experts * w.type.shape[1], w.type.shape[2])) for w in (up_weight, down_weight)]
            try:
                infer("moe", [o.type for o in operands] + stacked, attrs)
            except OpError:          # e.g. activations in another dtype: left as traced
                continue
            return emit("moe", operands + [_stacked(weights, up_weight), _stacked(weights, down_weight)], **attrs)
        return None

    return rebuild(graph, replace)

