import pytest

from llmc import dims


def test_canonical_forms_compare_equal():
    assert dims.canonical("1+seq") == "seq+1"
    assert dims.canonical("seq*2") == "2*seq"
    assert dims.canonical("seq-seq+3") == 3
    assert dims.canonical("(seq+1)*(seq-1)") == "seq*seq-1"
    assert dims.canonical(7) == 7


def test_arithmetic():
    assert dims.add("seq", 1) == "seq+1"
    assert dims.sub("seq+5", "seq") == 5
    assert dims.mul("seq", 9) == "9*seq"
    assert dims.product([1, "seq", 9, 64]) == "576*seq"
    assert dims.exact_div("576*seq", 64) == "9*seq"
    with pytest.raises(dims.DimError):
        dims.exact_div("seq+1", 2)


def test_evaluate_and_symbols():
    assert dims.evaluate("2*seq+ctx", {"seq": 3, "ctx": 10}) == 16
    assert dims.symbols("seq*ctx+seq") == {"seq", "ctx"}
    with pytest.raises(dims.DimError, match="not bound"):
        dims.evaluate("seq", {})


def test_malformed():
    for text in ("seq+", "(seq", "seq/2", ""):
        with pytest.raises(dims.DimError):
            dims.canonical(text)
