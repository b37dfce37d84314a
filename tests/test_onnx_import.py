"""ONNX decoders as a model source (llmc.frontend.onnx_model): each tiny family exported by
torch.onnx.export imports, builds for cpu and decodes as transformers does; a file that is not a
decoder's forward, or uses an op llmc does not know, is refused in one line."""

import numpy as np
import pytest

from conftest import FAMILIES, byte_tokenizer, tiny_model
from llmc.compiler import compile_model
from llmc.errors import LlmcError, SourceError, UnsupportedModelError, UnsupportedOpError
from llmc.frontend import import_model
from test_cli import assert_one_line_error, llmc as llmc_cli
from test_runtime import greedy_reference

import llmc

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


class LogitsOnly:
    """The forward torch.onnx.export is given: token ids -> logits, no cache."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids):
                return self.model(input_ids=input_ids, use_cache=False).logits

        return Wrapper().eval()


def export(model, path, *, dynamic: bool = True):
    """``model`` as torch.onnx.export writes it (the dynamo exporter, its default)."""
    import torch

    ids = torch.zeros((1, 8), dtype=torch.long)
    shapes = {"input_ids": {1: torch.export.Dim("sequence", min=1, max=256)}} if dynamic else None
    torch.onnx.export(LogitsOnly(model), (ids,), str(path), input_names=["input_ids"], output_names=["logits"],
                      dynamic_shapes=shapes, dynamo=True, verbose=False)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (transformers model, its exported .onnx path), each made once when first asked for."""
    made = {}

    def get(name):
        if name not in made:
            model = tiny_model(name)
            folder = tmp_path_factory.mktemp(f"onnx-{name}")
            made[name] = model, export(model, folder / "model.onnx")
        return made[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_an_exported_family_builds_for_cpu_and_decodes_like_transformers(exported, name, tmp_path):
    model, path = exported(name)
    imported = import_model(path)
    ids = np.random.default_rng(1).integers(0, 128, (1, 21))
    import torch

    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
    from llmc.interpret import run

    got = run(imported.graph, [ids])[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    artifact = tmp_path / f"{name}.llmc"
    report = compile_model(path, artifact, target="cpu", progress=None)
    assert not [n for n in report.notes if n.startswith("attention")], report.notes     # a paged KV cache
    loaded = llmc.load(artifact, max_context=128)
    prompt = [5, 77, 3, 101, 64, 9, 12, 1, 33]
    assert loaded.generate(prompt, max_new_tokens=64) == greedy_reference(model, prompt, 64)
    assert loaded.manifest["model"]["kind"] == "onnx-graph"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["helium", "gemma2", "mixtral"])
def test_more_exported_families_decode_like_transformers(name, tmp_path):
    """Helium (interleaved rotary; its RMSNorm's eps of 1e-8 folded away by the exporter), Gemma 2
    (soft-capped attention and logits, sliding and global layers) and Mixtral (TopK routing to
    experts, one moe op a block). transformers' default experts code is an op torch.onnx cannot
    convert: an MoE model exports with its "batched_mm" form, as llmc traces it. Of
    test_families' CHECKED list, dynamic NTK does not export (torch.export fails on its branch) and
    LongRoPE is refused (test below); the other 19 were checked by hand as these are."""
    from test_families import PROMPT, greedy, tiny

    model = tiny(name)
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        if getattr(config, "_experts_implementation", None) is not None:
            config._experts_implementation = "batched_mm"
    path = export(model, tmp_path / "model.onnx")
    artifact = tmp_path / f"{name}.llmc"
    compile_model(path, artifact, target="cpu", progress=None, max_seq=256)
    assert llmc.load(artifact, max_context=64).generate(PROMPT, max_new_tokens=32) == greedy(model, PROMPT, 32)


@pytest.mark.slow
def test_an_onnx_source_builds_without_torch(exported, tmp_path):
    """Compiling from ONNX needs onnx, not torch (nor transformers, without tokenizer files)."""
    import subprocess
    import sys

    _, path = exported("llama")
    artifact = tmp_path / "no-torch.llmc"
    script = (f"import sys; sys.modules['torch'] = None\n"
              f"from llmc.compiler import compile_model\n"
              f"compile_model({str(path)!r}, {str(artifact)!r}, target='cpu', progress=None)\n"
              f"assert 'transformers' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert llmc.load(artifact, max_context=32).generate([5, 77, 3], max_new_tokens=4)


@pytest.mark.slow
def test_learned_positions_bound_the_context_without_a_config(exported):
    """GPT-2's table of 256 positions is the longest context, as n_positions is for its HF folder."""
    _, path = exported("gpt2")
    assert import_model(path).max_seq == 256
    with pytest.raises(LlmcError, match="beyond the 256 positions"):
        import_model(path, max_seq=512)


@pytest.mark.slow
def test_a_folder_with_config_and_tokenizer_speaks_text(exported, tmp_path):
    """An exported folder (model.onnx + data, config.json, tokenizer files) is a source by its path:
    the artifact keeps the tokenizer and takes its context from the config."""
    model, path = exported("llama")
    folder = path.parent
    model.config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    artifact = tmp_path / "llama.llmc"
    compile_model(folder, artifact, target="cpu", progress=None, max_seq=96)
    loaded = llmc.load(artifact)
    assert loaded.tokenizer is not None
    ids = loaded.tokenizer.encode("hello,onnx")     # bytes below the tiny vocabulary of 128
    assert loaded.generate(ids, max_new_tokens=8) == greedy_reference(model, ids, 8)
    assert loaded.manifest["model"]["config"]["num_hidden_layers"] == 2


@pytest.mark.slow
def test_an_export_that_takes_a_mask_and_positions_decodes_like_transformers(tmp_path):
    """model(input_ids, attention_mask, position_ids) exported: the two bound to one unpadded
    sequence's, and the step's attention and positions take their place."""
    import torch

    model = tiny_model("qwen2")

    class Forward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).logits

    ids = torch.zeros((1, 8), dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=256)
    path = tmp_path / "masked.onnx"
    torch.onnx.export(Forward().eval(), (ids, torch.ones_like(ids), torch.arange(8)[None]), str(path),
                      input_names=["input_ids", "attention_mask", "position_ids"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}, "position_ids": {1: seq}},
                      dynamo=True, verbose=False)
    artifact = tmp_path / "masked.llmc"
    report = compile_model(path, artifact, target="cpu", progress=None)
    assert not [n for n in report.notes if n.startswith("attention")], report.notes
    prompt = [5, 77, 3, 101, 64, 9, 12, 1, 33]
    assert llmc.load(artifact, max_context=128).generate(prompt, max_new_tokens=64) == \
        greedy_reference(model, prompt, 64)


@pytest.mark.slow
def test_rotary_chosen_by_each_calls_length_is_refused_with_what_to_do(tmp_path):
    """LongRoPE exported keeps transformers' choice by the call's longest position (a ReduceMax over
    the positions): no step of several sequences computes that, so the build says what to do."""
    from test_families import tiny

    path = export(tiny("phi3-longrope"), tmp_path / "longrope.onnx")
    with pytest.raises(LlmcError, match=r"reduces over all of a call's tokens \(max over seq\).*compile the "
                                        r"Hugging Face model instead"):
        compile_model(path, tmp_path / "x.llmc", target="cpu", progress=None)


@pytest.mark.slow
def test_an_unknown_op_in_an_export_names_the_models_source_line(exported, tmp_path):
    """torch.onnx records each node's stack: the error says which line of the model made it, and
    the weights are named after the modules they came from."""
    _, path = exported("llama")
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    node.op_type = "HardSigmoid"
    onnx.save(model, str(tmp_path / "edited.onnx"), save_as_external_data=True, location="edited.onnx.data")
    with pytest.raises(UnsupportedOpError, match=r"the ONNX op HardSigmoid .*, from .*\.py:\d+: \S"):
        import_model(tmp_path / "edited.onnx")
    names = set(import_model(path).graph.weights)
    assert "model.model.layers.0.self_attn.q_proj.weight" in names and "model.model.layers.1.mlp.down_proj.weight" in names


@pytest.mark.slow
def test_a_fixed_length_export_is_refused(tmp_path):
    path = export(tiny_model("qwen2"), tmp_path / "fixed.onnx", dynamic=False)
    with pytest.raises(UnsupportedModelError, match="fixed length of 8.*dynamic"):
        import_model(path)


# ---------------------------------------------------------------------------------------------
# Bad input, from hand-written graphs (no torch): one clear line each

VOCAB, WIDTH = 16, 8


def _model(nodes, inputs=None, outputs=None, initializers=(), opset=18, domains=()):
    inputs = inputs or [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])]
    outputs = outputs or [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", VOCAB])]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def _weights():
    rng = np.random.default_rng(0)
    return [numpy_helper.from_array(rng.standard_normal((VOCAB, WIDTH)).astype(np.float32), "embed"),
            numpy_helper.from_array(rng.standard_normal((WIDTH, VOCAB)).astype(np.float32), "head")]


def _save(model, path):
    onnx.save(model, str(path))
    return path


def test_a_token_wise_model_imports_and_matches_onnxs_reference(tmp_path):
    """The smallest decoder shape (embedding -> head): imported, it computes what onnx's own
    reference evaluator computes."""
    from onnx.reference import ReferenceEvaluator

    model = _model([helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
                    helper.make_node("Tanh", ["h"], ["t"]),
                    helper.make_node("MatMul", ["t", "head"], ["logits"])], initializers=_weights())
    path = _save(model, tmp_path / "tokenwise.onnx")
    imported = import_model(path)
    ids = np.array([[3, 1, 4, 1, 5]], np.int64)
    from llmc.interpret import run

    want = ReferenceEvaluator(model).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(run(imported.graph, [ids])[0], want, rtol=1e-6)
    assert [n.op for n in imported.graph.nodes() if n.op == "linear"] == ["linear"]
    assert imported.max_seq == 4096 and imported.source.kind == "onnx-graph"


def _int64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


# (nodes from h [1, seq, 8] to y [1, seq, 8], their extra initializers): each handler against onnx's own
# reference evaluator
OPS = {
    "clip": ([helper.make_node("Clip", ["h", "lo", "hi"], ["y"])],
             [numpy_helper.from_array(np.float32(-0.3), "lo"), numpy_helper.from_array(np.float32(0.5), "hi")]),
    "trilu-upper": ([helper.make_node("Trilu", ["h", "k"], ["y"], upper=1)], [_int64("k", 2)]),
    "trilu-lower": ([helper.make_node("Trilu", ["h"], ["y"], upper=0)], []),
    "layer-norm": ([helper.make_node("LayerNormalization", ["h", "scale", "bias"], ["y"], epsilon=1e-3)],
                   [numpy_helper.from_array(np.linspace(0.5, 1.5, WIDTH, dtype=np.float32), "scale"),
                    numpy_helper.from_array(np.linspace(-1, 1, WIDTH, dtype=np.float32), "bias")]),
    "split-concat": ([helper.make_node("Split", ["h", "parts"], ["a", "b"], axis=-1),
                      helper.make_node("Neg", ["b"], ["nb"]),
                      helper.make_node("Concat", ["nb", "a"], ["y"], axis=-1)], [_int64("parts", [3, 5])]),
    "softmax-where": ([helper.make_node("Softmax", ["h"], ["p"], axis=-1),
                       helper.make_node("Greater", ["p", "cut"], ["big"]),
                       helper.make_node("Where", ["big", "p", "h"], ["y"])],
                      [numpy_helper.from_array(np.float32(0.2), "cut")]),
    "gemm": ([helper.make_node("Reshape", ["h", "flat"], ["h2"]),
              helper.make_node("Gemm", ["h2", "w", "c"], ["g"], alpha=0.5, beta=2.0, transB=1),
              helper.make_node("Reshape", ["g", "back"], ["y"])],
             [_int64("flat", [-1, WIDTH]), _int64("back", [1, -1, WIDTH]),
              numpy_helper.from_array(np.random.default_rng(2).standard_normal((WIDTH, WIDTH)).astype(np.float32), "w"),
              numpy_helper.from_array(np.arange(WIDTH, dtype=np.float32) / 10, "c")]),
    "cumsum-slice": ([helper.make_node("CumSum", ["h", "axis"], ["c"]),
                      helper.make_node("Slice", ["c", "starts", "ends", "axes", "steps"], ["s"]),
                      helper.make_node("Concat", ["s", "s"], ["y"], axis=-1)],
                     [_int64("axis", 2), _int64("starts", [1]), _int64("ends", [2 ** 63 - 1]), _int64("axes", [-1]),
                      _int64("steps", [2])]),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_a_handler_computes_what_onnxs_reference_does(name, tmp_path):
    from onnx.reference import ReferenceEvaluator

    from llmc.interpret import run

    nodes, extra = OPS[name]
    model = _model([helper.make_node("Gather", ["embed", "input_ids"], ["h"])] + nodes
                   + [helper.make_node("MatMul", ["y", "head"], ["logits"])], initializers=_weights() + extra)
    imported = import_model(_save(model, tmp_path / f"{name}.onnx"))
    ids = np.random.default_rng(7).integers(0, VOCAB, (1, 11))
    want = ReferenceEvaluator(model).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(run(imported.graph, [ids])[0], want, rtol=1e-5, atol=1e-5)


def test_an_unknown_op_is_named_with_its_node(tmp_path):
    path = _save(_model([helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
                         helper.make_node("Hardmax", ["h"], ["m"], name="mystery"),
                         helper.make_node("MatMul", ["m", "head"], ["logits"])], initializers=_weights()),
                 tmp_path / "hardmax.onnx")
    with pytest.raises(UnsupportedOpError, match=r"the ONNX op Hardmax in .*hardmax.onnx \(node 'mystery': Hardmax -> m\)"):
        import_model(path)
    assert_one_line_error(llmc_cli("compile", path, "-o", tmp_path / "x.llmc"), "ONNX op Hardmax", "'mystery'")


def test_an_op_of_another_domain_is_named(tmp_path):
    path = _save(_model([helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
                         helper.make_node("FastGelu", ["h"], ["g"], domain="com.microsoft", name="fast"),
                         helper.make_node("MatMul", ["g", "head"], ["logits"])], initializers=_weights(),
                        domains=["com.microsoft"]),
                 tmp_path / "contrib.onnx")
    with pytest.raises(UnsupportedOpError, match="FastGelu of domain com.microsoft"):
        import_model(path)


def test_a_model_with_a_cache_input_is_not_a_decoders_forward(tmp_path):
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, "past", 4])]
    path = _save(_model([helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
                         helper.make_node("MatMul", ["h", "head"], ["logits"])], inputs=inputs,
                        initializers=_weights()), tmp_path / "cached.onnx")
    with pytest.raises(UnsupportedModelError, match=r"not a decoder's full forward: it takes 3 inputs "
                                                    r"\(input_ids, attention_mask, past_key_values.0.key\)"):
        import_model(path)
    assert_one_line_error(llmc_cli("compile", path, "-o", tmp_path / "x.llmc"), "not a decoder's full forward")


def test_a_mask_or_positions_input_is_bound_to_one_unpadded_sequence(tmp_path):
    """attention_mask reads as ones and position_ids as 0..seq-1 (here the positions pick rows of a
    table, as a learned position embedding does; the mask multiplies the hidden states)."""
    from onnx.reference import ReferenceEvaluator

    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, [1, "seq"])
              for name in ("input_ids", "attention_mask", "position_ids")]
    rng = np.random.default_rng(1)
    table = numpy_helper.from_array(rng.standard_normal((32, WIDTH)).astype(np.float32), "positions_table")
    model = _model([helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
                    helper.make_node("Gather", ["positions_table", "position_ids"], ["p"]),
                    helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
                    helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
                    helper.make_node("Add", ["h", "p"], ["hp"]),
                    helper.make_node("Mul", ["hp", "m3"], ["x"]),
                    helper.make_node("MatMul", ["x", "head"], ["logits"])], inputs=inputs,
                   initializers=_weights() + [table, numpy_helper.from_array(np.array([-1], np.int64), "last")])
    imported = import_model(_save(model, tmp_path / "positions.onnx"))
    ids = np.array([[3, 1, 4, 1, 5, 9]], np.int64)
    want = ReferenceEvaluator(model).run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                                "position_ids": np.arange(6)[None]})[0]
    from llmc.interpret import run

    np.testing.assert_allclose(run(imported.graph, [ids])[0], want, rtol=1e-6)
    assert imported.max_seq == 32                    # the position table's rows bound the context


def test_an_output_that_is_not_logits_is_refused(tmp_path):
    """A pooled embedding [1, width] (a sentence encoder's output)."""
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    outputs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, WIDTH])]
    path = _save(_model([helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
                         helper.make_node("ReduceMean", ["h", "axes"], ["pooled"], keepdims=0)], outputs=outputs,
                        initializers=_weights() + [axes]), tmp_path / "pooled.onnx")
    with pytest.raises(UnsupportedModelError, match=r"its output is f32\[1, 8\], not logits"):
        import_model(path)


def test_a_bidirectional_model_is_not_a_causal_lm(tmp_path):
    """Every position sees the mean of all of them (an encoder's pooling): refused by the probe."""
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    path = _save(_model([helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
                         helper.make_node("ReduceMean", ["h", "axes"], ["m"], keepdims=1),
                         helper.make_node("Add", ["h", "m"], ["mixed"]),
                         helper.make_node("MatMul", ["mixed", "head"], ["logits"])],
                        initializers=_weights() + [axes]), tmp_path / "encoder.onnx")
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        import_model(path)


def test_a_file_that_is_not_onnx_and_an_old_opset_are_refused(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not protobuf at all" * 50)
    with pytest.raises(SourceError, match="junk.onnx is not an ONNX model llmc can read"):
        import_model(junk)
    old = _save(_model([helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
                        helper.make_node("MatMul", ["h", "head"], ["logits"])], initializers=_weights(), opset=11),
                tmp_path / "old.onnx")
    with pytest.raises(UnsupportedModelError, match="opset 11.*version_converter"):
        import_model(old)


def test_a_declared_shape_that_disagrees_is_caught_at_its_node(tmp_path):
    """The importer checks every value against the file's value_info: a wrong declaration (or a
    wrong mapping) fails at the node, not as a numerical mismatch later."""
    model = _model([helper.make_node("Gather", ["embed", "input_ids"], ["h"], name="lookup"),
                    helper.make_node("MatMul", ["h", "head"], ["logits"])], initializers=_weights())
    model.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "seq", WIDTH + 1]))
    with pytest.raises(UnsupportedOpError, match=r"llmc built f32\[1, 'seq', 8\] for h, "
                                                 r"the file says f32\[1, 'seq', 9\].*node 'lookup'"):
        import_model(_save(model, tmp_path / "declared.onnx"))


def test_the_source_hashes_cover_external_data(tmp_path):
    """The build cache's key includes the weights file beside the .onnx (a changed weight is a new build)."""
    model = _model([helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
                    helper.make_node("MatMul", ["h", "head"], ["logits"])], initializers=_weights())
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    from llmc.frontend.sources import resolve

    assert sorted(resolve(path).hashes()) == ["ext.onnx", "ext.onnx.data"]
    assert resolve(tmp_path).kind == "onnx-graph"             # a folder with one .onnx and no safetensors
