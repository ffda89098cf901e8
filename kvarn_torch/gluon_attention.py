"""Gluon kernel: decode attention over the quantized records of a paged KVarN cache, with
the codes loaded straight into the tensor-core operand registers (sm_80+ `mma.sync`).

Scope: k4v2 presets with 128-token tiles, head_dim 128, decode (one query token), GQA
groups of up to 8 query heads, CUDA only (Gluon has no interpreter). The pool blocks
(sink, tail) go through `triton_attention`'s kernel in its POOL_ONLY mode, into the same
partials; `applies` says when `attention` here is the faster choice.

Why Gluon. Triton's block language chooses the register layouts of a dot's operands, so
the unpacked codes of the Triton kernel take a round trip through shared memory on their
way into the MMA, and the softmax's reductions cross warps. Here every layout is written
out: a program is one warp; each thread loads exactly the code bits its MMA fragments
need (16-bit K and 32-bit V words), one `and` per fragment register masks a pair of codes
into the mantissas of two fp16 subnormals, and the warp's softmax state never leaves it.

The dots, per 128-token record and 16 query rows (a GQA group, zero-padded to the M of
m16n8k16; the bottom 8 rows are dropped from the accumulators):

    s[r, t]  = tau_K[t] * (sum_d q'[r, d] * c_K[d, t] + sum_d q[r, d] * z_K[d])
    pv[d, r] = sigma_V[d] * (sum_t c_V[t, d] * p'[r, t] + sum_t p[r, t] * z_V[t])

with q' = q * a_K and p' = p * a_V rounded to fp16 (q is scaled into [-1, 1] first, so
q' cannot overflow). A code c masked at bit position b enters the dot as the subnormal
2**b * c * 2**-24, exact in fp16 and in the MMA's fp32 accumulation; the 2**(24 - b) comes
back out of the per-row (K) or per-channel (V) coefficients. PV is computed transposed
(o^T += c_V^T p'^T) so that the V codes are the A operand, whose fragments hold 4 tokens
of a channel, and P^T's B fragments are the S accumulators of two K column blocks as
they stand.

Operand orders. The reduction index of a dot and its output columns may be permuted
freely if both operands agree: the K codes' tokens and the V codes' channels are taken
in the order the fragment registers receive them from word-sized loads (documented at
each load below), and the output channels are put back in order at the partial store.

Output: split-KV partials in `triton_attention`'s format ([B, Hk, 1, splits + 1, 16, D]
unnormalized accumulators, base-2 max and sum per row; the last split is the pool's),
merged, normalized and rotated back by `triton_attention._merge_kernel`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from kvarn.format import layout
from kvarn_torch import triton_attention
from kvarn_torch.cache import KVarNCache

ROWS = gl.constexpr(16)  # query rows per program: the M of mma.sync m16n8k16
D = gl.constexpr(128)
G = gl.constexpr(128)
NUM_WARPS = 1  # a program is one warp: its softmax state never leaves it
PROGRAMS_PER_SM = 8  # resident at once: 65,536 registers / (249 x 32)
MIN_KV_SEQUENCES = 64
MAX_SPLITS = 64  # 1 x 32K on an H200: 50 us at 32 splits, 42 us at 64
MASKED = triton_attention.MASKED
LOG2E = triton_attention.LOG2E
UNIT = gl.constexpr(2.0**24)  # a code c masked into an fp16 mantissa is c * 2**-24

MMA = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
A_OP = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
B_OP = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)

# K code halfwords of one 32-token chunk as [64 channel pairs, 8 token quads, 2 channels of
# the pair]: thread (g = lane // 4, t = lane % 4) holds pair 8s + 4h + t (s < 8, h < 2) of
# quad g, both channels: after the 2 -> 1 join below, exactly the B-operand registers of
# mma m16n8k16 over D = 128 (k = channel).
K_WORDS = gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 1], [4, 0, 0], [8, 0, 0], [16, 0, 0], [32, 0, 0]],
    lane_bases=[[1, 0, 0], [2, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
    warp_bases=[], block_bases=[], shape=[64, 8, 2])
# V code words of half a 16-token PV step as [4 token pairs, 8 words, 2 tokens of the pair]:
# thread (g, t) holds pair t, word g (the 16 channels 16 g .. 16 g + 15 of a token).
V_WORDS = gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 1]],
    lane_bases=[[1, 0, 0], [2, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
    warp_bases=[], block_bases=[], shape=[4, 8, 2])
# The top 8 rows of an MMA accumulator [16, 8] and [16, D]: the real query rows of GQA
# groups <= 8 (the bottom 8 are zero padding, computed by the MMA and dropped).
_LANES = [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]]
TOP = gl.DistributedLinearLayout(reg_bases=[[0, 1]], lane_bases=_LANES, warp_bases=[],
                                 block_bases=[], shape=[8, 8])
# The query rows as loaded: a whole row per thread (lanes past the 8 rows repeat them), so
# the butterflies of its rotation stay within a thread.
Q_LOAD = gl.BlockedLayout(size_per_thread=[1, 128], threads_per_warp=[32, 1],
                          warps_per_cta=[1, 1], order=[1, 0])
LOG_D = gl.constexpr(7)
# The top 8 rows of an A operand [16, D] (the query), float32.
A_TOP = gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 8], [0, 16], [0, 32], [0, 64]],
                                   lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
                                   warp_bases=[], block_bases=[], shape=[8, 128])
T_ROW = gl.SliceLayout(1, TOP)
T_COL = gl.SliceLayout(0, TOP)
O_ROW = gl.SliceLayout(1, MMA)  # the accumulator [D, 8] of the transposed PV dot
O_COL = gl.SliceLayout(0, MMA)
# Triton reads module globals only as constexprs.
(MMA, A_OP, B_OP, K_WORDS, V_WORDS, TOP, A_TOP, Q_LOAD, T_ROW, T_COL, O_ROW, O_COL) = map(
    gl.constexpr, (MMA, A_OP, B_OP, K_WORDS, V_WORDS, TOP, A_TOP, Q_LOAD, T_ROW, T_COL, O_ROW,
                   O_COL))
HALF = gl.constexpr(8)  # real query rows per program


def _nibbles_asm() -> str:
    """Two u16 words (channels a, b; 4 tokens each) -> 4 fp16 pairs (a, b) of token i:
    the subnormal c * 2**-24 (i even) or 16 c * 2**-24 (i odd)."""
    out = []
    for i in range(4):
        src = "w" if i < 2 else "w8"
        mask = "0x000F000F" if i % 2 == 0 else "0x00F000F0"
        out.append(f"and.b32 t, {src}, {mask}; mov.b32 {{${2 * i}, ${2 * i + 1}}}, t;")
    return ("{ .reg .b32 w, w8, t; mov.b32 w, {$8, $9}; shr.b32 w8, w, 8; "
            + " ".join(out) + " }")


def _crumbs_asm() -> str:
    """Two u32 words (tokens a, b; 16 channels each) -> 16 fp16 pairs (a, b) of channel j:
    the subnormal 4**e * c * 2**-24 with e = j % 8 for j % 8 < 5, j % 8 - 5 otherwise."""
    out = ["{ .reg .b32 lo, hi, lo10, hi10, t;",
           "prmt.b32 lo, $32, $33, 0x5410; prmt.b32 hi, $32, $33, 0x7632;",
           "shr.b32 lo10, lo, 10; shr.b32 hi10, hi, 10;"]
    for j in range(16):
        e = j % 8
        src = ("lo" if j < 8 else "hi") + ("" if e < 5 else "10")
        mask = (3 << (2 * (e if e < 5 else e - 5))) * 0x10001
        out.append(f"and.b32 t, {src}, {mask:#010x}; mov.b32 {{${2 * j}, ${2 * j + 1}}}, t;")
    return " ".join(out) + " }"


NIBBLES_ASM = gl.constexpr(_nibbles_asm())
CRUMBS_ASM = gl.constexpr(_crumbs_asm())


def v_scale(j: int) -> float:
    """f of the V codes in output column block j (see _crumbs_asm)."""
    e = j % 8
    return float(4 ** (e if e < 5 else e - 5))


def v_channel(n: int) -> int:
    """The channel of output column n = 8 j + g (block j, from thread group g)."""
    j, g = divmod(n, 8)
    return 16 * g + 8 * (j // 8) + j % 8


@gluon.jit
def _pair_rows(lo, hi, P: gl.constexpr, N: gl.constexpr):
    """[P, N] even and odd rows -> [2 P, N] (row 2 p + m), the pair in registers."""
    return gl.reshape(gl.permute(gl.join(lo, hi), [0, 2, 1]), [2 * P, N])


@gluon.jit
def _k_operands(codes16_ptr, rec_half, c0, K_CODES: gl.constexpr):
    """B operands [D, 8] of the K codes of tokens c0 .. c0 + 31, column block i holding
    token c0 + 4 g + i in column g, value f_i * code * 2**-24 with f_i = 1, 16, 1, 16."""
    pair = gl.arange(0, 64, layout=gl.SliceLayout(1, gl.SliceLayout(2, K_WORDS)))
    quad = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, K_WORDS)))
    m = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, K_WORDS)))
    chan = 2 * pair[:, None, None] + m[None, None, :]
    # a channel's row of codes: G / 4 halfwords of 4 tokens each
    offs = chan * (G // 4) + (c0 // 4 + quad)[None, :, None]
    words = gl.load(codes16_ptr + rec_half + K_CODES // 2 + offs)
    wa, wb = gl.split(words)
    r = gl.inline_asm_elementwise(NIBBLES_ASM, "=h," * 8 + "h,h", [wa, wb],
                                  dtype=(gl.float16,) * 8, is_pure=True, pack=1)
    return (gl.convert_layout(_pair_rows(r[0], r[1], 64, 8), B_OP, assert_trivial=True),
            gl.convert_layout(_pair_rows(r[2], r[3], 64, 8), B_OP, assert_trivial=True),
            gl.convert_layout(_pair_rows(r[4], r[5], 64, 8), B_OP, assert_trivial=True),
            gl.convert_layout(_pair_rows(r[6], r[7], 64, 8), B_OP, assert_trivial=True))


@gluon.jit
def _v_half(words_ptr, rec_word, t0, H: gl.constexpr, V_CODES: gl.constexpr):
    """The 32 fp16 column blocks (block j, token m: r[2 j + m], each [4, 8]) of rows
    8 H + 2 t + m of the V operand of PV step t0 (see _v_operand)."""
    t = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, V_WORDS)))
    grp = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, V_WORDS)))
    m = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, V_WORDS)))
    tok = (t0 + H + 8 * t)[:, None, None] + 4 * m[None, None, :]
    offs = tok * (D // 16) + grp[None, :, None]  # a token's row: D / 16 words of 16 codes
    words = gl.load(words_ptr + rec_word + V_CODES // 4 + offs)
    wa, wb = gl.split(words)
    return gl.inline_asm_elementwise(CRUMBS_ASM, "=h," * 32 + "r,r", [wa, wb],
                                     dtype=(gl.float16,) * 32, is_pure=True, pack=1)


@gluon.jit
def _join_rows(r, R8: gl.constexpr, M: gl.constexpr):
    """Blocks r[2 (8 R8 + mt) + M] (mt < 8, each [4, 8]) -> [4, 8, 2, 2, 2] indexed
    [t, g, mt >> 2, (mt >> 1) & 1, mt & 1] (later joins are faster registers)."""
    o: gl.constexpr = 16 * R8 + M
    y0 = gl.join(r[o + 0], r[o + 8])
    y1 = gl.join(r[o + 2], r[o + 10])
    y2 = gl.join(r[o + 4], r[o + 12])
    y3 = gl.join(r[o + 6], r[o + 14])
    return gl.join(gl.join(y0, y2), gl.join(y1, y3))


@gluon.jit
def _v_operand(words_ptr, rec_word, t0, V_CODES: gl.constexpr):
    """A operand [D, 16] of the transposed PV dot (o^T += c_V^T p'^T) for step t0: column
    k = 8 h + 2 t + m is token t0 + 8 t + h + 4 m (the token of row k of the P operand,
    see _pv_b), row 16 mt + 8 r8 + g is channel 16 g + 8 r8 + mt (v_channel), value
    v_scale(mt) * code * 2**-24. Thread (g, t) loads word g (channels 16 g .. 16 g + 15)
    of its 4 tokens and unpacks it in place."""
    r0 = _v_half(words_ptr, rec_word, t0, 0, V_CODES)
    r1 = _v_half(words_ptr, rec_word, t0, 1, V_CODES)
    x = gl.join(gl.join(gl.join(_join_rows(r0, 0, 0), _join_rows(r1, 0, 0)),
                        gl.join(_join_rows(r0, 1, 0), _join_rows(r1, 1, 0))),
                gl.join(gl.join(_join_rows(r0, 0, 1), _join_rows(r1, 0, 1)),
                        gl.join(_join_rows(r0, 1, 1), _join_rows(r1, 1, 1))))
    # [t, g, mt2, mt1, mt0, h, r8, m] -> [mt2, mt1, mt0, r8, g, h, t, m] -> [D, 16]
    x = gl.permute(x, [2, 3, 4, 6, 1, 5, 0, 7])
    return gl.convert_layout(gl.reshape(x, [D, 16]), A_OP)


@gluon.jit
def _top(x, LAYOUT: gl.constexpr):
    """Rows 0 .. 7 of an MMA accumulator [16, N] (registers only)."""
    y = gl.permute(gl.reshape(x, [2, HALF, x.shape[1]]), [1, 2, 0])
    top, _ = gl.split(y)
    return gl.convert_layout(top, LAYOUT, assert_trivial=True)


@gluon.jit
def _top_vec(v, LAYOUT: gl.constexpr):
    """Elements 0 .. 7 of a per-row vector [16]."""
    top, _ = gl.split(gl.permute(gl.reshape(v, [2, HALF]), [1, 0]))
    return gl.convert_layout(top, LAYOUT)


@gluon.jit
def _padded(x):
    """[8, 8] rows -> [16, 8] with 8 zero rows below."""
    y = gl.permute(gl.join(x, gl.zeros_like(x)), [2, 0, 1])
    return gl.reshape(y, [ROWS, 8])


@gluon.jit
def _hadamard(x, LOG_D: gl.constexpr):
    """Unnormalized Walsh-Hadamard transform of each row of x [8, D] (float32), the
    butterflies of reference.fwht (stage s pairs i with i + 2**s)."""
    for s in gl.static_range(LOG_D):
        y = gl.reshape(x, [HALF, D >> (s + 1), 2, 1 << s])
        a, b = gl.split(gl.permute(y, [0, 1, 3, 2]))
        x = gl.reshape(gl.permute(gl.join(a + b, a - b), [0, 1, 3, 2]), [HALF, D])
    return x


@gluon.jit
def _q_operand(q_top, a_k):
    """A operand [16, D]: fp16(q * a_K) in rows 0 .. 7, zeros below."""
    qp = (q_top * a_k[None, :]).to(gl.float16)
    y = gl.reshape(gl.permute(gl.join(qp, gl.zeros_like(qp)), [2, 0, 1]), [ROWS, D])
    return gl.convert_layout(y, A_OP)


@gluon.jit
def _pv_b(p_even, p_odd):
    """B operand [16, 8] (P^T) of a PV step from the fp16 weights [8 rows, 8] of two K
    column blocks (i = 2 s, 2 s + 1): row k is column k % 8 of block k // 8. The
    accumulator layout of a block already holds what a B register needs."""
    x = gl.permute(gl.join(p_even, p_odd), [2, 1, 0])  # [block, column, row]
    return gl.convert_layout(gl.reshape(x, [16, HALF]), B_OP)


@gluon.jit
def _scores(qp, coef_a, coef_a16, coef_b, codes16_ptr, halves_ptr, rec_half, c0,
            K_CODES: gl.constexpr, TAU_K: gl.constexpr):
    """Scores [8, 8] (base 2, scaled) of the 4 column blocks of tokens c0 .. c0 + 31:
    block i column n is token c0 + 4 n + i."""
    u0, u1, u2, u3 = _k_operands(codes16_ptr, rec_half, c0, K_CODES)
    zero = gl.zeros([ROWS, 8], gl.float32, MMA)
    n = gl.arange(0, 8, layout=T_COL)
    tau = halves_ptr + rec_half + TAU_K // 2 + c0 + 4 * n
    s0 = (_top(mma_v2(qp, u0, zero), TOP) * coef_a[:, None] + coef_b[:, None]) \
        * gl.load(tau).to(gl.float32)[None, :]
    s1 = (_top(mma_v2(qp, u1, zero), TOP) * coef_a16[:, None] + coef_b[:, None]) \
        * gl.load(tau + 1).to(gl.float32)[None, :]
    s2 = (_top(mma_v2(qp, u2, zero), TOP) * coef_a[:, None] + coef_b[:, None]) \
        * gl.load(tau + 2).to(gl.float32)[None, :]
    s3 = (_top(mma_v2(qp, u3, zero), TOP) * coef_a16[:, None] + coef_b[:, None]) \
        * gl.load(tau + 3).to(gl.float32)[None, :]
    return s0, s1, s2, s3


@gluon.jit
def _max4(a, b, c, d):
    return gl.maximum(gl.maximum(a, b), gl.maximum(c, d))


@gluon.jit
def _probs(s, m_new, halves_ptr, rec_half, tok0, A_V: gl.constexpr, Z_V: gl.constexpr):
    """p = exp2(s - max) of one column block (column n: token tok0 + 4 n), p * a_V as the
    fp16 MMA operand, p * z_V."""
    n = gl.arange(0, 8, layout=T_COL)
    p = gl.exp2(s - m_new[:, None])
    a_v = gl.load(halves_ptr + rec_half + A_V // 2 + tok0 + 4 * n).to(gl.float32)
    z_v = gl.load(halves_ptr + rec_half + Z_V // 2 + tok0 + 4 * n).to(gl.float32)
    pp = (p * a_v[None, :]).to(gl.float16)
    return p, pp, p * z_v[None, :]


@gluon.jit
def _chunk_pv(o_rec, l_acc, pz_sum, s0, s1, s2, s3, m_new, words_ptr, halves_ptr,
              rec_word, rec_half, c0, V_CODES: gl.constexpr, A_V: gl.constexpr,
              Z_V: gl.constexpr):
    """Softmax weights of tokens c0 .. c0 + 31 and their PV dots into o_rec."""
    p0, pp0, z0 = _probs(s0, m_new, halves_ptr, rec_half, c0, A_V, Z_V)
    p1, pp1, z1 = _probs(s1, m_new, halves_ptr, rec_half, c0 + 1, A_V, Z_V)
    p2, pp2, z2 = _probs(s2, m_new, halves_ptr, rec_half, c0 + 2, A_V, Z_V)
    p3, pp3, z3 = _probs(s3, m_new, halves_ptr, rec_half, c0 + 3, A_V, Z_V)
    l_acc = l_acc + ((p0 + p1) + (p2 + p3))
    pz_sum = pz_sum + ((z0 + z1) + (z2 + z3))
    o_rec = mma_v2(_v_operand(words_ptr, rec_word, c0, V_CODES), _pv_b(pp0, pp1), o_rec)
    o_rec = mma_v2(_v_operand(words_ptr, rec_word, c0 + 2, V_CODES), _pv_b(pp2, pp3), o_rec)
    return o_rec, l_acc, pz_sum


# One compiled variant per model, whatever the batch (see triton_attention._RUNTIME_INTS).
@gluon.jit(do_not_specialize=["splits", "part_splits", "bt_stride_b"],
           do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr"])
def _record_kernel(
    q_ptr, part_o_ptr, part_ml_ptr, words_ptr, codes16_ptr, halves_ptr, block_tables_ptr,
    seq_lens_ptr, block_to_slot_ptr, qk_scale, splits, part_splits, q_stride_b, q_stride_h,
    page_stride_block, page_stride_head, bt_stride_b, GROUP: gl.constexpr,
    K_CODES: gl.constexpr, A_K: gl.constexpr, Z_K: gl.constexpr, TAU_K: gl.constexpr,
    V_CODES: gl.constexpr, SIGMA_V: gl.constexpr, A_V: gl.constexpr, Z_V: gl.constexpr,
):
    """One warp: the records of split program_id(2) of sequence program_id(0), KV head
    program_id(1), for its GROUP query heads of q [B, 1, Hq, D] (rotated here and scaled
    by qk_scale = softmax scale * log2 e / sqrt(D): base-2 scores)."""
    b = gl.program_id(0)
    h = gl.program_id(1)
    split = gl.program_id(2)
    hk = gl.num_programs(1)

    r = gl.arange(0, HALF, layout=gl.SliceLayout(1, Q_LOAD))
    dq = gl.arange(0, D, layout=gl.SliceLayout(0, Q_LOAD))
    q = gl.load(q_ptr + b.to(gl.int64) * q_stride_b + (h * GROUP + r[:, None]) * q_stride_h
                + dq[None, :], mask=(r < GROUP)[:, None], other=0.0)
    q = gl.convert_layout(_hadamard(q.to(gl.float32), LOG_D) * qk_scale, A_TOP)
    d = gl.arange(0, D, layout=gl.SliceLayout(0, A_TOP))
    q_norm = gl.maximum(gl.max(gl.abs(q), 1), 1e-30)
    q_unit = q / q_norm[:, None]  # |q_unit| <= 1: q_unit * a_K fits fp16
    qn = gl.convert_layout(q_norm, T_ROW)

    n_blocks = gl.cdiv(gl.load(seq_lens_ptr + b), G)
    per = gl.cdiv(n_blocks, splits)
    lo = split * per
    hi = gl.minimum(lo + per, n_blocks)

    # Output row n (transposed: [D, 8]): its channel and the 1 / f of its codes.
    n = gl.arange(0, D, layout=O_ROW)
    mt = n // 16
    chan = 16 * (n % 8) + 8 * ((n // 8) % 2) + mt
    e = gl.where(mt < 5, mt, mt - 5)
    inv_f = UNIT / (1 << (2 * e)).to(gl.float32)

    m_i = gl.full([HALF], MASKED, gl.float32, T_ROW)
    l_acc = gl.zeros([HALF, 8], gl.float32, TOP)
    o = gl.zeros([D, HALF], gl.float32, MMA)
    bt_row = block_tables_ptr + b.to(gl.int64) * bt_stride_b
    for blk_i in range(lo, hi):
        blk = gl.load(bt_row + blk_i).to(gl.int64)
        if gl.load(block_to_slot_ptr + blk) < 0:  # (pool blocks: the POOL_ONLY launch)
            rec = blk * page_stride_block + h * page_stride_head
            rec_half = rec // 2
            rec_word = rec // 4
            a_k = gl.load(halves_ptr + rec_half + A_K // 2 + d).to(gl.float32)
            z_k = gl.load(halves_ptr + rec_half + Z_K // 2 + d).to(gl.float32)
            qp = _q_operand(q_unit, a_k)
            zq = gl.convert_layout(gl.sum(q_unit * z_k[None, :], 1), T_ROW)
            coef_a = qn * UNIT
            coef_a16 = qn * (UNIT / 16)
            coef_b = qn * zq

            s00, s01, s02, s03 = _scores(qp, coef_a, coef_a16, coef_b, codes16_ptr,
                                         halves_ptr, rec_half, 0, K_CODES, TAU_K)
            s10, s11, s12, s13 = _scores(qp, coef_a, coef_a16, coef_b, codes16_ptr,
                                         halves_ptr, rec_half, 32, K_CODES, TAU_K)
            s20, s21, s22, s23 = _scores(qp, coef_a, coef_a16, coef_b, codes16_ptr,
                                         halves_ptr, rec_half, 64, K_CODES, TAU_K)
            s30, s31, s32, s33 = _scores(qp, coef_a, coef_a16, coef_b, codes16_ptr,
                                         halves_ptr, rec_half, 96, K_CODES, TAU_K)
            mx = gl.maximum(gl.maximum(_max4(s00, s01, s02, s03), _max4(s10, s11, s12, s13)),
                            gl.maximum(_max4(s20, s21, s22, s23), _max4(s30, s31, s32, s33)))
            m_new = gl.maximum(m_i, gl.max(mx, 1))
            alpha = gl.exp2(m_i - m_new)
            m_i = m_new
            l_acc = l_acc * alpha[:, None]

            o_rec = gl.zeros([D, HALF], gl.float32, MMA)
            pz_sum = gl.zeros([HALF, 8], gl.float32, TOP)
            o_rec, l_acc, pz_sum = _chunk_pv(
                o_rec, l_acc, pz_sum, s00, s01, s02, s03, m_new, words_ptr, halves_ptr,
                rec_word, rec_half, 0, V_CODES, A_V, Z_V)
            o_rec, l_acc, pz_sum = _chunk_pv(
                o_rec, l_acc, pz_sum, s10, s11, s12, s13, m_new, words_ptr, halves_ptr,
                rec_word, rec_half, 32, V_CODES, A_V, Z_V)
            o_rec, l_acc, pz_sum = _chunk_pv(
                o_rec, l_acc, pz_sum, s20, s21, s22, s23, m_new, words_ptr, halves_ptr,
                rec_word, rec_half, 64, V_CODES, A_V, Z_V)
            o_rec, l_acc, pz_sum = _chunk_pv(
                o_rec, l_acc, pz_sum, s30, s31, s32, s33, m_new, words_ptr, halves_ptr,
                rec_word, rec_half, 96, V_CODES, A_V, Z_V)
            sigma = gl.load(halves_ptr + rec_half + SIGMA_V // 2 + chan).to(gl.float32)
            pz_q = gl.convert_layout(gl.sum(pz_sum, 1), O_COL)
            a_q = gl.convert_layout(alpha, O_COL)
            o = o * a_q[None, :] + sigma[:, None] * (o_rec * inv_f[:, None] + pz_q[None, :])

    rq = gl.arange(0, HALF, layout=O_COL)
    part = (b * hk + h) * part_splits + split
    gl.store(part_o_ptr + (part * ROWS + rq[None, :]) * D + chan[:, None], o)
    rt = gl.arange(0, HALF, layout=T_ROW)
    gl.store(part_ml_ptr + part * 2 * ROWS + rt, m_i)
    gl.store(part_ml_ptr + part * 2 * ROWS + ROWS + rt, gl.sum(l_acc, 1))


def unsupported(q: Tensor, cache: KVarNCache) -> str | None:
    """What `attention` would need changed to take this call, or None if it takes it."""
    b, sq, hq, d = q.shape
    hk = cache.num_kv_heads
    preset = layout(cache.preset, d).preset
    if sq != 1:
        return f"decode queries (one token per sequence), got q {list(q.shape)}"
    if d != D.value:
        return f"head_dim {D.value}, got {d}"
    if cache.tile != G.value:
        return f"{G.value}-token tiles, got {cache.preset}"
    if preset.k_bits != 4 or preset.v_bits != 2:
        return f"k4v2 presets, got {cache.preset}"
    if hq % hk or hq // hk > HALF.value:
        return f"GQA groups <= {HALF.value} query heads per KV head, got {hq} / {hk}"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) < (8, 0):
        return f"CUDA tensors on an sm_80+ GPU (Gluon has no interpreter), got {q.device}"
    return None


def applies(q: Tensor, cache: KVarNCache) -> bool:
    """Whether a decode call should take this kernel rather than triton_attention's: one
    it takes, with at least MIN_KV_SEQUENCES (sequence, KV head) pairs; below that the
    one-warp programs leave the GPU too empty to win."""
    return (q.shape[0] * cache.num_kv_heads >= MIN_KV_SEQUENCES
            and unsupported(q, cache) is None)


def attention(q: Tensor, cache: KVarNCache, block_tables: Tensor, seq_lens: Tensor,
              softmax_scale: float | None = None, splits: int | None = None,
              max_registers: int | None = None) -> Tensor:
    """Decode attention, q [B, 1, Hq, D] -> [B, 1, Hq, D]: the quantized blocks with this
    module's kernel, the pool blocks (sink, tail) with triton_attention's, one merge.
    `splits`: of the quantized blocks (default: about PROGRAMS_PER_SM programs per SM)."""
    b, _, hq, d = q.shape
    hk = cache.num_kv_heads
    why = unsupported(q, cache)
    if why:
        raise ValueError(f"the Gluon kernel takes {why}; triton_attention.attention takes "
                         "every cache")
    lay = layout(cache.preset, d)
    group = hq // hk
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    if q.stride(3) != 1:
        q = q.contiguous()
    max_blocks = block_tables.shape[1]
    if splits is None:
        sms = triton_attention._num_sms(q.device)
        splits = max(1, min(PROGRAMS_PER_SM * sms // (b * hk), max_blocks, MAX_SPLITS))
    shape = (b, hk, 1, splits + 1)  # the last split: the pool blocks
    part_o = torch.empty(shape + (ROWS, d), dtype=torch.float32, device=q.device)
    part_ml = torch.empty(shape + (2, ROWS), dtype=torch.float32, device=q.device)
    _record_kernel[(b, hk, splits)](
        q, part_o, part_ml, cache.pages.view(torch.int32), cache.pages.view(torch.int16),
        cache.pages.view(torch.float16), block_tables, seq_lens, cache.block_to_slot,
        float(scale * LOG2E / math.sqrt(d)), splits, splits + 1, q.stride(0), q.stride(2),
        cache.pages.stride(0), cache.pages.stride(1), block_tables.stride(0), GROUP=group,
        K_CODES=lay.k_codes.offset, A_K=lay.a_k.offset, Z_K=lay.z_k.offset,
        TAU_K=lay.tau_k.offset, V_CODES=lay.v_codes.offset, SIGMA_V=lay.sigma_v.offset,
        A_V=lay.a_v.offset, Z_V=lay.z_v.offset, num_warps=NUM_WARPS,
        **({} if max_registers is None else {"maxnreg": max_registers}))
    triton_attention.attention(q, cache, block_tables, seq_lens, softmax_scale=softmax_scale,
                               splits=1, rows=ROWS, pool_partials=(part_o, part_ml, splits))
    out = torch.empty_like(q)
    triton_attention.merge(part_o, part_ml, out, 1, group)
    return out
