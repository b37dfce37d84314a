"""Every op's numpy reference against torch on fresh random inputs of awkward sizes, and every
op's shape rule against what its reference produces."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmc import ops
from llmc.errors import LlmcError
from llmc.interpret import round_to_bf16
from llmc.ir import TupleType, Type, dtype_of_array

rng = np.random.default_rng()


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def apply(op, arrays, **attrs):
    """Run an op's shape rule and its reference; check they agree; return the result."""
    out_type = ops.infer(op, [Type(dtype_of_array(a), a.shape) for a in arrays], attrs)
    if isinstance(out_type, TupleType):          # several results: each checked against its type
        results = ops.OPS[op].ref(arrays, attrs, None, None)
        assert [Type(dtype_of_array(r), r.shape) for r in results] == list(out_type.types), op
        return results
    result = np.asarray(ops.OPS[op].ref(arrays, attrs, out_type.shape, out_type.dtype))
    assert result.shape == out_type.shape, op
    return result


def close(got, want, tol=1e-5):
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


T = torch.from_numpy

UNARY = {
    "neg": torch.neg, "exp": torch.exp, "sqrt": lambda x: torch.sqrt(x.abs()), "abs": torch.abs,
    "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh, "erf": torch.erf, "sigmoid": torch.sigmoid,
    "silu": F.silu, "relu": F.relu,
}


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary(op):
    x = f32(3, 17) * 3
    if op == "sqrt":
        x = np.abs(x)
    close(apply(op, [x]), UNARY[op](T(x)), tol=2e-6)


def test_log_rsqrt_reciprocal():
    x = np.abs(f32(5, 13)) + 0.1
    close(apply("log", [x]), torch.log(T(x)))
    close(apply("rsqrt", [x]), torch.rsqrt(T(x)))
    close(apply("reciprocal", [x]), torch.reciprocal(T(x)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    x = f32(7, 33) * 4
    close(apply("gelu", [x], approximate=approximate), F.gelu(T(x), approximate=approximate), tol=1e-6)


@pytest.mark.parametrize("op, fn", [("add", torch.add), ("sub", torch.sub), ("mul", torch.mul),
                                    ("div", torch.div), ("maximum", torch.maximum), ("minimum", torch.minimum)])
def test_binary_broadcasting(op, fn):
    x, y = f32(3, 1, 5), f32(7, 1) + 2
    close(apply(op, [x, y]), fn(T(x), T(y)))


def test_pow_with_scalar_const():
    x = f32(9, 5)
    two = apply("const", [], value=2.0, dtype="f32")
    assert two.shape == () and two.dtype == np.float32
    close(apply("pow", [x, two]), T(x) ** 2)


@pytest.mark.parametrize("op", ["eq", "ne", "lt", "le", "gt", "ge"])
def test_comparisons(op):
    x, y = rng.integers(0, 3, (4, 5)), rng.integers(0, 3, (5,))
    assert apply(op, [x, y]).dtype == np.bool_
    close(apply(op, [x, y]), getattr(torch, op)(T(x), T(y)))


def test_logical_where_cast_not():
    a, b = rng.random((3, 6)) > 0.5, rng.random((6,)) > 0.5
    close(apply("and", [a, b]), T(a) & T(b))
    close(apply("or", [a, b]), T(a) | T(b))
    close(apply("not", [a]), ~T(a))
    x, y = f32(3, 6), f32(1, 6)
    close(apply("where", [a, x, y]), torch.where(T(a), T(x), T(y)))
    close(apply("cast", [x * 10], dtype="i64"), (T(x) * 10).to(torch.int64))
    with pytest.raises(ops.OpError, match="different dtypes"):
        apply("add", [x, rng.integers(0, 3, (3, 6))])


@pytest.mark.parametrize("op", ["sum", "mean", "max", "min"])
def test_reductions(op):
    x = f32(3, 5, 7)
    fn = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax, "min": torch.amin}[op]
    close(apply(op, [x], axes=[0, 2], keepdim=True), fn(T(x), dim=(0, 2), keepdim=True))
    close(apply(op, [x], axes=[1], keepdim=False), fn(T(x), dim=1))


def test_softmax_argmax_cumsum():
    x = f32(4, 11) * 5
    close(apply("softmax", [x], axis=1), torch.softmax(T(x), 1), tol=1e-6)
    close(apply("log_softmax", [x], axis=0), torch.log_softmax(T(x), 0), tol=1e-5)
    close(apply("argmax", [x], axis=1, keepdim=False), torch.argmax(T(x), 1))
    ints = rng.integers(0, 5, (3, 7))
    close(apply("cumsum", [ints], axis=1), torch.cumsum(T(ints), 1))


def test_shape_ops():
    x = f32(2, 3, 5)
    close(apply("reshape", [x], shape=[6, 5]), T(x).reshape(6, 5))
    close(apply("permute", [x], perm=[2, 0, 1]), T(x).permute(2, 0, 1))
    close(apply("slice", [x], axis=2, start=1, end=5, step=2), T(x)[:, :, 1:5:2])
    y = f32(2, 1, 5)
    close(apply("concat", [x, y], axis=1), torch.cat([T(x), T(y)], 1))
    with pytest.raises(ops.OpError, match="cannot reshape"):
        apply("reshape", [x], shape=[7, 5])


def test_expand_broadcasts_size_one_axes():
    x = f32(3, 1)
    close(apply("expand", [x], shape=[2, 3, 4]), T(x).expand(2, 3, 4))


@pytest.mark.parametrize("axes, shapes", [([1], [(4, 2)]), ([0, 1], [(5,), (5,)]), ([0, 2], [(2, 1), (1, 3)])])
def test_index_matches_torch_advanced_indexing(axes, shapes):
    x = f32(3, 4, 5)
    idx = [rng.integers(0, x.shape[a], s) for a, s in zip(axes, shapes)]
    key = [slice(None)] * 3
    for a, i in zip(axes, idx):
        key[a] = T(i)
    close(apply("index", [x] + idx, axes=axes), T(x)[tuple(key)])


def test_embedding_and_arange_and_full():
    table, ids = f32(11, 6), rng.integers(0, 11, (1, 9))
    close(apply("embedding", [table, ids]), F.embedding(T(ids), T(table)))
    close(apply("arange", [], start=2, end=11, step=3, dtype="i64"), torch.arange(2, 11, 3))
    close(apply("full", [], shape=[2, 3], value=1.5, dtype="f32"), torch.full((2, 3), 1.5))


def test_matmul_and_linear():
    a, b = f32(2, 1, 5, 7), f32(3, 7, 4)
    close(apply("matmul", [a, b]), T(a) @ T(b), tol=1e-5)
    x, w, bias = f32(1, 9, 13), f32(5, 13), f32(5)
    close(apply("linear", [x, w, bias]), F.linear(T(x), T(w), T(bias)), tol=1e-5)
    close(apply("linear", [x, w]), F.linear(T(x), T(w)), tol=1e-5)
    with pytest.raises(ops.OpError, match="weight must be"):
        apply("linear", [x, f32(13, 5)])


def test_layer_norm():
    x, w, b = f32(2, 7, 19) * 3 + 1, f32(19), f32(19)
    close(apply("layer_norm", [x, w, b], eps=1e-5), F.layer_norm(T(x), (19,), T(w), T(b), 1e-5), tol=1e-5)
    close(apply("layer_norm", [x], eps=1e-6), F.layer_norm(T(x), (19,), eps=1e-6), tol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_sdpa_with_gqa(causal, mask_kind):
    q, k, v = f32(1, 6, 7, 16), f32(1, 2, 7, 16), f32(1, 2, 7, 16)
    inputs, mask = [q, k, v], None
    if mask_kind == "bool":
        mask = np.tril(np.ones((7, 7), bool), k=-1) | np.eye(7, dtype=bool)
        mask[3, :2] = False
    elif mask_kind == "float":
        mask = f32(1, 1, 7, 7)
    if mask is not None:
        inputs.append(mask)
    got = apply("sdpa", inputs, scale=0.3, causal=causal)
    want = F.scaled_dot_product_attention(T(q), T(k), T(v), attn_mask=None if mask is None else T(mask),
                                          is_causal=causal, scale=0.3, enable_gqa=True)
    close(got, want, tol=1e-5)


def test_topk_matches_torch():
    x = f32(7, 13)
    values, indices = apply("topk", [x], k=3, axis=1)
    want = torch.topk(T(x), 3, dim=1)
    close(values, want.values, tol=0)
    assert (indices == want.indices.numpy()).all()
    with pytest.raises(ops.OpError, match="topk of 14"):
        apply("topk", [x], k=14, axis=1)


def _torch_moe(x, router, up, down, top_k, normalize, act, gated):
    """A token-by-token mixture of experts in torch, written from the op's definition."""
    x, router, up, down = T(x), T(router), T(up), T(down)
    experts, hidden = router.shape
    up, down = up.reshape(experts, -1, hidden), down.reshape(experts, hidden, -1)
    fn = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[act]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ router.T, -1)
        weights, ids = torch.topk(probs, top_k)
        if normalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, ids):
            h = up[e] @ x[t]
            h = fn(h[:h.shape[0] // 2]) * h[h.shape[0] // 2:] if gated else fn(h)
            out[t] += w * (down[e] @ h)
    return out


@pytest.mark.parametrize("gated,act,normalize", [(True, "silu", True), (True, "gelu", False), (False, "relu", True)])
def test_moe_matches_a_token_by_token_torch_loop(gated, act, normalize):
    experts, hidden, inner, top_k = 5, 24, 7, 2
    x, router = f32(11, hidden), f32(experts, hidden)
    up, down = f32(experts * inner * (2 if gated else 1), hidden) * 0.3, f32(experts * hidden, inner) * 0.3
    attrs = dict(experts=experts, top_k=top_k, normalize=normalize, act=act, gated=gated)
    got = apply("moe", [x, router, up, down], **attrs)
    close(got, _torch_moe(x, router, up, down, top_k, normalize, act, gated), tol=2e-5)
    with pytest.raises(ops.OpError, match="router"):
        apply("moe", [x, f32(experts + 1, hidden), up, down], **attrs)


def test_qmoe_is_moe_over_its_dequantized_experts():
    from llmc.quant import dequantize, parse_scheme, quantize

    scheme = parse_scheme("q4g32")
    x, router = f32(6, 64), f32(4, 64)
    up, down = f32(4 * 2 * 32, 64), f32(4 * 64, 32)
    attrs = dict(experts=4, top_k=2, normalize=True, act="silu", gated=True)
    parts = [quantize(w, scheme) for w in (up, down)]
    flat = [p[key] for p in parts for key in scheme.parts]
    got = apply("qmoe", [x, router] + flat, scheme="q4g32", **attrs)
    plain = [dequantize(p, scheme, w.shape[1]) for p, w in zip(parts, (up, down))]
    close(got, apply("moe", [x, router] + plain, **attrs), tol=1e-6)


def test_every_op_with_a_reference_is_exercised_here():
    source = open(__file__).read()
    untested = [name for name, d in ops.OPS.items() if d.ref and f'"{name}"' not in source]
    assert untested == []


def test_bf16_rounding():
    x = f32(1000)
    close(round_to_bf16(x), T(x).to(torch.bfloat16).float(), tol=0)


def test_rms_norm_and_gated_activations():
    x, w = f32(2, 5, 19) * 3, f32(19)
    close(apply("rms_norm", [x, w], eps=1e-6), F.rms_norm(T(x), (19,), T(w), eps=1e-6), tol=1e-5)
    g, u = f32(3, 13) * 3, f32(3, 13)
    close(apply("swiglu", [g, u]), F.silu(T(g)) * T(u), tol=1e-6)
    close(apply("geglu", [g, u], approximate="tanh"), F.gelu(T(g), approximate="tanh") * T(u), tol=1e-6)


def test_rope_rotate_half():
    x, cos, sin = f32(1, 3, 7, 10), f32(1, 1, 7, 10), f32(1, 1, 7, 10)
    tx = T(x)
    rotated = torch.cat([-tx[..., 5:], tx[..., :5]], dim=-1)
    close(apply("rope", [x, cos, sin]), tx * T(cos) + rotated * T(sin), tol=1e-6)


def test_rope_interleaved():
    x, cos, sin = f32(1, 3, 7, 10), f32(1, 1, 7, 10), f32(1, 1, 7, 10)
    tx = T(x)
    rotated = torch.stack((-tx[..., 1::2], tx[..., ::2]), dim=-1).flatten(-2)     # GPT-J's rotate_every_two
    close(apply("rope", [x, cos, sin], interleaved=True), tx * T(cos) + rotated * T(sin), tol=1e-6)


def paged(positions, seq_index, tables):
    return [np.asarray(positions, np.int64), np.asarray(seq_index, np.int64), np.asarray(tables, np.int64)]


@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_matches_sdpa_on_the_whole_sequence(window, block_size):
    heads, kv_heads, size, total, prompt = 6, 2, 12, 10, 7
    q, k, v = f32(1, heads, total, size), f32(1, kv_heads, total, size), f32(1, kv_heads, total, size)
    i, j = torch.arange(total)[:, None], torch.arange(total)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    want = F.scaled_dot_product_attention(T(q), T(k), T(v), attn_mask=allowed, scale=0.3, enable_gqa=True)
    blocks = 2 * (-(-total // block_size)) + 1
    table = rng.permutation(blocks)[None, :-(-total // block_size)]       # scattered blocks, none in order
    pools = [np.zeros((3, blocks, kv_heads, block_size, size), np.float32) for _ in range(2)]
    steps = [(0, prompt)] + [(p, p + 1) for p in range(prompt, total)]
    for start, end in steps:        # a prefill, then one token at a time
        got = apply("attention", [q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]] + pools
                    + paged(np.arange(start, end), np.zeros(end - start), table), layer=1, scale=0.3, window=window)
        close(got, want[:, :, start:end], tol=1e-5)
    assert not pools[0][0].any() and not pools[0][2].any()      # other layers' pools untouched
    slots = pools[0][1][table[0][np.arange(total) // block_size], :, np.arange(total) % block_size]
    np.testing.assert_array_equal(slots, k[0].transpose(1, 0, 2))


def test_a_mixed_batch_is_each_sequence_on_its_own():
    """Two prefill chunks and a decode token of three sequences in one step give each sequence's
    own result, whatever block each table points at."""
    heads, kv_heads, size, bs = 4, 2, 8, 4
    lengths = {0: 9, 1: 4, 2: 13}                 # sequence 1 ends exactly at a block boundary
    qkv = {s: [f32(1, h, n, size) for h in (heads, kv_heads, kv_heads)] for s, n in lengths.items()}
    tables = np.array([[5, 0, 7, 9], [2, 11, 11, 11], [1, 3, 8, 10]])
    pools = [np.zeros((1, 12, kv_heads, bs, size), np.float32) for _ in range(2)]
    # Earlier steps: each sequence alone, up to one token (or chunk) before its end.
    done = {0: 8, 1: 0, 2: 12}
    for s, n in done.items():
        if n:
            apply("attention", [x[:, :, :n] for x in qkv[s]] + pools + paged(np.arange(n), np.full(n, s), tables),
                        layer=0, scale=0.5, window=0)
    # The mixed step: sequence 0's and 2's last tokens (decode), all of sequence 1 (prefill).
    order = [(2, 12), (1, 0), (1, 1), (0, 8), (1, 2), (1, 3)]
    step = [np.concatenate([qkv[s][i][:, :, p:p + 1] for s, p in order], axis=2) for i in range(3)]
    got = apply("attention", step + pools + paged([p for _, p in order], [s for s, _ in order], tables),
                layer=0, scale=0.5, window=0)
    for row, (s, p) in enumerate(order):
        q, k, v = qkv[s]
        want = F.scaled_dot_product_attention(T(q), T(k), T(v), is_causal=True, scale=0.5, enable_gqa=True)
        close(got[:, :, row], want[:, :, p], tol=1e-5)


def test_paged_attention_refuses_indices_outside_the_tables_and_the_pool():
    q, k, v = f32(1, 2, 1, 4), f32(1, 1, 1, 4), f32(1, 1, 1, 4)
    pools = [np.zeros((1, 3, 1, 2, 4), np.float32) for _ in range(2)]
    cases = [(paged([4], [0], [[0, 1]]), "more than the 2 blocks"),
             (paged([1], [1], [[0, 1]]), "outside the 1 block tables"),
             (paged([1], [0], [[3, 1]]), "outside the pool of 3 blocks"),
             (paged([-1], [0], [[0, 1]]), "must be >= 0")]
    for inputs, message in cases:
        with pytest.raises(LlmcError, match=message):
            apply("attention", [q, k, v] + pools + inputs, layer=0, scale=1.0, window=0)


def test_fused_body_runs_its_steps():
    x, b = f32(4, 6), f32(6)
    body = [["add", "in0", "in1"], ["gelu", "t0", 'approximate="tanh"'], ["mul", "t1", "in0"]]
    close(apply("fused", [x, b], body=body), F.gelu(T(x) + T(b), approximate="tanh") * T(x), tol=1e-6)
    with pytest.raises(ops.OpError, match="not defined before its use"):
        apply("fused", [x, b], body=[["add", "in0", "t3"]])


def test_add_norm_returns_the_sum_and_its_norm_and_get_picks_one():
    x, r, w, b = f32(3, 17), f32(3, 17), f32(17), f32(17)
    t = ops.infer("add_norm", [Type("f32", (3, 17))] * 2 + [Type("f32", (17,))] * 2, {"norm": "layer", "eps": 1e-5})
    total, normed = ops.OPS["add_norm"].ref([x, r, w, b], {"norm": "layer", "eps": 1e-5}, None, None)
    close(total, T(x) + T(r))
    close(normed, F.layer_norm(T(x) + T(r), (17,), T(w), T(b), 1e-5), tol=1e-5)
    _, normed = ops.OPS["add_norm"].ref([x, r, w], {"norm": "rms", "eps": 1e-6}, None, None)
    close(normed, F.rms_norm(T(x) + T(r), (17,), T(w), 1e-6), tol=1e-5)
    assert str(ops.infer("get", [t], {"index": 1})) == "f32[3, 17]"
    close(ops.OPS["get"].ref([(total, normed)], {"index": 0}, None, None), T(x) + T(r))
    with pytest.raises(ops.OpError, match="not a result of a multi-result node"):
        ops.infer("get", [Type("f32", (3,))], {"index": 0})


@pytest.mark.parametrize("code", ["q8", "q4g32"])
def test_quantized_linear_and_embedding_dequantize_on_the_fly(code):
    from llmc.quant import dequantize, parse_scheme, quantize

    scheme = parse_scheme(code)
    w, x, bias = f32(11, 96), f32(3, 5, 96), f32(11)
    parts = quantize(w, scheme)
    arrays = [parts[k] for k in ("q", "scales", "mins") if k in parts]
    dense = dequantize(parts, scheme, 96)
    close(apply("qlinear", [x] + arrays + [bias], scheme=code), F.linear(T(x), T(dense), T(bias)), tol=1e-5)
    ids = rng.integers(0, 11, (2, 7))
    close(apply("qembedding", arrays + [ids], scheme=code), F.embedding(T(ids), T(dense)), tol=0)
    with pytest.raises(ops.OpError, match="is not a quantized scheme"):
        apply("qlinear", [x] + arrays, scheme="f16")


def test_int8_kv_attention_is_the_f32_attention_over_the_quantized_cache():
    from llmc.ops import quantize_kv_rows

    heads, kv_heads, size, total, bs = 4, 2, 16, 9, 4
    q, k, v = f32(1, heads, total, size), f32(1, kv_heads, total, size), f32(1, kv_heads, total, size)
    codes = [np.zeros((2, 5, kv_heads, bs, size), np.int8) for _ in range(2)]
    scales = [np.zeros((2, 5, kv_heads, bs), np.float32) for _ in range(2)]
    table = [[4, 0, 2]]
    got = apply("attention_kv8", [q, k, v, codes[0], scales[0], codes[1], scales[1]]
                + paged(np.arange(total), np.zeros(total), table), layer=1, scale=0.25, window=0)
    # The same attention over K/V rounded the way the cache stores them.
    kq, ks = quantize_kv_rows(k[0])
    vq, vs = quantize_kv_rows(v[0])
    positions = np.arange(total)
    stored = codes[0][1][np.asarray(table[0])[positions // bs], :, positions % bs]
    np.testing.assert_array_equal(stored, kq.transpose(1, 0, 2))
    assert np.abs(kq.astype(np.float32) * ks[..., None] - k[0]).max() <= np.abs(k).max() / 127
    kd, vd = (kq * ks[..., None])[None], (vq * vs[..., None])[None]
    want = F.scaled_dot_product_attention(T(q), T(kd.astype(np.float32)), T(vd.astype(np.float32)), is_causal=True,
                                          scale=0.25, enable_gqa=True)
    close(got, want, tol=1e-5)
