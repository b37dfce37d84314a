"""The CUDA target's hand-written Triton kernels.

Every value a kernel loads is widened to fp32 and every sum accumulates in fp32; stores convert to
the destination's dtype (fp16 or bf16 for activations and the KV cache, fp32 for logits). Sizes
and element strides are i32 arguments. What changes from step to step (token ids, positions,
block tables) is read from device buffers, never passed as an argument, so a captured decode
graph replays for any positions and tables.

This module is imported only where Triton is: by the build worker (cross-compiling each kernel to
cubins) and by the emulator (``TRITON_INTERPRET=1``, the kernels run on CPU tensors). References
for every kernel are in tests/test_cuda_kernels.py.
"""

import triton
import triton.language as tl

# -- weights -----------------------------------------------------------------------------------


@triton.jit
def _weight_tile(w, scales, mins, offs_n, offs_k, mask, K, MODE: tl.constexpr, GROUP: tl.constexpr):
    """fp32 tile W[offs_n, offs_k] of an [N, K] weight: float (MODE 0), q8 codes times a scale per
    GROUP (MODE 8), or q4 codes packed two per byte, times a scale plus a min (MODE 4, the
    llmc.quant order: byte j of a group holds element j low and element j + GROUP/2 high)."""
    n = offs_n.to(tl.int64)[:, None]
    k = offs_k[None, :]
    if MODE == 0:
        tile = tl.load(w + n * K + k, mask=mask, other=0.0).to(tl.float32)
    else:
        group_at = n * (K // GROUP) + k // GROUP
        scale = tl.load(scales + group_at, mask=mask, other=0.0).to(tl.float32)
        if MODE == 8:
            tile = tl.load(w + n * K + k, mask=mask, other=0).to(tl.float32) * scale
        else:
            half: tl.constexpr = GROUP // 2
            j = k % GROUP
            byte = tl.load(w + n * (K // 2) + (k // GROUP) * half + j % half, mask=mask, other=0).to(tl.int32)
            code = tl.where(j >= half, byte >> 4, byte & 15).to(tl.float32)
            tile = code * scale + tl.load(mins + group_at, mask=mask, other=0.0).to(tl.float32)
    return tile


@triton.jit
def linear(x, ldx, w, scales, mins, bias, out, ldo, M, N, K, MODE: tl.constexpr, GROUP: tl.constexpr,
           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, N] = x[M, K] @ W[N, K].T (+ bias). BLOCK_M == 1 is the decode GEMV (one row per
    program column, fp32 FMAs); otherwise BLOCK_M x BLOCK_N tiles on the tensor cores, the weight
    tile dequantized to the activation dtype."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), tl.float32)
        row = pid_m.to(tl.int64)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xv = tl.load(x + row * ldx + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            tile = _weight_tile(w, scales, mins, offs_n, offs_k, n_ok[:, None] & k_ok[None, :], K, MODE, GROUP)
            acc += tl.sum(tile * xv[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out + row * ldo + offs_n, acc.to(out.dtype.element_ty), mask=n_ok)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xt = tl.load(x + rows * ldx + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            tile = _weight_tile(w, scales, mins, offs_n, offs_k, n_ok[:, None] & k_ok[None, :], K, MODE, GROUP)
            acc = tl.dot(xt, tl.trans(tile.to(xt.dtype)), acc)
        if HAS_BIAS:
            acc += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out + rows * ldo + offs_n[None, :], acc.to(out.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def embedding(table, scales, mins, ids, out, WIDTH, MODE: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """out[r, :] = table[ids[r], :], dequantized like _weight_tile."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < WIDTH
    token = tl.load(ids + row) + tl.zeros((1,), tl.int64)
    tile = _weight_tile(table, scales, mins, token, offs, ok[None, :], WIDTH, MODE, GROUP)
    tl.store(out + row.to(tl.int64) * WIDTH + offs, tl.sum(tile, axis=0).to(out.dtype.element_ty), mask=ok)


# -- mixture of experts ------------------------------------------------------------------------
# The moe / qmoe ops in four launches over a static grid (so a decode plan captures as a graph):
# moe_route picks each token's experts, moe_sort groups the step's (token, choice) pairs by expert
# into blocks of BLOCK_M slots (each block one expert's, padded), moe_up and moe_down run every
# block against its expert's weights only (blocks past the used ones exit at once), moe_combine
# adds each token's choices by weight in the router's order.


@triton.jit
def moe_route(x, ldx, router, ids, weights, H, E, TOP_K: tl.constexpr, NORMALIZE: tl.constexpr,
              BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program per token: logits = x @ router.T in fp32 (the router is kept fp32), softmax,
    the TOP_K largest (the lower index first among equals) into ids (i32) and weights (fp32),
    renormalised to sum 1 if NORMALIZE."""
    row = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    logits = tl.zeros((BLOCK_E,), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        xv = tl.load(x + row * ldx + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        r = tl.load(router + offs_e.to(tl.int64)[:, None] * H + offs_h[None, :], mask=e_ok[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)
        logits += tl.sum(r * xv[None, :], axis=1)
    logits = tl.where(e_ok, logits, -float("inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    p = tl.where(e_ok, p, -1.0)
    total = tl.sum(tl.zeros((1,), tl.float32), axis=0)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        choice = tl.min(tl.where(p == best, offs_e, BLOCK_E), axis=0)
        tl.store(ids + row * TOP_K + j, choice.to(tl.int32))
        tl.store(weights + row * TOP_K + j, best)
        total += best
        p = tl.where(offs_e == choice, -2.0, p)
    if NORMALIZE:
        for j in tl.static_range(TOP_K):
            tl.store(weights + row * TOP_K + j, tl.load(weights + row * TOP_K + j) / total)


@triton.jit
def moe_sort(ids, slots, rows, block_experts, P, E, SLOTS, BLOCKS, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: the P pairs grouped by expert, in pair order within each. Expert e's pairs take
    slots from its first block on, padded to whole blocks of BLOCK_M: rows[slot] = the pair (-1 in
    padding), slots[pair] = its slot, block_experts[b] = block b's expert (-1 past the last used).
    rows holds SLOTS and block_experts BLOCKS entries, at least what P pairs can fill."""
    for s0 in range(0, SLOTS, BLOCK_P):
        offs = s0 + tl.arange(0, BLOCK_P)
        tl.store(rows + offs, tl.full((BLOCK_P,), -1, tl.int32), mask=offs < SLOTS)
    for b0 in range(0, BLOCKS, BLOCK_P):
        offs = b0 + tl.arange(0, BLOCK_P)
        tl.store(block_experts + offs, tl.full((BLOCK_P,), -1, tl.int32), mask=offs < BLOCKS)
    tl.debug_barrier()
    base = P * 0
    for e in range(0, E):
        count = P * 0
        for p0 in range(0, P, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            mine = tl.load(ids + offs, mask=offs < P, other=-1) == e
            slot = base + count + tl.cumsum(mine.to(tl.int32), axis=0) - 1
            tl.store(slots + offs, slot, mask=mine)
            tl.store(rows + slot, offs, mask=mine)
            count += tl.sum(mine.to(tl.int32), axis=0)
        blocks = (count + BLOCK_M - 1) // BLOCK_M
        for b0 in range(0, blocks, BLOCK_P):
            offs = b0 + tl.arange(0, BLOCK_P)
            tl.store(block_experts + base // BLOCK_M + offs, tl.full((BLOCK_P,), 0, tl.int32) + e, mask=offs < blocks)
        base += blocks * BLOCK_M


@triton.jit
def _moe_act(v, ACT: tl.constexpr):
    """kernels.c's moe_act: 0 silu, 1 gelu (erf), 2 gelu (tanh form), 3 relu."""
    if ACT == 0:
        out = v / (1.0 + tl.exp(-v))
    elif ACT == 1:
        out = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        out = 0.5 * v * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    else:
        out = tl.maximum(v, 0.0)
    return out


@triton.jit
def _expert_tile(acc, xt, w, scales, mins, e_row, offs_n, n_ok, offs_k, k_ok, K, MODE: tl.constexpr,
                 GROUP: tl.constexpr):
    tile = _weight_tile(w, scales, mins, e_row + offs_n, offs_k, n_ok[:, None] & k_ok[None, :], K, MODE, GROUP)
    return tl.dot(xt, tl.trans(tile.to(xt.dtype)), acc)


@triton.jit
def moe_up(x, ldx, rows, block_experts, w, scales, mins, out, H, I, TOP_K: tl.constexpr, MODE: tl.constexpr,
           GROUP: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Block b's slots (one expert's pairs): out[slot, n] = act(gate) * up (GATED) or act(up) of
    the pair's token row of x through its expert's gate/up rows, for BLOCK_N of the I columns."""
    pid_n = tl.program_id(0)
    block = tl.program_id(1)
    e = tl.load(block_experts + block)
    if e >= 0:
        slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(rows + slots)
        ok = pair >= 0
        token = tl.where(ok, pair // TOP_K, 0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        e_row = e.to(tl.int64) * (2 * I if GATED else I)
        gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            xt = tl.load(x + token[:, None] * ldx + offs_k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
            gate = _expert_tile(gate, xt, w, scales, mins, e_row, offs_n, n_ok, offs_k, k_ok, H, MODE, GROUP)
            if GATED:
                up = _expert_tile(up, xt, w, scales, mins, e_row + I, offs_n, n_ok, offs_k, k_ok, H, MODE, GROUP)
        result = _moe_act(gate, ACT)
        if GATED:
            result = result * up
        tl.store(out + slots.to(tl.int64)[:, None] * I + offs_n[None, :], result.to(out.dtype.element_ty),
                 mask=ok[:, None] & n_ok[None, :])


@triton.jit
def moe_down(a, rows, block_experts, w, scales, mins, out, H, I, MODE: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Block b's slots: out[slot, n] = a[slot] through its expert's down rows, BLOCK_N of the H."""
    pid_n = tl.program_id(0)
    block = tl.program_id(1)
    e = tl.load(block_experts + block)
    if e >= 0:
        slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = tl.load(rows + slots) >= 0
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < I
            at = tl.load(a + slots.to(tl.int64)[:, None] * I + offs_k[None, :], mask=ok[:, None] & k_ok[None, :],
                         other=0.0)
            acc = _expert_tile(acc, at, w, scales, mins, e.to(tl.int64) * H, offs_n, n_ok, offs_k, k_ok, I, MODE,
                               GROUP)
        tl.store(out + slots.to(tl.int64)[:, None] * H + offs_n[None, :], acc.to(out.dtype.element_ty),
                 mask=ok[:, None] & n_ok[None, :])


@triton.jit
def moe_combine(o, slots, weights, out, H, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = the sum over j of weights[t, j] * o[slots[t * TOP_K + j]], in j order."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < H
    acc = tl.zeros((BLOCK,), tl.float32)
    for j in tl.static_range(TOP_K):
        slot = tl.load(slots + row * TOP_K + j).to(tl.int64)
        acc += tl.load(weights + row * TOP_K + j) * tl.load(o + slot * H + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + row * H + offs, acc.to(out.dtype.element_ty), mask=ok)


# -- norms and rotary embedding ---------------------------------------------------------------


@triton.jit
def norm(x, ldx, r, ldr, w, b, total, normed, N, eps, KIND: tl.constexpr, ADD: tl.constexpr,
         HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program: RMSNorm (KIND 0) or LayerNorm (KIND 1) of x, or with ADD of x + r,
    whose sum is stored to ``total`` (the residual stream) before it is normalised."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    v = tl.load(x + row * ldx + offs, mask=ok, other=0.0).to(tl.float32)
    if ADD:
        v += tl.load(r + row * ldr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(total + row * N + offs, v.to(total.dtype.element_ty), mask=ok)
        v = tl.load(total + row * N + offs, mask=ok, other=0.0).to(tl.float32)   # normalise what was stored
    if KIND == 0:
        y = v / tl.sqrt(tl.sum(v * v, axis=0) / N + eps)
    else:
        centred = tl.where(ok, v - tl.sum(v, axis=0) / N, 0.0)
        y = centred / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    if HAS_W:
        y = y * tl.load(w + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(normed + row * N + offs, y.to(normed.dtype.element_ty), mask=ok)


@triton.jit
def rope(x, xs0, xs1, xs2, c, cs0, cs1, cs2, cs3, s, ss0, ss1, ss2, ss3, out, D1, D2, D, BLOCK: tl.constexpr,
         INTERLEAVED: tl.constexpr):
    """out[row, :] = x*cos + rotate_half(x)*sin for each row of a rank-4 x (last axis contiguous),
    or with INTERLEAVED the pairs (2i, 2i + 1) rotated; cos and sin are strided views broadcast to
    x's shape (stride 0 where they repeat)."""
    row = tl.program_id(0)
    i2 = row % D2
    i1 = (row // D2) % D1
    i0 = row // (D2 * D1)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    half = D // 2
    base = x + i0.to(tl.int64) * xs0 + i1 * xs1 + i2 * xs2
    v = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
    if INTERLEAVED:
        partner = tl.load(base + (offs ^ 1), mask=ok, other=0.0).to(tl.float32)
        rotated = tl.where(offs % 2 == 0, -partner, partner)
    else:
        partner = tl.load(base + tl.where(offs < half, offs + half, offs - half), mask=ok, other=0.0).to(tl.float32)
        rotated = tl.where(offs < half, -partner, partner)
    cv = tl.load(c + i0 * cs0 + i1 * cs1 + i2 * cs2 + offs * cs3, mask=ok, other=0.0).to(tl.float32)
    sv = tl.load(s + i0 * ss0 + i1 * ss1 + i2 * ss2 + offs * ss3, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + row.to(tl.int64) * D + offs, (v * cv + rotated * sv).to(out.dtype.element_ty), mask=ok)


# -- attention over the paged KV pool ---------------------------------------------------------
# A pool pointer arrives at its layer's [blocks, HK, KV_BLOCK, D] elements. Position p of the
# sequence whose block table row starts at ``tables + row`` lives in block tables[row + p //
# KV_BLOCK] at offset p % KV_BLOCK. Every token carries its own position and sequence, so a step
# may mix prefill chunks and decode tokens of many sequences. Query head h reads key/value head
# h // GROUP: grouped-query attention without repeating K/V.


@triton.jit
def _pool_rows(tables, row, offs_n, ok, g, HK, KV_BLOCK: tl.constexpr):
    """The pool rows (each D elements) of key/value head g at the positions offs_n of one
    sequence, gathered through its block table (a tile of keys may span several blocks)."""
    block = tl.load(tables + row + offs_n // KV_BLOCK, mask=ok, other=0)
    return (block * HK + g) * KV_BLOCK + offs_n % KV_BLOCK


@triton.jit
def kv_write(k, k_sh, k_ss, v, v_sh, v_ss, kc, vc, positions, seq_index, tables, MAX_BLOCKS, HK, D,
             KV_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (t, g): token t's key and value of head g to its slot in the pool."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    pos = tl.load(positions + t)
    block = tl.load(tables + tl.load(seq_index + t) * MAX_BLOCKS + pos // KV_BLOCK)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    at = ((block * HK + g) * KV_BLOCK + pos % KV_BLOCK) * D + offs
    tl.store(kc + at, tl.load(k + g * k_sh + t * k_ss + offs, mask=ok).to(kc.dtype.element_ty), mask=ok)
    tl.store(vc + at, tl.load(v + g * v_sh + t * v_ss + offs, mask=ok).to(vc.dtype.element_ty), mask=ok)


@triton.jit
def _soft_cap(scores, CAP: tl.constexpr):
    """Gemma 2's cap * tanh(scores / cap), tanh from exp (1 - 2 / (e^2x + 1): +-1 at the extremes)."""
    return CAP * (1.0 - 2.0 / (tl.exp(2.0 * scores / CAP) + 1.0))


@triton.jit
def attn_decode(q, q_sh, q_ss, kc, vc, part, positions, seq_index, tables, MAX_BLOCKS, HK, GROUP, D, scale, WINDOW,
                KV_BLOCK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr):
    """Flash-decoding: program (t, g, split) attends token t's GROUP query heads of key/value head
    g (rows of one tile, so K/V are read once per group) over its share of the positions
    0..positions[t] of its sequence, and writes (unnormalised output, running max, sum) per head
    to ``part``. Scores and sums are fp32 (K/V widened on load); the merge combines the splits."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(seq_index + t) * MAX_BLOCKS
    end = tl.load(positions + t).to(tl.int32) + 1
    first = 0
    if WINDOW > 0:
        first = tl.maximum(end - WINDOW, 0)
    share = tl.cdiv(tl.cdiv(end - first, SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * share
    hi = tl.minimum(lo + share, end)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < GROUP
    heads = g * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qt = tl.load(q + t.to(tl.int64) * q_ss + heads[:, None] * q_sh + offs_d[None, :],
                 mask=h_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale
    m = tl.full((BLOCK_H,), -float("inf"), tl.float32)
    total = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):          # every tile holds a key, so m stays finite inside
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        at = _pool_rows(tables, row, offs_n, n_ok, g, HK, KV_BLOCK)[:, None] * D + offs_d[None, :]
        keys = tl.load(kc + at, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        scores = tl.dot(qt, tl.trans(keys), input_precision="ieee")
        if SOFTCAP > 0:
            scores = _soft_cap(scores, SOFTCAP)
        scores = tl.where(n_ok[None, :], scores, -float("inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        values = tl.load(vc + at, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, values, input_precision="ieee")
        m = m_new
    slots = part + ((t * HK * GROUP + heads) * SPLITS + split).to(tl.int64) * (BLOCK_D + 2)
    tl.store(slots[:, None] + offs_d[None, :], acc, mask=h_ok[:, None])
    tl.store(slots + BLOCK_D, m, mask=h_ok)
    tl.store(slots + BLOCK_D + 1, total, mask=h_ok)


@triton.jit
def attn_merge(part, out, o_ss, o_sh, HQ, D, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine token t's flash-decoding splits for head h: out = sum(w_i * acc_i) / sum(w_i * l_i),
    w_i = exp(m_i - max m); a split past the end of the context has m_i = -inf and weighs 0."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    slots = part + ((t * HQ + h) * SPLITS + offs_s).to(tl.int64) * (BLOCK_D + 2)
    accs = tl.load(slots[:, None] + offs_d[None, :])
    ms = tl.load(slots + BLOCK_D)
    totals = tl.load(slots + BLOCK_D + 1)
    weights = tl.where(ms == -float("inf"), 0.0, tl.exp(ms - tl.max(ms, axis=0)))
    o = tl.sum(weights[:, None] * accs, axis=0) / tl.sum(weights * totals, axis=0)
    tl.store(out + t.to(tl.int64) * o_ss + h * o_sh + offs_d, o.to(out.dtype.element_ty), mask=offs_d < D)


@triton.jit
def attn_prefill(q, q_sh, q_ss, kc, vc, out, o_sh, o_ss, tiles, positions, seq_index, tables, MAX_BLOCKS, HK, GROUP,
                 D, scale, WINDOW, KV_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr):
    """Program (tile, h): tiled causal (windowed) attention of query head h for one tile of the
    step, with online softmax and tensor-core tiles. A tile is ``tiles[2*tile]``, the first of
    ``tiles[2*tile + 1]`` consecutive token rows of one sequence (the launcher cuts them, at most
    BLOCK_M), each at its own position; keys run over 0..the tile's last position, through the
    sequence's block table, and each row takes the keys at or before its position."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    g = h // GROUP
    first_row = tl.load(tiles + 2 * tile)
    count = tl.load(tiles + 2 * tile + 1)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < count
    rows = (first_row + offs_m).to(tl.int64)
    row = tl.load(seq_index + first_row) * MAX_BLOCKS
    qpos = tl.load(positions + rows, mask=m_ok, other=0).to(tl.int32)
    hi = tl.max(qpos, axis=0) + 1
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(tl.min(tl.where(m_ok, qpos, hi), axis=0) - WINDOW + 1, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qt = tl.load(q + h * q_sh + rows[:, None] * q_ss + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                 other=0.0)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        at = _pool_rows(tables, row, offs_n, n_ok, g, HK, KV_BLOCK)[:, None] * D + offs_d[None, :]
        keys = tl.load(kc + at, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        scores = tl.dot(qt, tl.trans(keys.to(qt.dtype))) * scale
        if SOFTCAP > 0:
            scores = _soft_cap(scores, SOFTCAP)
        allowed = (offs_n[None, :] <= qpos[:, None]) & n_ok[None, :]
        allowed = allowed & ((WINDOW == 0) | (qpos[:, None] - offs_n[None, :] < WINDOW))
        scores = tl.where(allowed, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)     # rows with no key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        values = tl.load(vc + at, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(qt.dtype), values.to(qt.dtype))
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out + rows[:, None] * o_ss + h * o_sh + offs_d[None, :], o.to(out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


# -- sampling: only a token id crosses to the host --------------------------------------------


@triton.jit
def argmax(logits, N, token, BLOCK: tl.constexpr):
    """token[0] = the first index of the largest logit (one program)."""
    best = tl.max(tl.full((BLOCK,), -float("inf"), tl.float32), axis=0)
    index = tl.sum(tl.zeros((BLOCK,), tl.int32), axis=0)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        v = tl.load(logits + offs, mask=offs < N, other=-float("inf")).to(tl.float32)
        block_best = tl.max(v, axis=0)
        block_index = tl.min(tl.where(v == block_best, offs, N), axis=0)
        index = tl.where(block_best > best, block_index, index)
        best = tl.maximum(best, block_best)
    tl.store(token, index.to(tl.int64))


@triton.jit
def _uniform(seed, offs):
    """A uniform number in (0, 1) per (seed, offset): a 32-bit integer hash, the same on any device
    and in llmc.targets.cuda.reference."""
    h = (offs.to(tl.int64) ^ ((seed.to(tl.int64) * 2654435769) & 4294967295)) & 4294967295
    h = (h * 2246822507) & 4294967295
    h = h ^ (h >> 13)
    h = (h * 3266489909) & 4294967295
    h = h ^ (h >> 16)
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _count_above(z, N, scale, t, BLOCK: tl.constexpr):
    count = tl.sum(tl.zeros((BLOCK,), tl.int32), axis=0)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        v = tl.load(z + offs, mask=offs < N, other=-float("inf")).to(tl.float32) * scale
        count += tl.sum((v >= t).to(tl.int32), axis=0)
    return count


@triton.jit
def _mass_above(z, N, scale, top, t, BLOCK: tl.constexpr):
    mass = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        v = tl.load(z + offs, mask=offs < N, other=-float("inf")).to(tl.float32) * scale
        mass += tl.sum(tl.where(v >= t, tl.exp(v - top), 0.0), axis=0)
    return mass


@triton.jit
def sample(logits, N, params, seed, token, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """token[0] drawn from softmax(logits / T) after top-k, top-p and min-p, by the Gumbel-max
    trick over the kept tokens. ``params`` is f32 [T, top_k, top_p, min_p] (top_k 0: no limit).
    The top-k and top-p cut-offs are found by bisection on the logit value (STEPS halvings), so
    nothing is sorted."""
    inv_t = 1.0 / tl.load(params)
    top_k = tl.load(params + 1).to(tl.int32)
    top_p = tl.load(params + 2)
    min_p = tl.load(params + 3)
    top = tl.max(tl.full((BLOCK,), -float("inf"), tl.float32), axis=0)
    low = tl.max(tl.full((BLOCK,), float("inf"), tl.float32), axis=0)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        v = tl.load(logits + offs, mask=offs < N, other=-float("inf")).to(tl.float32) * inv_t
        top = tl.maximum(top, tl.max(v, axis=0))
        low = tl.minimum(low, tl.min(tl.where(offs < N, v, float("inf")), axis=0))
    cut = low
    if (top_k > 0) & (top_k < N):         # the largest t with at least top_k values >= t
        lo = low
        hi = top + 1.0
        for _ in range(STEPS):
            mid = (lo + hi) * 0.5
            above = _count_above(logits, N, inv_t, mid, BLOCK) >= top_k
            lo = tl.where(above, mid, lo)
            hi = tl.where(above, hi, mid)
        cut = lo
    if top_p < 1.0:                       # the largest t whose tokens >= t hold top_p of the mass
        need = top_p * _mass_above(logits, N, inv_t, top, cut, BLOCK)
        lo = cut
        hi = top + 1.0
        for _ in range(STEPS):
            mid = (lo + hi) * 0.5
            enough = _mass_above(logits, N, inv_t, top, mid, BLOCK) >= need
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        cut = lo
    cut = tl.maximum(cut, top + tl.log(tl.maximum(min_p, 1e-30)))
    best = tl.max(tl.full((BLOCK,), -float("inf"), tl.float32), axis=0)
    index = tl.sum(tl.zeros((BLOCK,), tl.int32), axis=0)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        v = tl.load(logits + offs, mask=offs < N, other=-float("inf")).to(tl.float32) * inv_t
        gumbel = -tl.log(-tl.log(_uniform(seed, offs)))
        score = tl.where((v >= cut) & (offs < N), v + gumbel, -float("inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.min(tl.where(score == block_best, offs, N), axis=0)
        index = tl.where(block_best > best, block_index, index)
        best = tl.maximum(best, block_best)
    tl.store(token, index.to(tl.int64))
