"""Quantization schemes: round-trip error bounds, clear errors, the quantize phase and perplexity."""

import math

import numpy as np
import pytest
import torch

from conftest import new_pool, relative_error, run_step, tiny_model
from llmc.errors import UsageError
from llmc.frontend import import_model
from llmc.pipeline import run_phases
from llmc.quant import QuantError, dequantize, parse_scheme, quantize

rng = np.random.default_rng()


@pytest.mark.parametrize("code", ["q8", "q4g32", "q4g128"])
def test_round_trip_error_is_bounded_by_half_a_step(code):
    scheme = parse_scheme(code)
    weight = (rng.standard_normal((13, 384)) * rng.uniform(0.01, 3, (13, 1))).astype(np.float32)
    parts = quantize(weight, scheme)
    back = dequantize(parts, scheme, 384)
    error = np.abs(back - weight).reshape(13, -1, scheme.group).max(axis=-1)
    step = parts["scales"].astype(np.float32)
    # Half a quantization step, plus what storing scale (and min) in f16 costs.
    slack = 2 ** -10 * (127 if scheme.bits == 8 else 15) * step
    if "mins" in parts:
        slack += 2 ** -10 * np.abs(parts["mins"].astype(np.float32))
    assert np.all(error <= 0.5 * step + slack + 1e-7)
    expected_bytes = {"q8": 384 + 12 * 2, "q4g32": 192 + 12 * 4, "q4g128": 192 + 3 * 4}[code]
    assert sum(p[0].nbytes for p in parts.values()) == expected_bytes


def test_every_scheme_stores_the_parts_it_declares():
    """The registry is the one description of a format: what quantize writes, what the ops check
    (qlinear's type inference) and how many parts the lowerings read."""
    from llmc import ops
    from llmc.ir import Type
    from llmc.quant import SCHEMES

    quantized = [s for s in SCHEMES.values() if s.format is not None]
    assert {s.name for s in quantized} == {"q8", "q4g32", "q4g128"}
    for scheme in quantized:
        parts = quantize(rng.standard_normal((6, 256)).astype(np.float32), scheme)
        assert tuple(parts) == scheme.parts
        types = scheme.part_types(6, 256)
        assert [(str(a.dtype), a.shape) for a in parts.values()] == \
            [({"i8": "int8", "u8": "uint8", "f16": "float16"}[d], shape) for d, shape in types]
        assert scheme.cols(parts["q"].shape[1]) == 256
        x = Type("f32", (3, 256))
        want = [Type(d, shape) for d, shape in types]
        assert ops.infer("qlinear", [x] + want, {"scheme": scheme.name}) == Type("f32", (3, 6))
        wrong = want[:-1] + [Type("f32", want[-1].shape)]
        with pytest.raises(Exception, match="weight parts"):
            ops.infer("qlinear", [x] + wrong, {"scheme": scheme.name})


def test_constant_and_zero_groups_survive():
    weight = np.zeros((2, 64), np.float32)
    weight[1] = 0.25
    for code in ("q8", "q4g32"):
        scheme = parse_scheme(code)
        np.testing.assert_allclose(dequantize(quantize(weight, scheme), scheme, 64), weight, atol=1e-3)


def test_bad_schemes_list_the_valid_ones():
    for code in ("q3", "q4g64", "int8", ""):
        with pytest.raises(UsageError, match="valid schemes: f32, f16, q8, q4g32, q4g128"):
            parse_scheme(code)
    with pytest.raises(QuantError, match="does not divide the 100 inputs of layer.x"):
        parse_scheme("q4g128").check_layer("layer.x", (8, 100))


@pytest.mark.parametrize("code, tolerance", [("f16", 1e-3), ("q8", 2e-2), ("q4g32", 0.2)])
def test_quantized_graphs_stay_close_and_keep_the_tie(code, tolerance):
    model = tiny_model("llama")                         # tied embeddings
    result = run_phases(import_model(model), progress=None, quant=code)
    graph = result.graph
    ids = np.arange(3, 40)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids[None])).logits[0].numpy()
    got = run_step(graph, new_pool(graph, 4), ids, 0, [3, 2, 1, 0], rows="all")
    assert relative_error(got, want) < tolerance
    assert not any(a.dtype == np.float32 and a.shape == (128, 64) for a in graph.weights.values())  # no f32 table
    if code != "f16":
        histogram = graph.op_histogram()
        assert histogram["qlinear"] == 9 and histogram["qembedding"] == 1 and "linear" not in histogram


def test_a_group_that_does_not_divide_a_layer_is_refused():
    with pytest.raises(QuantError, match="groups 128 weights, which does not divide the 64 inputs of model\\."):
        run_phases(import_model(tiny_model("llama")), progress=None, quant="q4g128")


def test_perplexity_matches_a_direct_computation(tmp_path):
    import llmc
    from llmc.compiler import compile_model
    from llmc.runtime.evaluate import perplexity

    model = tiny_model("qwen2")
    # an f32 KV cache: the direct computation is fp32 throughout (the default f16 pool rounds the
    # keys and values, which moved the perplexity past 1e-5 on some random ids)
    compile_model(model, tmp_path / "t.llmc", kv="f32", progress=None)
    loaded = llmc.load(tmp_path / "t.llmc", max_context=64)
    ids = rng.integers(0, 128, 50).tolist()
    result = perplexity(loaded, ids, context=20, stride=7)
    assert result.tokens == 49
    # Direct: each token scored once, with the context of the window that first scores it.
    total, scored = 0.0, 1
    for begin in range(0, 49, 7):
        end = min(begin + 20, 50)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[begin:end]])).logits[0].double()
        log_probs = torch.log_softmax(logits, -1)
        for t in range(max(scored, begin + 1), end):
            total -= float(log_probs[t - begin - 1, ids[t]])
        scored = end
        if end == 50:
            break
    assert result.perplexity == pytest.approx(math.exp(total / 49), rel=1e-5)


def test_activation_aware_scales_beat_round_to_nearest_where_channels_differ():
    from llmc.passes.calibrate import search_scales

    scheme = parse_scheme("q4g32")
    channels = np.where(np.arange(128) % 16 == 0, 30.0, 0.3)          # a few salient input channels
    calib = (rng.standard_normal((256, 128)) * channels).astype(np.float32)
    held_out = (rng.standard_normal((256, 128)) * channels).astype(np.float32)
    weight = rng.standard_normal((64, 128)).astype(np.float32)
    scales, alpha = search_scales(weight, calib, scheme)
    assert alpha > 0

    def output_error(w):
        return float(np.mean((held_out @ w.T - held_out @ weight.T) ** 2))

    rtn = dequantize(quantize(weight, scheme), scheme, 128)
    awq = dequantize(quantize(weight * scales, scheme), scheme, 128) / scales
    assert output_error(awq) < 0.7 * output_error(rtn)


def test_weights_already_on_a_4_bit_grid_keep_round_to_nearest():
    from llmc.passes.calibrate import search_scales

    scheme = parse_scheme("q4g32")
    on_grid = dequantize(quantize(rng.standard_normal((16, 64)).astype(np.float32), scheme), scheme, 64)
    inputs = (rng.standard_normal((128, 64)) * rng.uniform(0.1, 10, 64)).astype(np.float32)
    assert search_scales(on_grid, inputs, scheme)[1] == 0.0     # as with SmolLM2's dequantized Q4_1


def test_calibrated_graph_runs_and_scales_only_untied_linears():
    model = tiny_model("llama")
    calibration = rng.integers(0, 128, 200)
    graph = run_phases(import_model(model), progress=None, quant="q4g32", calibration=calibration).graph
    scaled = {n.inputs[1].attrs["name"] for n in graph.nodes() if n.op == "mul" and n.inputs[1].op == "weight"
              and n.inputs[1].attrs["name"].endswith(".awq_inverse")}
    assert scaled                                                          # some layers chose alpha > 0
    assert not any("embed_tokens" in name for name in scaled)              # the tied table stays RTN
    ids = np.arange(3, 40)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids[None])).logits[0, -1].numpy()
    assert relative_error(run_step(graph, new_pool(graph, 4), ids, 0, [0, 1, 2, 3])[0], want) < 0.2


def test_calibration_needs_a_tokenizer_and_a_quantized_scheme(tmp_path):
    from llmc.compiler import compile_model
    from llmc.errors import LlmcError

    with pytest.raises(LlmcError, match="calibration needs the model's tokenizer"):
        compile_model(tiny_model("llama"), tmp_path / "x.llmc", quant="q8", calib="default", progress=None)
    with pytest.raises(LlmcError, match="f16 has none"):
        run_phases(import_model(tiny_model("llama")), progress=None, quant="f16", calibration=np.arange(20))
