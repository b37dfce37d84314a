import numpy as np
import pytest

from llmc.ir import Graph, IRError, Node, Type, parse_graph, print_graph, verify

TEXT = """
graph @main(%x: f32[1, seq, 8], %ids: i64[seq]) {
  %0 = weight() {name="w"} : f32[16, 8]
  %1 = linear(%x, %0) : f32[1, seq, 16]
  %2 = const() {dtype="f32", value=0.5} : f32[]
  %3 = mul(%1, %2) : f32[1, seq, 16]
  %4 = reshape(%3) {shape=[1, "seq", 4, 4]} : f32[1, seq, 4, 4]
  %5 = slice(%4) {axis=1, end="seq", start=1, step=1} : f32[1, seq-1, 4, 4]
  %6 = gelu(%5) {approximate="tanh"} : f32[1, seq-1, 4, 4]
  return %6, %1
}
"""


def test_print_parse_round_trip():
    graph = parse_graph(TEXT)
    text = print_graph(graph)
    assert print_graph(parse_graph(text)) == text
    assert text.strip().splitlines()[0] == "graph @main(%x: f32[1, seq, 8], %ids: i64[seq]) {"
    assert '%5 = slice(%4) {axis=1, end="seq", start=1, step=1} : f32[1, seq-1, 4, 4]' in text


def test_printer_numbers_in_topological_order_and_drops_dead_code():
    x = Node("input", (), {"name": "x"}, Type("f32", ("seq",)))
    dead = Node("neg", [x], {}, Type("f32", ("seq",)))
    live = Node("exp", [x], {}, Type("f32", ("seq",)))
    text = print_graph(Graph([x], [live]))
    assert "neg" not in text and "%0 = exp(%x) : f32[seq]" in text
    assert dead.op == "neg"


def test_attribute_values_round_trip():
    graph = parse_graph("""
graph @g(%x: f32[2]) {
  %0 = full() {dtype="f32", shape=[2], value=-inf} : f32[2]
  %1 = full() {dtype="f32", shape=[2], value=1e-06} : f32[2]
  %2 = add(%0, %1) : f32[2]
  return %2
}""")
    values = [n.attrs.get("value") for n in graph.nodes() if n.op == "full"]
    assert values == [float("-inf"), 1e-06]


def test_verifier_accepts_a_good_graph():
    verify(parse_graph(TEXT, {"w": np.zeros((16, 8), np.float32)}))


@pytest.mark.parametrize("line, message", [
    ("%1 = linear(%x, %0) : f32[1, seq, 15]", "declared type"),
    ("%1 = linear(%x) : f32[1, seq, 16]", "takes 2..3 inputs"),
    ("%1 = frobnicate(%x, %0) : f32[1, seq, 16]", "unknown op"),
    ("%1 = linear(%x, %0) : f32[1, ctx, 16]", "declared type"),
])
def test_verifier_names_the_broken_node(line, message):
    bad = TEXT.replace("%1 = linear(%x, %0) : f32[1, seq, 16]", line)
    with pytest.raises(IRError, match=message):
        verify(parse_graph(bad))


def test_verifier_rejects_unbound_symbols_and_missing_weights():
    text = """
graph @g(%x: f32[4]) {
  %0 = full() {dtype="f32", shape=["ctx"], value=0.0} : f32[ctx]
  return %0
}"""
    with pytest.raises(IRError, match="not bound"):
        verify(parse_graph(text))
    with pytest.raises(IRError, match="no weight named"):
        verify(parse_graph(TEXT, {"other": np.zeros(1, np.float32)}))


def test_parser_errors():
    with pytest.raises(IRError, match="used before"):
        parse_graph("graph @g(%x: f32[2]) {\n  %0 = neg(%y) : f32[2]\n  return %0\n}")
    with pytest.raises(IRError, match="cannot parse"):
        parse_graph("graph @g(%x: f32[2]) {\n  %0 = neg(%x) f32[2]\n  return %0\n}")
    with pytest.raises(IRError, match="unknown dtype"):
        Type("f33", (1,))
