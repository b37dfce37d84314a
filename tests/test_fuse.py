"""The fuse phase's passes: Before/Expected pairs in the text IR, each also run through the
interpreter on random weights and inputs to show the rewrite preserves numerics."""

import numpy as np

from llmc import dims
from llmc.interpret import run
from llmc.ir import numpy_dtype, parse_graph, print_graph, verify
from llmc.passes import activations, norms, rope
from llmc.passes.elementwise import group_elementwise
from llmc.passes.fold import fold_weights
from llmc.passes.linear import canonical_linear, merge_sibling_linears
from llmc.passes.rewrite import rewrite

rng = np.random.default_rng()


def random_weights(text: str) -> dict:
    graph = parse_graph(text)
    return {n.attrs["name"]: rng.standard_normal(n.type.shape).astype(numpy_dtype(n.type.dtype))
            for n in graph.nodes() if n.op == "weight"}


def random_inputs(graph, seq=5):
    arrays = []
    for node in graph.inputs:
        shape = tuple(dims.evaluate(d, {"seq": seq}) for d in node.type.shape)
        arrays.append(rng.standard_normal(shape).astype(numpy_dtype(node.type.dtype)))
    return arrays


def check(before: str, expected: str, transform):
    weights = random_weights(before)
    graph = parse_graph(before, weights)
    verify(graph)
    after = transform(graph)
    verify(after)
    assert print_graph(after) == print_graph(parse_graph(expected, weights))
    inputs = random_inputs(graph)
    np.testing.assert_allclose(run(after, inputs)[0], run(graph, inputs)[0], rtol=2e-5, atol=2e-6)
    return after


def table(rules):
    return lambda graph: rewrite(graph, rules)


def test_rms_norm_any_operand_order():
    check("""
graph @g(%x: f32[1, seq, 8]) {
  %0 = const() {dtype="f32", value=2.0} : f32[]
  %1 = pow(%x, %0) : f32[1, seq, 8]
  %2 = mean(%1) {axes=[2], keepdim=true} : f32[1, seq, 1]
  %3 = const() {dtype="f32", value=1e-06} : f32[]
  %4 = add(%3, %2) : f32[1, seq, 1]
  %5 = rsqrt(%4) : f32[1, seq, 1]
  %6 = mul(%5, %x) : f32[1, seq, 8]
  %7 = weight() {name="w"} : f32[8]
  %8 = mul(%6, %7) : f32[1, seq, 8]
  return %8
}""", """
graph @g(%x: f32[1, seq, 8]) {
  %0 = weight() {name="w"} : f32[8]
  %1 = rms_norm(%x, %0) {eps=1e-06} : f32[1, seq, 8]
  return %1
}""", table(norms.RULES))


def test_rms_norm_without_eps_is_eps_zero():
    """An exporter may fold a tiny eps away (torch.onnx drops Helium's 1e-8): rsqrt(mean(x*x))."""
    check("""
graph @g(%x: f32[1, seq, 8]) {
  %1 = mul(%x, %x) : f32[1, seq, 8]
  %2 = mean(%1) {axes=[2], keepdim=true} : f32[1, seq, 1]
  %5 = rsqrt(%2) : f32[1, seq, 1]
  %6 = mul(%x, %5) : f32[1, seq, 8]
  %7 = weight() {name="w"} : f32[8]
  %8 = mul(%7, %6) : f32[1, seq, 8]
  return %8
}""", """
graph @g(%x: f32[1, seq, 8]) {
  %0 = weight() {name="w"} : f32[8]
  %1 = rms_norm(%x, %0) {eps=0.0} : f32[1, seq, 8]
  return %1
}""", table(norms.RULES))


def test_gemma_norm_weight_is_folded_first():
    after = check("""
graph @g(%x: f32[seq, 8]) {
  %0 = mul(%x, %x) : f32[seq, 8]
  %1 = mean(%0) {axes=[1], keepdim=true} : f32[seq, 1]
  %2 = const() {dtype="f32", value=1e-06} : f32[]
  %3 = add(%1, %2) : f32[seq, 1]
  %4 = rsqrt(%3) : f32[seq, 1]
  %5 = mul(%x, %4) : f32[seq, 8]
  %6 = weight() {name="w"} : f32[8]
  %7 = const() {dtype="f32", value=1.0} : f32[]
  %8 = add(%6, %7) : f32[8]
  %9 = mul(%5, %8) : f32[seq, 8]
  return %9
}""", """
graph @g(%x: f32[seq, 8]) {
  %0 = weight() {name="w.add"} : f32[8]
  %1 = rms_norm(%x, %0) {eps=1e-06} : f32[seq, 8]
  return %1
}""", lambda g: rewrite(fold_weights(g), norms.RULES))
    np.testing.assert_array_equal(after.weights["w.add"], after.weights["w"] + 1)


def test_rotate_half_becomes_rope():
    check("""
graph @g(%x: f32[1, 2, seq, 8], %cos: f32[1, 1, seq, 8], %sin: f32[1, 1, seq, 8]) {
  %0 = mul(%cos, %x) : f32[1, 2, seq, 8]
  %1 = slice(%x) {axis=3, end=8, start=4, step=1} : f32[1, 2, seq, 4]
  %2 = neg(%1) : f32[1, 2, seq, 4]
  %3 = slice(%x) {axis=3, end=4, start=0, step=1} : f32[1, 2, seq, 4]
  %4 = concat(%2, %3) {axis=3} : f32[1, 2, seq, 8]
  %5 = mul(%4, %sin) : f32[1, 2, seq, 8]
  %6 = add(%5, %0) : f32[1, 2, seq, 8]
  return %6
}""", """
graph @g(%x: f32[1, 2, seq, 8], %cos: f32[1, 1, seq, 8], %sin: f32[1, 1, seq, 8]) {
  %0 = rope(%x, %cos, %sin) : f32[1, 2, seq, 8]
  return %0
}""", table(rope.RULES))


INTERLEAVED = """
graph @g(%x: f32[1, 2, seq, 8], %cos: f32[1, 1, seq, 8], %sin: f32[1, 1, seq, 8]) {
  %0 = mul(%x, %cos) : f32[1, 2, seq, 8]
  %1 = slice(%x) {axis=3, end=8, start=ODD, step=2} : f32[1, 2, seq, 4]
  %2 = neg(%1) : f32[1, 2, seq, 4]
  %3 = reshape(%2) {shape=[1, 2, "seq", 4, 1]} : f32[1, 2, seq, 4, 1]
  %4 = slice(%x) {axis=3, end=7, start=EVEN, step=2} : f32[1, 2, seq, 4]
  %5 = reshape(%4) {shape=[1, 2, "seq", 4, 1]} : f32[1, 2, seq, 4, 1]
  %6 = concat(%3, %5) {axis=4} : f32[1, 2, seq, 4, 2]
  %7 = reshape(%6) {shape=[1, 2, "seq", 8]} : f32[1, 2, seq, 8]
  %8 = mul(%7, %sin) : f32[1, 2, seq, 8]
  %9 = add(%0, %8) : f32[1, 2, seq, 8]
  return %9
}"""


def test_rotate_pairs_becomes_an_interleaved_rope():
    """stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2), as Helium, Cohere and GPT-J trace it."""
    check(INTERLEAVED.replace("ODD", "1").replace("EVEN", "0"), """
graph @g(%x: f32[1, 2, seq, 8], %cos: f32[1, 1, seq, 8], %sin: f32[1, 1, seq, 8]) {
  %0 = rope(%x, %cos, %sin) {interleaved=true} : f32[1, 2, seq, 8]
  return %0
}""", table(rope.RULES))


def test_pairs_rotated_the_other_way_are_not_rope():
    text = INTERLEAVED.replace("ODD", "0").replace("EVEN", "1").replace("end=7", "end=8")
    check(text, text, table(rope.RULES))


def test_a_rotation_of_other_halves_is_not_rope():
    text = """
graph @g(%x: f32[seq, 8], %cos: f32[seq, 8], %sin: f32[seq, 8]) {
  %0 = mul(%x, %cos) : f32[seq, 8]
  %1 = slice(%x) {axis=1, end=4, start=0, step=1} : f32[seq, 4]
  %2 = neg(%1) : f32[seq, 4]
  %3 = slice(%x) {axis=1, end=8, start=4, step=1} : f32[seq, 4]
  %4 = concat(%2, %3) {axis=1} : f32[seq, 8]
  %5 = mul(%4, %sin) : f32[seq, 8]
  %6 = add(%0, %5) : f32[seq, 8]
  return %6
}"""
    check(text, text, table(rope.RULES))


def test_gated_mlps():
    check("""
graph @g(%g: f32[seq, 6], %u: f32[seq, 6], %h: f32[seq, 6]) {
  %0 = silu(%g) : f32[seq, 6]
  %1 = mul(%u, %0) : f32[seq, 6]
  %2 = gelu(%h) {approximate="tanh"} : f32[seq, 6]
  %3 = mul(%2, %1) : f32[seq, 6]
  return %3
}""", """
graph @g(%g: f32[seq, 6], %u: f32[seq, 6], %h: f32[seq, 6]) {
  %0 = swiglu(%g, %u) : f32[seq, 6]
  %1 = geglu(%h, %0) {approximate="tanh"} : f32[seq, 6]
  return %1
}""", table(activations.GATED_RULES))


GPT2_GELU = """
graph @g(%x: f32[seq, 6]) {
  %0 = const() {dtype="f32", value=0.5} : f32[]
  %1 = mul(%x, %0) : f32[seq, 6]
  %2 = const() {dtype="f32", value=3.0} : f32[]
  %3 = pow(%x, %2) : f32[seq, 6]
  %4 = const() {dtype="f32", value=0.044715} : f32[]
  %5 = mul(%3, %4) : f32[seq, 6]
  %6 = add(%x, %5) : f32[seq, 6]
  %7 = const() {dtype="f32", value=0.7978845608028654} : f32[]
  %8 = mul(%6, %7) : f32[seq, 6]
  %9 = tanh(%8) : f32[seq, 6]
  %10 = const() {dtype="f32", value=1.0} : f32[]
  %11 = add(%9, %10) : f32[seq, 6]
  %12 = mul(%1, %11) : f32[seq, 6]
  return %12
}"""


def test_hand_written_gelu_is_recognised_by_what_it_computes():
    check(GPT2_GELU, """
graph @g(%x: f32[seq, 6]) {
  %0 = gelu(%x) {approximate="tanh"} : f32[seq, 6]
  return %0
}""", activations.recognise_activations)


def test_a_near_miss_is_left_alone():
    text = GPT2_GELU.replace("value=0.044715", "value=0.05")
    check(text, text, activations.recognise_activations)


def test_conv1d_matmul_becomes_linear_with_transposed_weight():
    after = check("""
graph @g(%x: f32[seq, 4]) {
  %0 = weight() {name="c_attn.weight"} : f32[4, 6]
  %1 = matmul(%x, %0) : f32[seq, 6]
  %2 = weight() {name="c_attn.bias"} : f32[6]
  %3 = add(%1, %2) : f32[seq, 6]
  return %3
}""", """
graph @g(%x: f32[seq, 4]) {
  %0 = weight() {name="c_attn.weight.T"} : f32[6, 4]
  %1 = weight() {name="c_attn.bias"} : f32[6]
  %2 = linear(%x, %0, %1) : f32[seq, 6]
  return %2
}""", canonical_linear)
    assert after.weights["c_attn.weight.T"].flags["C_CONTIGUOUS"]


def test_sibling_linears_merge():
    after = check("""
graph @g(%x: f32[seq, 4], %y: f32[seq, 4]) {
  %0 = weight() {name="attn.q_proj.weight"} : f32[4, 4]
  %1 = linear(%x, %0) : f32[seq, 4]
  %2 = weight() {name="attn.k_proj.weight"} : f32[2, 4]
  %3 = linear(%x, %2) : f32[seq, 2]
  %4 = weight() {name="attn.v_proj.weight"} : f32[2, 4]
  %5 = linear(%x, %4) : f32[seq, 2]
  %6 = linear(%y, %4) : f32[seq, 2]
  %7 = concat(%1, %3, %5, %6) {axis=1} : f32[seq, 10]
  return %7
}""", """
graph @g(%x: f32[seq, 4], %y: f32[seq, 4]) {
  %0 = weight() {name="attn.{q_proj,k_proj,v_proj}.weight"} : f32[8, 4]
  %1 = linear(%x, %0) : f32[seq, 8]
  %2 = slice(%1) {axis=1, end=4, start=0, step=1} : f32[seq, 4]
  %3 = slice(%1) {axis=1, end=6, start=4, step=1} : f32[seq, 2]
  %4 = slice(%1) {axis=1, end=8, start=6, step=1} : f32[seq, 2]
  %5 = weight() {name="attn.v_proj.weight"} : f32[2, 4]
  %6 = linear(%y, %5) : f32[seq, 2]
  %7 = concat(%2, %3, %4, %6) {axis=1} : f32[seq, 10]
  return %7
}""", merge_sibling_linears)
    assert after.weights["attn.{q_proj,k_proj,v_proj}.weight"].shape == (8, 4)


def test_elementwise_chains_become_one_loop():
    check("""
graph @g(%x: f32[seq, 6], %b: f32[6]) {
  %0 = add(%x, %b) : f32[seq, 6]
  %1 = const() {dtype="f32", value=0.5} : f32[]
  %2 = mul(%0, %1) : f32[seq, 6]
  %3 = gelu(%2) {approximate="none"} : f32[seq, 6]
  %4 = exp(%0) : f32[seq, 6]
  %5 = concat(%3, %4) {axis=1} : f32[seq, 12]
  return %5
}""", """
graph @g(%x: f32[seq, 6], %b: f32[6]) {
  %0 = add(%x, %b) : f32[seq, 6]
  %1 = const() {dtype="f32", value=0.5} : f32[]
  %2 = fused(%0, %1) {body=[["mul", "in0", "in1"], ["gelu", "t0", "approximate=\\"none\\""]]} : f32[seq, 6]
  %3 = exp(%0) : f32[seq, 6]
  %4 = concat(%2, %3) {axis=1} : f32[seq, 12]
  return %4
}""", group_elementwise)


def test_residual_add_fuses_with_the_norm_that_reads_it():
    from llmc.passes.residual import fuse_residual_norms

    check("""
graph @g(%a: f32[seq, 8], %b: f32[seq, 8]) {
  %0 = add(%a, %b) : f32[seq, 8]
  %1 = weight() {name="w"} : f32[8]
  %2 = rms_norm(%0, %1) {eps=1e-05} : f32[seq, 8]
  %3 = weight() {name="up"} : f32[8, 8]
  %4 = linear(%2, %3) : f32[seq, 8]
  %5 = add(%0, %4) : f32[seq, 8]
  %6 = weight() {name="ln.weight"} : f32[8]
  %7 = weight() {name="ln.bias"} : f32[8]
  %8 = layer_norm(%5, %6, %7) {eps=1e-05} : f32[seq, 8]
  return %8
}""", """
graph @g(%a: f32[seq, 8], %b: f32[seq, 8]) {
  %0 = weight() {name="w"} : f32[8]
  %1 = add_norm(%a, %b, %0) {eps=1e-05, norm="rms"} : (f32[seq, 8], f32[seq, 8])
  %2 = get(%1) {index=0} : f32[seq, 8]
  %3 = get(%1) {index=1} : f32[seq, 8]
  %4 = weight() {name="up"} : f32[8, 8]
  %5 = linear(%3, %4) : f32[seq, 8]
  %6 = weight() {name="ln.weight"} : f32[8]
  %7 = weight() {name="ln.bias"} : f32[8]
  %8 = add_norm(%2, %5, %6, %7) {eps=1e-05, norm="layer"} : (f32[seq, 8], f32[seq, 8])
  %9 = get(%8) {index=1} : f32[seq, 8]
  return %9
}""", fuse_residual_norms)
