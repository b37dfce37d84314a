"""The attention phase: Before/Expected in the text IR, declines, and prefill + decode steps over
the paged KV pool reproducing transformers' full-sequence logits for every family."""

import io

import numpy as np
import pytest
import torch

from conftest import FAMILIES, new_pool, relative_error, run_step, tiny_model
from llmc.errors import InterpretError
from llmc.frontend import import_model
from llmc.ir import parse_graph, print_graph, verify
from llmc.passes.attention import rewrite_attention
from llmc.passes.context import PassContext
from llmc.pipeline import run_phases

BEFORE = """
graph @forward(%input_ids: i64[1, seq]) {
  %0 = weight() {name="embed"} : f32[32, 8]
  %1 = embedding(%0, %input_ids) : f32[1, seq, 8]
  %2 = weight() {name="wq"} : f32[8, 8]
  %3 = linear(%1, %2) : f32[1, seq, 8]
  %4 = reshape(%3) {shape=[1, "seq", 2, 4]} : f32[1, seq, 2, 4]
  %5 = permute(%4) {perm=[0, 2, 1, 3]} : f32[1, 2, seq, 4]
  %6 = weight() {name="wk"} : f32[4, 8]
  %7 = linear(%1, %6) : f32[1, seq, 4]
  %8 = reshape(%7) {shape=[1, "seq", 1, 4]} : f32[1, seq, 1, 4]
  %9 = permute(%8) {perm=[0, 2, 1, 3]} : f32[1, 1, seq, 4]
  %10 = reshape(%9) {shape=[1, 1, 1, "seq", 4]} : f32[1, 1, 1, seq, 4]
  %11 = expand(%10) {shape=[1, 1, 2, "seq", 4]} : f32[1, 1, 2, seq, 4]
  %12 = reshape(%11) {shape=[1, 2, "seq", 4]} : f32[1, 2, seq, 4]
  %13 = arange() {dtype="i64", end="seq", start=0, step=1} : i64[seq]
  %14 = reshape(%13) {shape=["seq", 1]} : i64[seq, 1]
  %15 = le(%13, %14) : bool[seq, seq]
  MASK
  %16 = sdpa(%5, %12, %12, %15) {causal=false, scale=0.5} : f32[1, 2, seq, 4]
  %17 = permute(%16) {perm=[0, 2, 1, 3]} : f32[1, seq, 2, 4]
  %18 = reshape(%17) {shape=[1, "seq", 8]} : f32[1, seq, 8]
  %19 = weight() {name="pos"} : f32[64, 8]
  %20 = embedding(%19, %13) : f32[seq, 8]
  %21 = add(%18, %20) : f32[1, seq, 8]
  %22 = linear(%21, %0) : f32[1, seq, 32]
  return %22
}"""

EXPECTED = """
graph @forward(%tokens: i64[seq], %positions: i64[seq], %seq_index: i64[seq], %block_tables: i64[seqs, max_blocks], %logit_rows: i64[rows], %k_cache: f32[1, blocks, 1, 16, 4], %v_cache: f32[1, blocks, 1, 16, 4]) {
  %0 = weight() {name="embed"} : f32[32, 8]
  %1 = reshape(%tokens) {shape=[1, "seq"]} : i64[1, seq]
  %2 = embedding(%0, %1) : f32[1, seq, 8]
  %3 = weight() {name="wq"} : f32[8, 8]
  %4 = linear(%2, %3) : f32[1, seq, 8]
  %5 = reshape(%4) {shape=[1, "seq", 2, 4]} : f32[1, seq, 2, 4]
  %6 = permute(%5) {perm=[0, 2, 1, 3]} : f32[1, 2, seq, 4]
  %7 = weight() {name="wk"} : f32[4, 8]
  %8 = linear(%2, %7) : f32[1, seq, 4]
  %9 = reshape(%8) {shape=[1, "seq", 1, 4]} : f32[1, seq, 1, 4]
  %10 = permute(%9) {perm=[0, 2, 1, 3]} : f32[1, 1, seq, 4]
  %11 = attention(%6, %10, %10, %k_cache, %v_cache, %positions, %seq_index, %block_tables) {layer=0, scale=0.5, window=WINDOW} : f32[1, 2, seq, 4]
  %12 = permute(%11) {perm=[0, 2, 1, 3]} : f32[1, seq, 2, 4]
  %13 = reshape(%12) {shape=[1, "seq", 8]} : f32[1, seq, 8]
  %14 = weight() {name="pos"} : f32[64, 8]
  %15 = embedding(%14, %positions) : f32[seq, 8]
  %16 = add(%13, %15) : f32[1, seq, 8]
  %17 = reshape(%16) {shape=["seq", 8]} : f32[seq, 8]
  %18 = embedding(%17, %logit_rows) : f32[rows, 8]
  %19 = linear(%18, %0) : f32[rows, 32]
  return %19
}"""

SLIDING = """%30 = sub(%14, %13) : i64[seq, seq]
  %31 = const() {dtype="i64", value=5} : i64[]
  %32 = lt(%30, %31) : bool[seq, seq]
  %33 = and(%15, %32) : bool[seq, seq]"""


def attention_pass(text: str):
    graph = parse_graph(text)
    verify(graph)
    ctx = PassContext(max_seq=64)
    out = rewrite_attention(graph, ctx)
    verify(out)
    return graph, out, ctx


def test_sdpa_with_causal_mask_and_gqa_repeat():
    _, out, ctx = attention_pass(BEFORE.replace("MASK", ""))
    assert print_graph(out) == print_graph(parse_graph(EXPECTED.replace("WINDOW", "0")))
    assert ctx.notes == []


def test_sliding_window_mask_is_measured():
    before = BEFORE.replace("MASK", SLIDING).replace("%12, %12, %15)", "%12, %12, %33)")
    _, out, _ = attention_pass(before)
    assert print_graph(out) == print_graph(parse_graph(EXPECTED.replace("WINDOW", "5")))


# torch.onnx's SDPA written out, as simplify leaves it: q and k.T each scaled by an f32 sqrt(0.5),
# k.T as reshape(permute(reshape(repeated k))), an additive mask, the softmax's NaN rows made zero.
ONNX_SDPA = """%40 = const() {dtype="f32", value=0.7071067690849304} : f32[]
  %41 = mul(%5, %40) : f32[1, 2, seq, 4]
  %42 = reshape(%11) {shape=[2, "seq", 4]} : f32[2, seq, 4]
  %43 = permute(%42) {perm=[0, 2, 1]} : f32[2, 4, seq]
  %44 = reshape(%43) {shape=[1, 2, 4, "seq"]} : f32[1, 2, 4, seq]
  %45 = mul(%44, %40) : f32[1, 2, 4, seq]
  %46 = matmul(%41, %45) : f32[1, 2, seq, seq]
  %47 = const() {dtype="f32", value=0.0} : f32[]
  %48 = const() {dtype="f32", value=-3.4028234663852886e+38} : f32[]
  %49 = where(%15, %47, %48) : f32[seq, seq]
  %50 = add(%46, %49) : f32[1, 2, seq, seq]
  %51 = softmax(%50) {axis=3} : f32[1, 2, seq, seq]
  %52 = ne(%51, %51) : bool[1, 2, seq, seq]
  %53 = where(%52, %47, %51) : f32[1, 2, seq, seq]
  %16 = matmul(%53, %12) : f32[1, 2, seq, 4]"""


def test_torch_onnx_written_out_sdpa_is_one_attention_with_the_default_scale():
    before = BEFORE.replace("MASK\n", "").replace(
        '  %16 = sdpa(%5, %12, %12, %15) {causal=false, scale=0.5} : f32[1, 2, seq, 4]', "  " + ONNX_SDPA)
    graph, out, ctx = attention_pass(before)
    assert print_graph(out) == print_graph(parse_graph(EXPECTED.replace("WINDOW", "0")))
    assert ctx.notes == []


def test_a_reduction_over_the_calls_tokens_declines():
    """After the rewrite a step holds tokens of several sequences: a max over the sequence (how an
    ONNX export keeps LongRoPE's choice by the longest position) cannot be computed per sequence."""
    before = BEFORE.replace("MASK\n", "").replace("  %21 = add(%18, %20) : f32[1, seq, 8]", """  %60 = max(%18) {axes=[1], keepdim=true} : f32[1, 1, 8]
  %61 = add(%18, %60) : f32[1, seq, 8]
  %21 = add(%61, %20) : f32[1, seq, 8]""")
    graph, out, ctx = attention_pass(before)
    assert out is graph
    assert len(ctx.notes) == 1 and "reduces over all of a call's tokens (max over seq)" in ctx.notes[0]


@pytest.mark.parametrize("mask, reason", [
    ("%40 = full() {dtype=\"bool\", shape=[\"seq\", \"seq\"], value=true} : bool[seq, seq]",
     "neither causal nor a causal sliding window"),
    ("%40 = reshape(%input_ids) {shape=[\"seq\", 1]} : i64[seq, 1]\n  %41 = le(%40, %13) : bool[seq, seq]",
     "depends on the token values"),
])
def test_unknown_masks_leave_the_graph_unchanged_and_say_why(mask, reason):
    mask_name = "%40" if "full" in mask else "%41"
    before = BEFORE.replace("MASK", mask).replace("%12, %12, %15)", f"%12, %12, {mask_name})")
    graph, out, ctx = attention_pass(before)
    assert out is graph
    assert len(ctx.notes) == 1 and reason in ctx.notes[0]


def check_prefill_then_decode(graph, want: np.ndarray, ids: np.ndarray, prompt: int, capacity: int = 96,
                              tolerance: float = 1e-4, block_size: int = 16):
    """prefill(ids[:prompt]) then one token at a time, the sequence's blocks scattered over the
    pool; each step's logits vs the full-sequence ones."""
    blocks = -(-capacity // block_size)
    table = np.random.default_rng(capacity).permutation(2 * blocks)[:blocks]
    pool = new_pool(graph, 2 * blocks)
    logits = run_step(graph, pool, ids[:prompt], 0, table)
    errors = [relative_error(logits[-1], want[prompt - 1])]
    for pos in range(prompt, len(ids)):
        logits = run_step(graph, pool, ids[pos:pos + 1], pos, table)
        errors.append(relative_error(logits[-1], want[pos]))
    assert max(errors) < tolerance, errors


CASES = [(f, "sdpa") for f in FAMILIES] + [("llama", "eager"), ("mistral", "eager"), ("gpt2", "eager")]


@pytest.mark.parametrize("family, attn", CASES)
def test_prefill_then_decode_matches_transformers(family, attn):
    model = tiny_model(family)
    model.config._attn_implementation = attn
    result = run_phases(import_model(model), progress=None)
    graph = result.graph
    assert result.notes == []
    assert [str(n.type) for n in graph.inputs][:5] == ["i64[seq]", "i64[seq]", "i64[seq]", "i64[seqs, max_blocks]",
                                                       "i64[rows]"]
    assert str(graph.outputs[0].type) == "f32[rows, 128]"
    assert graph.op_histogram()["attention"] == 2
    assert not {"sdpa", "softmax"} & set(graph.op_histogram())
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits[0].numpy()
    check_prefill_then_decode(graph, want, ids[0].numpy(), prompt=23)   # 23 + 17 > Mistral's window of 16


def test_all_logits_and_a_position_past_the_block_table():
    model = tiny_model("qwen2")
    graph = run_phases(import_model(model), progress=None, block_size=4).graph
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(input_ids=ids).logits[0].numpy()
    pool = new_pool(graph, 4)
    assert relative_error(run_step(graph, pool, ids[0].numpy(), 0, [3, 1, 0], rows="all"), want) < 1e-4
    with pytest.raises(InterpretError, match="needs more than the 3 blocks a block table holds"):
        run_step(graph, pool, ids[0, :6].numpy(), 11, [3, 1, 0])


def test_progress_shows_notes_of_a_declined_pass():
    class PositionBias(torch.nn.Module):
        """Causal, but with an ALiBi-like additive bias: not a mask the attention phase expresses."""

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)

        def forward(self, ids):
            h = self.embed(ids)[:, None]
            i = torch.arange(ids.shape[1])[:, None]
            j = torch.arange(ids.shape[1])[None, :]
            bias = torch.where(j <= i, (j - i) * 0.1, float("-inf"))
            return torch.nn.functional.scaled_dot_product_attention(h, h, h, attn_mask=bias)[:, 0]

    progress = io.StringIO()
    imported = import_model(PositionBias(), max_seq=32)
    result = run_phases(imported, progress=progress)
    assert result.graph.inputs[0].attrs["name"] == "input_ids"
    assert "note: attention: left the graph as traced, without a KV cache: an additive mask with values " \
           "other than 0 and -inf" in progress.getvalue()


ROPE_SCALINGS = [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
]


@pytest.mark.parametrize("rope_parameters", ROPE_SCALINGS, ids=lambda p: p["rope_type"])
def test_rope_scaling_variants_follow_the_positions(rope_parameters):
    import transformers

    from conftest import COMMON

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, rope_parameters=rope_parameters)).eval()
    graph = run_phases(import_model(model), progress=None).graph
    assert graph.op_histogram()["rope"] == 4
    ids = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits[0].numpy()
    check_prefill_then_decode(graph, want, ids[0].numpy(), prompt=70, capacity=128)  # past the original 64


@pytest.mark.parametrize("context", [None, 512])
def test_dynamic_rope_scaling_is_fixed_for_the_context(context):
    """Dynamic NTK rescales the frequencies by each call's longest position (a branch on the data);
    the import fixes them for its context: the trained ones within the trained 256 positions, the
    ones transformers computes for a sequence of the whole context past them."""
    import transformers

    from conftest import COMMON

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**COMMON, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                  "rope_theta": 10000.0})
    model = transformers.LlamaForCausalLM(config).eval()
    graph = run_phases(import_model(model, max_seq=context), progress=None).graph
    assert graph.op_histogram()["rope"] == 4
    length = context or 90
    ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits[0].numpy()
    check_prefill_then_decode(graph, want, ids[0].numpy(), prompt=length - 20, capacity=length)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_int8_kv_cache_stays_close(family):
    model = tiny_model(family)
    graph = run_phases(import_model(model), progress=None, kv="int8").graph
    heads = 2 if family != "gpt2" else 4
    assert [str(n.type) for n in graph.inputs[5:]] == [f"i8[2, blocks, {heads}, 16, 16]"] * 2 \
        + [f"f32[2, blocks, {heads}, 16]"] * 2
    assert graph.op_histogram()["attention_kv8"] == 2 and "attention" not in graph.op_histogram()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=ids).logits[0].numpy()
    check_prefill_then_decode(graph, want, ids[0].numpy(), prompt=23, tolerance=2e-2)


def test_unknown_kv_format_is_refused():
    from llmc.errors import LlmcError

    with pytest.raises(LlmcError, match="unknown KV cache format 'fp8'; choose f16, f32, int8"):
        run_phases(import_model(tiny_model("llama")), progress=None, kv="fp8")
