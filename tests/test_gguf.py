"""llmc's GGUF reader and GGUF -> model mapping, on small GGUF files written here with gguf-py."""

import gguf
import numpy as np
import pytest
import torch

from conftest import new_pool, relative_error, run_step, tiny_model
from llmc.errors import SourceError
from llmc.frontend import import_model
from llmc.frontend.gguf_file import GGUFFile
from llmc.interpret import run


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (the inverse of what llmc undoes)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, arch: str, path, permute_qk: bool, qtype=None) -> None:
    """A GGUF of ``model`` as llama.cpp's converter lays it out; 2-D weights in ``qtype`` if given."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.numpy().astype(np.float32)
        if permute_qk and key.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif permute_qk and key.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, config.num_key_value_heads)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if qtype is not None and array.ndim == 2:
            packed = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family, arch, permute", [("llama", "llama", True), ("qwen2", "qwen2", False)])
def test_gguf_model_matches_the_model_it_was_written_from(tmp_path, family, arch, permute):
    model = tiny_model(family)
    path = tmp_path / f"{family}.gguf"
    write_gguf(model, arch, path, permute)
    imported = import_model(path)
    assert imported.source.kind == "gguf"
    ids = torch.randint(0, 128, (1, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits.numpy()
    assert relative_error(run(imported.graph, [ids.numpy()])[0], want) < 1e-5


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                                   gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16,
                                   gguf.GGMLQuantizationType.Q6_K])
def test_dequantize_matches_gguf_reference(tmp_path, qtype):
    rng = np.random.default_rng()
    rows, cols = 7, 256                       # 7 rows: not a multiple of anything
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        # gguf-py cannot quantize K-quants: random blocks with a sane f16 scale (the last 2 bytes).
        packed = rng.integers(0, 256, (rows, 210), dtype=np.uint8)
        packed[:, -2:] = np.array([0.01], np.float16).view(np.uint8)
    else:
        packed = gguf.quants.quantize(weight, qtype)
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    writer.add_tensor("t", packed, raw_shape=packed.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = GGUFFile(tmp_path / "q.gguf")
    got = f.dequantize("t")
    want = gguf.quants.dequantize(packed, qtype).reshape(rows, cols)
    assert got.shape == (rows, cols)
    np.testing.assert_array_equal(got, want)
    if qtype != gguf.GGMLQuantizationType.Q6_K:
        assert np.abs(got - weight).max() < 0.5   # and it is the weight, quantized


def corrupt_copies(tmp_path, source):
    data = source.read_bytes()
    yield "truncated", data[: len(data) // 2]
    yield "bad magic", b"GGUX" + data[4:]
    yield "future version", data[:4] + (9).to_bytes(4, "little") + data[8:]
    yield "huge string", data[:24] + (2**40).to_bytes(8, "little") + data[32:]


def test_corrupt_gguf_files_raise_source_error(tmp_path):
    model = tiny_model("llama")
    good = tmp_path / "good.gguf"
    write_gguf(model, "llama", good, True)
    for label, data in corrupt_copies(tmp_path, good):
        path = tmp_path / "bad.gguf"
        path.write_bytes(data)
        with pytest.raises(SourceError) as info:
            import_model(path)
        assert str(path) in str(info.value), label


@pytest.mark.parametrize("qtype, scheme", [(gguf.GGMLQuantizationType.Q4_1, "q4g32"),
                                           (gguf.GGMLQuantizationType.Q4_0, "q4g32"),
                                           (gguf.GGMLQuantizationType.Q8_0, "q8")])
def test_passthrough_keeps_the_blocks_exactly(tmp_path, qtype, scheme):
    from llmc.pipeline import run_phases

    path = tmp_path / "q.gguf"
    write_gguf(tiny_model("llama"), "llama", path, True, qtype=qtype)
    imported = import_model(path)
    exact = run_phases(imported, progress=None).graph
    kept = run_phases(imported, progress=None, quant="gguf")
    assert kept.notes == []
    histogram = kept.graph.op_histogram()
    assert histogram["qlinear"] == 9 and histogram["qembedding"] == 1 and "linear" not in histogram
    assert {n.attrs["scheme"] for n in kept.graph.nodes() if n.op == "qlinear"} == {scheme}
    ids = np.arange(2, 30)
    want = run_step(exact, new_pool(exact, 2), ids, 0, [0, 1], rows="all")
    np.testing.assert_array_equal(run_step(kept.graph, new_pool(kept.graph, 2), ids, 0, [0, 1], rows="all"), want)


def test_passthrough_of_float_tensors_says_they_stay_f32(tmp_path):
    from llmc.pipeline import run_phases

    path = tmp_path / "f.gguf"
    write_gguf(tiny_model("llama"), "llama", path, True)          # F32 tensors
    result = run_phases(import_model(path), progress=None, quant="gguf")
    assert result.graph.op_histogram()["linear"] == 9
    assert len(result.notes) == 1 and "stay f32" in result.notes[0]


def test_passthrough_needs_a_gguf_source():
    from llmc.errors import LlmcError
    from llmc.pipeline import run_phases

    with pytest.raises(LlmcError, match="the source must be a .gguf file"):
        run_phases(import_model(tiny_model("llama")), progress=None, quant="gguf")
