"""The simplify phase: Before/Expected pairs in the text IR, and numerics preserved on real graphs."""

import numpy as np
import pytest

from conftest import tiny_model
from llmc.frontend import import_model
from llmc.interpret import run
from llmc.ir import parse_graph, print_graph, verify
from llmc.passes.cleanup import eliminate_common_subexpressions, simplify
from llmc.passes.rewrite import P, RewriteError, rewrite


def assert_rewrites(before: str, expected: str, transform=simplify):
    graph = parse_graph(before)
    verify(graph)
    after = transform(graph)
    verify(after)
    assert print_graph(after) == print_graph(parse_graph(expected))


def test_noop_cast_reshape_expand_slice_permute_vanish():
    assert_rewrites("""
graph @g(%x: f32[2, seq, 4]) {
  %0 = cast(%x) {dtype="f32"} : f32[2, seq, 4]
  %1 = reshape(%0) {shape=[2, "seq", 4]} : f32[2, seq, 4]
  %2 = expand(%1) {shape=[2, "seq", 4]} : f32[2, seq, 4]
  %3 = slice(%2) {axis=1, end="seq", start=0, step=1} : f32[2, seq, 4]
  %4 = permute(%3) {perm=[0, 1, 2]} : f32[2, seq, 4]
  %5 = concat(%4) {axis=0} : f32[2, seq, 4]
  %6 = exp(%5) : f32[2, seq, 4]
  return %6
}""", """
graph @g(%x: f32[2, seq, 4]) {
  %0 = exp(%x) : f32[2, seq, 4]
  return %0
}""")


def test_reshape_and_permute_chains_collapse():
    assert_rewrites("""
graph @g(%x: f32[seq, 12]) {
  %0 = reshape(%x) {shape=["seq", 3, 4]} : f32[seq, 3, 4]
  %1 = reshape(%0) {shape=[1, "seq", 12]} : f32[1, seq, 12]
  %2 = permute(%1) {perm=[1, 0, 2]} : f32[seq, 1, 12]
  %3 = permute(%2) {perm=[2, 0, 1]} : f32[12, seq, 1]
  return %3
}""", """
graph @g(%x: f32[seq, 12]) {
  %0 = reshape(%x) {shape=[1, "seq", 12]} : f32[1, seq, 12]
  %1 = permute(%0) {perm=[2, 1, 0]} : f32[12, seq, 1]
  return %1
}""")


def test_inverse_permutes_and_round_trip_reshapes_cancel():
    assert_rewrites("""
graph @g(%x: f32[seq, 2, 4]) {
  %0 = permute(%x) {perm=[1, 0, 2]} : f32[2, seq, 4]
  %1 = permute(%0) {perm=[1, 0, 2]} : f32[seq, 2, 4]
  %2 = reshape(%1) {shape=["seq", 8]} : f32[seq, 8]
  %3 = reshape(%2) {shape=["seq", 2, 4]} : f32[seq, 2, 4]
  return %3
}""", """
graph @g(%x: f32[seq, 2, 4]) {
  return %x
}""")


def test_the_reciprocal_of_a_square_root_is_rsqrt():
    """ONNX has no rsqrt: RMSNorm arrives as Sqrt then Reciprocal, and the norm pass reads rsqrt."""
    before = """
graph @g(%x: f32[seq, 4]) {
  %0 = sqrt(%x) : f32[seq, 4]
  %1 = reciprocal(%0) : f32[seq, 4]
  return %1
}"""
    assert_rewrites(before, """
graph @g(%x: f32[seq, 4]) {
  %0 = rsqrt(%x) : f32[seq, 4]
  return %0
}""")
    x = np.random.default_rng(3).uniform(0.01, 9.0, (7, 4)).astype(np.float32)
    np.testing.assert_allclose(run(simplify(parse_graph(before)), [x])[0], run(parse_graph(before), [x])[0], rtol=1e-6)


def test_multiplying_by_one_and_adding_zero_only_when_nothing_broadcasts():
    assert_rewrites("""
graph @g(%x: f32[3, 4]) {
  %0 = const() {dtype="f32", value=1.0} : f32[]
  %1 = mul(%x, %0) : f32[3, 4]
  %2 = const() {dtype="f32", value=0.0} : f32[]
  %3 = add(%1, %2) : f32[3, 4]
  %4 = full() {dtype="f32", shape=[2, 3, 4], value=1.0} : f32[2, 3, 4]
  %5 = mul(%3, %4) : f32[2, 3, 4]
  return %5
}""", """
graph @g(%x: f32[3, 4]) {
  %0 = full() {dtype="f32", shape=[2, 3, 4], value=1.0} : f32[2, 3, 4]
  %1 = mul(%x, %0) : f32[2, 3, 4]
  return %1
}""")


def test_scalar_constants_fold():
    assert_rewrites("""
graph @g(%x: f32[5]) {
  %0 = const() {dtype="f32", value=64.0} : f32[]
  %1 = rsqrt(%0) : f32[]
  %2 = const() {dtype="f32", value=2.0} : f32[]
  %3 = mul(%1, %2) : f32[]
  %4 = mul(%x, %3) : f32[5]
  return %4
}""", """
graph @g(%x: f32[5]) {
  %0 = const() {dtype="f32", value=0.25} : f32[]
  %1 = mul(%x, %0) : f32[5]
  return %1
}""")


def test_common_subexpressions_are_shared():
    assert_rewrites("""
graph @g(%x: f32[4]) {
  %0 = exp(%x) : f32[4]
  %1 = exp(%x) : f32[4]
  %2 = add(%0, %1) : f32[4]
  return %2
}""", """
graph @g(%x: f32[4]) {
  %0 = exp(%x) : f32[4]
  %1 = add(%0, %0) : f32[4]
  return %1
}""", transform=eliminate_common_subexpressions)


def test_a_rule_that_changes_the_type_is_caught():
    graph = parse_graph("graph @g(%x: f32[4]) {\n  %0 = exp(%x) : f32[4]\n  return %0\n}")
    bad_rule = (P("exp", P(name="x"), name="root"),
                lambda x, root: parse_graph("graph @h(%y: f32[5]) {\n  return %y\n}").outputs[0])
    with pytest.raises(RewriteError, match="of type f32\\[4\\]"):
        rewrite(graph, [bad_rule])


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_simplify_preserves_numerics_and_shrinks_the_graph(family):
    graph = import_model(tiny_model(family)).graph
    simplified = simplify(graph)
    verify(simplified)
    assert len(simplified.nodes()) < len(graph.nodes())
    for length in (1, 67):
        ids = np.random.default_rng(length).integers(0, 128, (1, length))
        np.testing.assert_allclose(run(simplified, [ids])[0], run(graph, [ids])[0], rtol=1e-6, atol=1e-6)
