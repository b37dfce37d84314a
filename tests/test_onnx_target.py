"""Target onnx: the step graph as an ONNX model run by ONNX Runtime (CPU), against the cpu target
and the reference; MatMulNBits's parts made from llmc's quantized weights; what it refuses. The
batched-step test against single-sequence runs is test_abi's."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import FAMILIES, relative_error, tiny_model
from llmc.compiler import compile_model
from llmc.artifact import ArtifactError
from llmc.errors import LlmcError
from llmc.quant import SCHEMES, dequantize, quantize

import llmc

PROMPT = [3, 17, 42, 99, 5, 64, 120, 7]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_decodes_like_the_cpu_artifact(families, family, tmp_path):
    """Greedy decoding of 64 tokens equals the cpu target's, and a 100-token prefill's logits agree
    within 1e-4 (the f16 KV pool, sliding windows, tied heads, GeGLU, biases, learned positions)."""
    onnx, cpu = tmp_path / "onnx.llmc", tmp_path / "cpu.llmc"
    compile_model(families[family][1].copy(), onnx, target="onnx", kv="f16", progress=None)
    compile_model(families[family][1].copy(), cpu, target="cpu", kv="f16", progress=None)
    got, want = llmc.load(onnx, max_context=128), llmc.load(cpu, max_context=128)
    ids = np.random.default_rng(3).integers(0, 128, 100).tolist()
    assert relative_error(got.logits(ids), want.logits(ids)) < 1e-4      # a key rounded to f16 may differ by a unit
    assert got.generate(PROMPT, max_new_tokens=64) == want.generate(PROMPT, max_new_tokens=64)


GQA_CASES = {
    # q, k, v slices of one fused projection: GQA reads them packed, rotates q and k itself
    "gemma2": (lambda T: T.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=256, sliding_window=8, attn_logit_softcapping=30.0,
                                        final_logit_softcapping=20.0), True),
    # per-head norms between the projection and the rope: q, k and v reach GQA apart
    "qwen3": (lambda T: T.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, tie_word_embeddings=True), False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GQA_CASES))
def test_group_query_attention_forms_decode_like_the_cpu_artifact(name, tmp_path):
    """GroupQueryAttention's rotary (do_rotary, from the rope's half tables) for packed q/k/v
    (gemma2: soft-capped scores, a window of 8 on every other layer) and for q, k, v given apart
    (qwen3: the per-head norms sit between projection and rope); and the graph's own rope where
    the pool (f16) is not the activations' dtype. Logits within 1e-4 of the cpu target's and 40
    greedy tokens the same, past the window."""
    import onnx
    import transformers

    from llmc.artifact import read_artifact

    make, packed = GQA_CASES[name]
    tiny_model(name, config=make(transformers)).save_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(9).integers(0, 128, 30).tolist()
    for kv, rotary in (("f32", True), ("f16", False)):
        onnx_path, cpu = tmp_path / f"onnx-{kv}.llmc", tmp_path / f"cpu-{kv}.llmc"
        compile_model(str(tmp_path / "hf"), onnx_path, target="onnx", kv=kv, progress=None)
        compile_model(str(tmp_path / "hf"), cpu, target="cpu", kv=kv, progress=None)
        nodes = onnx.load_from_string(bytes(read_artifact(onnx_path).section("onnx"))).graph.node
        gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
        attrs = {a.name: a for a in gqa[0].attribute}
        assert bool(attrs["do_rotary"].i if "do_rotary" in attrs else 0) == rotary, kv
        assert (gqa[0].input[1] == "") == (packed and rotary), kv
        got, want = llmc.load(onnx_path, max_context=128), llmc.load(cpu, max_context=128)
        assert relative_error(got.logits(ids), want.logits(ids)) < 1e-4
        assert got.generate(ids[:6], max_new_tokens=40) == want.generate(ids[:6], max_new_tokens=40)


@pytest.mark.parametrize("scheme", ["q4g32", "q8"])
def test_quantized_linears_run_as_matmulnbits_with_the_same_weights(families, scheme, tmp_path):
    """At accuracy level 0 (the exact product) a q8 or q4g32 build's logits are the reference's to
    f32 rounding: the codes, scales and mins re-laid out as MatMulNBits's parts stand for the same
    weights. At level 4 (int8-rounded activations, the default) they stay within 2% of it."""
    path, ref = tmp_path / "onnx.llmc", tmp_path / "ref.llmc"
    compile_model(families["llama"][1].copy(), ref, target="ref", quant=scheme, kv="f32", progress=None)
    want = llmc.load(ref).logits(PROMPT * 3)
    for level, bound in ((0, 1e-5), (4, 2e-2)):
        compile_model(families["llama"][1].copy(), path, target="onnx", quant=scheme, kv="f32", accuracy_level=level,
                      progress=None)
        assert relative_error(llmc.load(path).logits(PROMPT * 3), want) < bound, level


def test_a_gguf_q4_0_weight_is_matmulnbits_alone(tmp_path):
    """GGUF's Q4_0 blocks (kept as q4g32 with min = -8 scale by --quant gguf) are MatMulNBits with
    its default zero point and nothing beside it, as ORT GenAI's symmetric int4, and the tied
    embedding one GatherBlockQuantized over the lm_head's own arrays; Q4_1's mins keep their group
    sums and the embedding's dequantization in the graph. Both equal the reference at accuracy
    level 0."""
    import gguf
    import onnx

    from llmc.artifact import read_artifact
    from llmc.targets.onnx import export
    from llmc.targets.onnx.weights import initializers
    from test_gguf import write_gguf

    model = tiny_model("llama")
    for qtype, sums in ((gguf.GGMLQuantizationType.Q4_0, 0), (gguf.GGMLQuantizationType.Q4_1, 9)):
        source, path, ref = tmp_path / f"{qtype.name}.gguf", tmp_path / "onnx.llmc", tmp_path / "ref.llmc"
        write_gguf(model, "llama", source, True, qtype=qtype)
        compile_model(str(source), ref, target="ref", kv="f32", progress=None)
        compile_model(str(source), path, target="onnx", kv="f32", accuracy_level=0, progress=None)
        assert relative_error(llmc.load(path).logits(PROMPT * 3), llmc.load(ref).logits(PROMPT * 3)) < 1e-5
        artifact = read_artifact(path)
        ops = [n.op_type for n in onnx.load_from_string(bytes(artifact.section("onnx"))).graph.node]
        assert ops.count("MatMulNBits") == 9 and ops.count("ReduceSum") == sums, qtype.name
        assert ops.count("GatherBlockQuantized") == (0 if sums else 1), qtype.name
        kinds = [record[1] for record in artifact.manifest["target"]["initializers"]]
        assert kinds.count("offsets") == sums
        if not sums:                    # the embedding's rows and the lm_head's codes: one array, two shapes
            made = dict(initializers(artifact))
            rows, codes = made["model.embed_tokens.weight.gguf.q#rows"], made["model.embed_tokens.weight.gguf.q#codes"]
            assert rows.ndim == 2 and codes.ndim == 3 and np.shares_memory(rows, codes)
            out = tmp_path / "exported"                 # and exported once, both initializers reading it
            export(artifact, out.mkdir() or out)
            where = {t.name: {e.key: e.value for e in t.external_data}
                     for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
            assert where["model.embed_tokens.weight.gguf.q#rows"] == where["model.embed_tokens.weight.gguf.q#codes"]
            assert (out / "model.onnx.data").stat().st_size < sum(a.nbytes for a in made.values())


@pytest.mark.parametrize("scheme", ["q4g32", "q4g128", "q8"])
def test_matmulnbits_parts_dequantize_to_llmc_s_weights(scheme):
    """weights.make's parts, dequantized by MatMulNBits's rule ((code - 8 or 128) * scale, 4-bit
    codes two a byte in element order), plus a q4 group's offset, give the weight llmc's parts
    stand for, a group of a single value (scale 0) included."""
    from llmc.targets.onnx.weights import make

    s = SCHEMES[scheme]
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((6, 256)).astype(np.float32)
    weight[2, :s.group] = 0.75                                   # one group of one value
    parts = quantize(weight, s)
    sources = [parts[name] for name in s.parts]
    blocks = 256 // s.group
    codes = make("nibbles" if s.bits == 4 else "bytes", sources, (6, blocks, s.group * s.bits // 8))
    if s.bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(6, blocks, s.group)
    scales = make("scales", sources, (6 * blocks,)).reshape(6, blocks, 1)
    got = (codes.astype(np.float32) - 2 ** (s.bits - 1)) * scales
    if "mins" in s.parts:
        got = got + make("offsets", sources, (blocks, 6)).T[..., None]
    got = got.reshape(6, 256)
    np.testing.assert_allclose(got, dequantize(parts, s, 256), rtol=1e-6, atol=1e-6)
    assert np.all(got[2, :s.group] == got[2, 0])


def test_f16_activations_keep_the_rope_angles_in_f32(tmp_path):
    """--act-dtype f16: the activations are f16 from the embedding to the logits (which leave as
    f32), the weights f16 initializers, while the angles positions * inv_freq and their cos and sin
    stay f32 and are cast where they meet the queries and keys: at positions past 2048, where f16
    steps by 2 and a rounded angle is off by up to a radian, the logits still agree with the f32
    build's to f16 rounding. With q4g32, MatMulNBits takes f16 activations and scales."""
    import onnx
    import transformers

    from conftest import COMMON
    from llmc.artifact import read_artifact

    source = tmp_path / "hf"
    model = tiny_model("llama", config=transformers.LlamaConfig(**{**COMMON, "max_position_embeddings": 4096}))
    for layer in model.model.layers:          # sharp attention, so the logits depend on the angles
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight.data *= 6
    model.save_pretrained(source)
    ids = np.random.default_rng(8).integers(0, 128, 2300).tolist()
    for quant, bound in (("f32", 3e-3), ("q4g32", 3e-2)):
        f32, f16 = tmp_path / "f32.llmc", tmp_path / "f16.llmc"
        compile_model(str(source), f32, target="onnx", quant=quant, kv="f16", progress=None)
        compile_model(str(source), f16, target="onnx", quant=quant, kv="f16", act_dtype="f16", progress=None)
        want = llmc.load(f32, max_context=4096).logits(ids)[-300:]
        got = llmc.load(f16, max_context=4096).logits(ids)[-300:]
        assert relative_error(got, want) < bound, quant
        artifact = read_artifact(f16)
        assert artifact.manifest["target"]["act_dtype"] == "f16"
        graph = onnx.shape_inference.infer_shapes(onnx.load_from_string(bytes(artifact.section("onnx")))).graph
        types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output]}
        by_op = {}
        for node in graph.node:
            by_op.setdefault(node.op_type, []).append(node)
        assert {types[n.output[0]] for n in by_op["Cos"] + by_op["Sin"]} == {onnx.TensorProto.FLOAT}
        assert {types[n.output[0]] for n in by_op["Gather"][:1]} == {onnx.TensorProto.FLOAT16}     # the embedding
        assert types["logits"] == onnx.TensorProto.FLOAT
        floats = {i[0]: i[3] for i in artifact.manifest["target"]["initializers"] if i[1] != "nibbles"}
        assert floats.pop("model.rotary_emb.inv_freq") == "f32" and set(floats.values()) == {"f16"}
        assert len(by_op.get("MatMulNBits", [])) == (9 if quant == "q4g32" else 0)      # q/k/v, o, gate/up, down; the head
    with pytest.raises(LlmcError, match="an onnx build's activations are f32 or f16, not 'bf16'"):
        compile_model(str(source), tmp_path / "x.llmc", target="onnx", act_dtype="bf16", progress=None)


def test_the_contiguous_rows_follow_the_pool(families, tmp_path):
    """GroupQueryAttention reads each sequence's keys and values from a contiguous row the executor
    keeps beside the pool. A row serves a later step only while it agrees with the pool: a
    sequence that takes over another's blocks (here B, in A's freed blocks) gets a row of its own,
    and a prefix-cache hit on B's blocks (C) continues B's row, not A's stale one of the same
    blocks and length; a hit on one block only (D, beside C's decode in one step) is filled from
    the pool. Every token's logits are those of its sequence run alone."""
    from llmc import abi

    path = tmp_path / "m.llmc"
    compile_model(families["qwen2"][1].copy(), path, target="onnx", block_size=4, progress=None)
    model, alone = llmc.load(path, max_context=64, kv_blocks=24), llmc.load(path, max_context=64)
    rng = np.random.default_rng(12)
    a, b, c, d = (rng.integers(0, 128, n) for n in (8, 8, 5, 6))

    def step(*parts):
        """parts: (tokens, first position, table) per sequence; the logits of each part's tokens."""
        tables = np.full((len(parts), max(len(t) for _, _, t in parts)), 0, np.int64)
        for s, (_, _, table) in enumerate(parts):
            tables[s, :len(table)] = table
        batch = abi.Batch(np.concatenate([t for t, _, _ in parts]),
                          np.concatenate([np.arange(f, f + len(t)) for t, f, _ in parts]),
                          np.concatenate([np.full(len(t), s) for s, (t, _, _) in enumerate(parts)]).astype(np.int64),
                          tables, np.arange(sum(len(t) for t, _, _ in parts), dtype=np.int64))
        logits = model.run_batch(batch)
        return np.split(logits, np.cumsum([len(t) for t, _, _ in parts])[:-1])

    def close(got, whole, first):
        np.testing.assert_allclose(got, alone.logits(list(whole))[first:first + len(got)], rtol=1e-5, atol=1e-5)

    close(step((a, 0, [3, 7]))[0], a, 0)
    close(step((b, 0, [3, 7]))[0], b, 0)                        # A's blocks, now B's
    got_c, got_d = step((c, 8, [3, 7, 9, 10]), (d, 4, [3, 11, 12]))
    close(got_c, np.concatenate([b, c]), 8)
    close(got_d, np.concatenate([b[:4], d]), 4)
    got = step((c[:1], 13, [3, 7, 9, 10, 13]))[0]                # C decodes on
    close(got, np.concatenate([b, c, c[:1]]), 13)
    got = step((d[:2], 12, [3, 7, 9, 10, 13]))[0]                # and steps back over its row (a rejected draft)
    close(got, np.concatenate([b, c[:4], d[:2]]), 12)


def test_the_rows_hold_what_the_pool_holds_through_random_steps():
    """The executor's bookkeeping alone, over many random steps on a small pool: sequences start
    (some on another's full prefix blocks, as a prefix-cache hit), prefill in chunks, decode, step
    back over their own positions (a rejected draft), end and leave their blocks to newcomers.
    After every placement each sequence's row holds, at its positions before the step, what the
    pool holds there (GroupQueryAttention's appends stood for by fresh values written to the rows,
    then copied to the pool as the executor copies them)."""
    from llmc.targets.onnx.session import Rows

    rng = np.random.default_rng(23)
    size, count = 4, 40
    pool = [np.zeros((1, count, 1, size, 2), np.float32) for _ in range(2)]
    rows = Rows(1, 1, 2, size, np.float32, count)
    free, live = list(range(count)), []          # live: [table, length, shared positions]
    checked = 0
    for _ in range(400):
        if len(live) < 5 and rng.random() < 0.3:
            donor = live[int(rng.integers(len(live)))] if live and rng.random() < 0.5 else None
            shared = min(donor[1] // size, donor[2] // size + 1) * size if donor else 0
            live.append([list(donor[0][:shared // size]) if donor else [], shared, shared])
        if live and rng.random() < 0.15:                    # one ends: its own blocks go back
            table, _, shared = live.pop(int(rng.integers(len(live))))
            free += [b for b in table[shared // size:] if all(b not in t for t, _, _ in live)]
        steps = []
        for seq in rng.permutation(len(live))[:int(rng.integers(1, 4))] if live else []:
            table, length, shared = live[seq]
            if length > shared and rng.random() < 0.2:      # a step back over its own positions
                length = live[seq][1] = int(rng.integers(shared, length))
            take = int(rng.integers(1, 7)) if rng.random() < 0.4 else 1
            while len(table) * size < length + take and free:
                table.append(free.pop(int(rng.integers(len(free)))))
            take = min(take, len(table) * size - length)
            if take:
                steps.append((int(seq), length, take))
        if not steps:
            continue
        tables = np.zeros((len(live), max(len(t) for t, _, _ in live) or 1), np.int64)
        for s, (table, _, _) in enumerate(live):
            tables[s, :len(table)] = table
        positions = np.concatenate([np.arange(first, first + n) for _, first, n in steps])
        seq_index = np.concatenate([np.full(n, s) for s, _, n in steps]).astype(np.int64)
        layout = rows.place(positions, seq_index, tables, pool)
        for s, (r, first, _) in layout.rows.items():
            held = np.arange(first)
            want = pool[0][0, tables[s, held // size], 0, held % size]
            np.testing.assert_array_equal(rows.k[0, r, 0, :first], want)
            checked += first
        blocks, offsets = tables[seq_index, positions // size], positions % size
        token_rows = np.array([layout.rows[int(s)][0] for s in seq_index])
        fresh = rng.standard_normal((positions.size, 2)).astype(np.float32)
        rows.k[0, token_rows, 0, positions] = rows.v[0, token_rows, 0, positions] = fresh
        pool[0][0, blocks, 0, offsets] = pool[1][0, blocks, 0, offsets] = fresh
        rows.written(layout, blocks)
        for s, first, n in steps:
            live[s][1] = first + n
    assert checked > 5000


def test_an_onnxruntime_without_gqa_s_chunks_is_named():
    from llmc.targets.onnx import ort_too_old

    assert ort_too_old("1.31.1") == ("needs onnxruntime 1.32 or newer (GroupQueryAttention's query_seqlens), not "
                                     "1.31.1: pip install -U 'llmc-compiler[onnx]'")
    assert ort_too_old("1.32.0") is None and ort_too_old("2.0.1") is None and ort_too_old("dev") is None


def test_what_the_onnx_target_refuses_is_one_clear_error(families, tmp_path):
    with pytest.raises(llmc.UsageError, match="target onnx has no int8 KV cache; build it with --kv f16 or f32"):
        compile_model(families["llama"][1].copy(), tmp_path / "a.llmc", target="onnx", kv="int8", progress=None)
    with pytest.raises(llmc.UsageError, match="opsets 17 to 23, not 12"):
        compile_model(families["llama"][1].copy(), tmp_path / "a.llmc", target="onnx", opset=12, progress=None)
    with pytest.raises(llmc.UsageError, match="unknown provider 'tpu'"):
        compile_model(families["llama"][1].copy(), tmp_path / "a.llmc", target="onnx", provider="tpu", progress=None)


@pytest.mark.slow
def test_a_mixture_of_experts_is_refused_by_op(tmp_path):
    import transformers

    mixtral = tiny_model("mixtral", config=transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
    with pytest.raises(LlmcError, match="the onnx target has no lowering for op 'moe'; build with --target cpu"):
        compile_model(mixtral, tmp_path / "m.llmc", target="onnx", progress=None)


def test_inspect_verify_and_a_run_without_the_onnx_package(families, tmp_path):
    """``llmc inspect`` and ``llmc verify`` describe an onnx build; running it imports onnxruntime
    and numpy, not the onnx package (the builder's) nor torch."""
    path = tmp_path / "m.llmc"
    compile_model(families["qwen2"][1].copy(), path, target="onnx", progress=None)
    shown = subprocess.run([sys.executable, "-m", "llmc", "inspect", str(path)], capture_output=True, text=True)
    assert shown.returncode == 0
    assert "onnx      opset 21, provider cpu, f32 activations, up to 512 tokens a call" in shown.stdout
    assert "target    onnx: ONNX Runtime, CPUExecutionProvider" in shown.stdout
    checked = subprocess.run([sys.executable, "-m", "llmc", "verify", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    script = (f"import sys, llmc\nm = llmc.load({str(path)!r})\nm.generate([1, 2, 3], max_new_tokens=3)\n"
              "print(' '.join(sorted(sys.modules)))")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    loaded = {m.split(".")[0] for m in ran.stdout.split()}
    assert "onnxruntime" in loaded and not loaded & {"onnx", "torch", "transformers"}


def test_a_damaged_initializer_record_is_refused_before_onnx_runtime_runs(families, tmp_path):
    from test_abi import rewritten

    path = tmp_path / "m.llmc"
    compile_model(families["llama"][1].copy(), path, target="onnx", progress=None)

    def rename(manifest):
        manifest["target"]["initializers"][0][2] = ["no.such.tensor"]

    with pytest.raises(ArtifactError, match="names tensor 'no.such.tensor', which the artifact lacks"):
        llmc.load(rewritten(path, tmp_path, rename))


def test_export_writes_a_model_folder_onnx_runtime_runs_alone(families, tmp_path):
    """``llmc export`` writes model.onnx with its weights beside it and step.json; ONNX Runtime runs
    a prefill and a decode step from those files alone (one sequence's caches bound as step.json
    says, appended to in place) with the artifact's logits. A cpu artifact, or a folder that is not
    empty, is one clear line."""
    import json

    import onnxruntime as ort

    path = tmp_path / "m.llmc"
    compile_model(families["gemma"][1].copy(), path, target="onnx", quant="q4g32", kv="f16", progress=None)
    out = tmp_path / "exported"
    done = subprocess.run([sys.executable, "-m", "llmc", "export", str(path), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data", "step.json"]
    step = json.loads((out / "step.json").read_text())
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    shape = (1, step["kv_heads"], 64, step["head_dim"])
    caches = {f"{w}.{layer}": ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
              for layer in range(step["layers"]) for w in "kv"}
    ids = PROMPT * 3 + [11]
    got = []
    for start, end in ((0, len(ids) - 1), (len(ids) - 1, len(ids))):        # a prefill, then a decode step
        n = end - start
        pairs = np.stack([np.zeros(n, np.int64), np.arange(n)], -1)[None]     # entry 0, row i: token i
        feed = {"tokens": np.array(ids[start:end], np.int64), "positions": np.arange(start, end, dtype=np.int64),
                "logit_rows": np.arange(n, dtype=np.int64), "gqa_tokens": pairs, "gqa_slots": pairs,
                "seqlens_k": np.array([end - 1], np.int32),
                "query_seqlens": np.array([n], np.int32), "total_length": np.array(end, np.int32)}
        binding = session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits")
        for name, value in caches.items():
            binding.bind_ortvalue_input("past_" + name, value)
            binding.bind_ortvalue_output("present_" + name, value)
        session.run_with_iobinding(binding)
        got.append(binding.get_outputs()[0].numpy())
    want = llmc.load(path).logits(ids)
    assert relative_error(np.concatenate(got), want) < 1e-5
    refused = subprocess.run([sys.executable, "-m", "llmc", "export", str(path), str(out)], capture_output=True,
                             text=True)
    assert refused.returncode == 2 and refused.stderr.strip().endswith("is not an empty folder; name a new one")
    ref = tmp_path / "ref.llmc"
    compile_model(families["gemma"][1].copy(), ref, target="ref", progress=None)
    refused = subprocess.run([sys.executable, "-m", "llmc", "export", str(ref), str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "error: a ref artifact has no standalone form to export; onnx artifacts do")
    assert not (tmp_path / "x").exists()


def test_the_engine_serves_an_onnx_build_like_solo_generation(families, tmp_path):
    """Continuous batching on the onnx target: four requests decoding in one step each time give
    each request its solo greedy tokens."""
    path = tmp_path / "m.llmc"
    compile_model(families["qwen2"][1].copy(), path, target="onnx", progress=None)
    model = llmc.load(path, max_context=128)
    prompts = [[3, 4, 5 + i] * (i + 1) for i in range(4)]
    solo = [model.generate(p, max_new_tokens=20) for p in prompts]
    with llmc.Engine(model, max_running=4) as engine:
        handles = [engine.submit(p, max_tokens=20) for p in prompts]
        got = [h.result().completions[0].token_ids for h in handles]
    assert got == solo


def test_the_engine_s_prefix_cache_and_preemption_refill_the_rows(families, tmp_path):
    """Six requests sharing a 20-token prefix (five full blocks of 4) in a pool of 32 blocks, too
    small for them together: the engine shares the prefix's blocks (a row filled from the pool
    for each sharer) and preempts and recomputes sequences (new blocks, a row refilled), and every
    request still decodes its solo greedy tokens."""
    path = tmp_path / "m.llmc"
    compile_model(families["qwen2"][1].copy(), path, target="onnx", block_size=4, progress=None)
    solo = llmc.load(path, max_context=128)
    rng = np.random.default_rng(6)
    shared = rng.integers(0, 128, 20).tolist()
    prompts = [shared + rng.integers(0, 128, int(rng.integers(3, 20))).tolist() for _ in range(6)]
    want = [solo.generate(p, max_new_tokens=40) for p in prompts]
    with llmc.Engine(path, max_context=128, kv_blocks=32, max_running=6, max_step_tokens=32) as engine:
        first = engine.generate(prompts[0], max_tokens=40, ignore_eos=True)
        handles = [engine.submit(p, max_tokens=40, ignore_eos=True) for p in prompts[1:]]
        got = [first] + [h.result(timeout=120) for h in handles]
        metrics = engine.metrics()
    assert metrics["preemptions"] > 0 and metrics["prefix_cache_hit_tokens"] >= 20
    assert [out.token_ids for out in got] == want
