"""Gluon kernel: decode attention over the quantized records of a paged KVarN cache, with
the codes loaded straight into the tensor-core operand registers (`mma.sync`) and the
records brought into shared memory by TMA.

Scope: k4v2 presets with 128-token tiles, head_dim 128, decode (one query token), GQA
groups of up to 8 query heads, sm_90+ GPUs (Hopper's TMA; Gluon has no interpreter). The
pool blocks (sink, tail) go through `triton_attention`'s kernel in its POOL_ONLY mode, into
the same partials; `applies` says when `attention` here is the faster choice.

Why Gluon. Triton's block language chooses the register layouts of a dot's operands, so
the unpacked codes of the Triton kernel take a round trip through shared memory on their
way into the MMA, and the softmax's reductions cross warps. Here every layout is written
out: a program is one warp; each thread reads exactly the code bits its MMA fragments
need (K halfword pairs by ldmatrix, 32-bit V words), one `and` per fragment register masks
a pair of codes into the mantissas of two fp16 subnormals, and the warp's softmax state
never leaves it.

Pipeline. One warp has few instructions in flight, so a record's global loads would stall
it (in Nsight Compute, a third of the previous, load-as-you-go kernel's stalls were on
them). Instead the Tensor Memory Accelerator copies record i + 1 into shared memory while
the warp computes record i: two stages of 13.5 KB, 8 programs per SM. TMA rather than the
warp's own cp.async pieces: on an H100 at 16 x 32K, 174.6 us instead of 237.6 (0.245x of
FA3 fp16 instead of 0.335x), and per-lane pieces in the orders the reads want streamed at
2.2 TB/s alone, TMA boxes at 3.0 (results/gluon_tma_h100.txt, record_copies_h100.txt).

The dots, per 128-token record and 8 query rows (a GQA group, zero-padded to the N of
m16n8k16), both transposed so that the codes are the A operand (M = 16 tokens or channels)
and the query rows the narrow N:

    s[t, r]  = tau_K[t] * (sum_d c_K[t, d] * q'[r, d] + sum_d q[r, d] * z_K[d])
    pv[d, r] = sigma_V[d] * (sum_t c_V[t, d] * p'[r, t] + sum_t p[r, t] * z_V[t])

with q' = q * a_K and p' = p * a_V rounded to fp16 (q is scaled into [-1, 1] first, so
q' cannot overflow). A code c masked at bit position b enters the dot as the subnormal
2**b * c * 2**-24, exact in fp16 and in the MMA's fp32 accumulation; the 2**(24 - b) comes
back out of the per-token (K) or per-channel (V) coefficients. An A fragment of the K
codes holds channel pairs of a token, as the B fragments that ldmatrix fills do: two of
those are one A operand. P^T's B fragments need token pairs of a query row where the S
accumulators hold row pairs of a token: `movmatrix` transposes them in registers (the
query as the M side instead left half of the QK MMAs computing zero rows).

Operand orders. The reduction index of a dot and its output columns may be permuted
freely if both operands agree: the K codes' tokens and the V codes' channels are taken
in the order the fragment registers receive them from their reads (documented at each
read below), and the output channels are put back in order at the partial store.

Output: split-KV partials in `triton_attention`'s format ([B, Hk, 1, splits + POOL_SPLITS,
16, D] unnormalized accumulators, base-2 max and sum per row; the last splits are the
pool's), merged, normalized and rotated back by `triton_attention._merge_kernel`.

Two streams. The record kernel runs on a side stream while the pool launch runs on the
caller's; the merge waits for both. The record programs fill about half of the SMs'
registers at the split counts of wide batches, and the pool launch's programs take the
rest: on an H200 (32/8 heads, bf16), 64 x 1152 tokens 71.4 us one launch after the other
(the pool launch merging the record splits) -> 56.8 us, 32 x 1152 51.8 -> 45.8, 128 x 4K
244.9 -> 229.4, 16 x 32K 219.9 -> 211.8 (results/decode_two_streams_h200.txt). Inside a
CUDA graph capture the fork and join become parallel branches of the graph.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from kvarn.format import Layout, layout
from kvarn_torch import triton_attention
from kvarn_torch.cache import KVarNCache

ROWS = gl.constexpr(16)  # query rows per program: the M of mma.sync m16n8k16
D = gl.constexpr(128)
G = gl.constexpr(128)
NUM_WARPS = 1  # a program is one warp: its softmax state never leaves it
# Record and pool programs together, per SM: the record kernel's are resident 8 at once
# (8 x 27 KB of shared memory; 192 registers would allow 10). At 16 x 32K on an H100, 7
# and 8 record splits took 174.1 us, 6 175.9, 10-16 183-212 (results/gluon_tma_h100.txt).
PROGRAMS_PER_SM = 8
# From this many (sequence, KV head) pairs on, decode takes this kernel. On an H200 (32/8
# heads, fp16; results/gluon_threshold_h200.txt): at 40-64 pairs 0.76-0.87x of the
# Triton kernel's time at 4K tokens, 0.42-0.57x at 16K-32K, 0.99-1.14x at 1K; at 32
# pairs 1.08x at 4K and 1.21x at 1K (0.50-0.64x at 16K-32K).
MIN_KV_SEQUENCES = 40
MAX_SPLITS = 64  # 1 x 32K on an H200: 50 us at 32 splits, 42 us at 64
# The pool launch's programs per sequence and KV head. Splitting the sink from the tail
# (2) took 35.8 us instead of 30.3 at 64 x 1152 tokens, 32/8 heads, on an H200: a second
# wave of programs (two fit an SM) and the query rotation of each.
POOL_SPLITS = 1
# From this many (sequence, KV head) programs on, the pool launch runs 2-warp programs over
# 64-token tiles: its 4-warp programs over whole blocks need 255 registers, two fit an SM,
# and 512 of them took a second wave. On an H200 (32/8 heads, bf16): 64 x 1152 tokens 77.1
# us instead of 80.6, 128 x 1152 123.0 instead of 130.2, 128 x 4K 252.9 instead of 261.5;
# below it the 4-warp programs win (32 x 1152: 51.8 us, 2 warps 54.3; 16 x 32K: 219.1, 227.5).
NARROW_POOL_MIN_PROGRAMS = 512
# Its loads pipelined by Triton (num_stages 2): 64 x 1152 24.3 us instead of 26.2 unpipelined
# (26.7 with the while loop of f2df9c5), 128 x 4K 45.5 instead of 47.8; the 4-warp launch
# gains nothing from it (results/decode_pool_launch_h200.txt).
NARROW_POOL = dict(block_n=64, num_warps=2, num_stages=2)
MASKED = triton_attention.MASKED
LOG2E = triton_attention.LOG2E
UNIT = gl.constexpr(2.0**24)  # a code c masked into an fp16 mantissa is c * 2**-24

MMA = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
A_OP = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
B_OP = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)

# A record arrives in shared memory as 6 TMA boxes (one thread issues them; an mbarrier
# counts their bytes). Every field of the record starts on a 128-byte line (RECORD_LINES),
# so the boxes take the fields whole:
#   K codes: one box [64 lines, 64 halfwords] and V codes one box [32 lines, 64] under the
#     128-byte swizzle, which spreads ldmatrix's 16-byte channel rows of a K chunk and each
#     read of V_READ over the 32 banks (K_VIEW, V_VIEW);
#   a_K with z_K, a_V with z_V, tau_K, sigma_V: 4 small boxes of whole lines, unswizzled.
# (K as 4 boxes of a chunk each, [D, 8] halfwords with 16-byte rows, needs no swizzle, but
# on an H100 records stream 14% slower so: 173 us for 16 x 32K instead of 149;
# results/record_copies_h100.txt.)
STAGES = gl.constexpr(2)
LINE = gl.constexpr(128)  # bytes


def _record_lines(lay: Layout) -> tuple[int, ...]:
    """Where the boxes start in a record (in lines): K codes, a_K (z_K follows), tau_K, V
    codes, sigma_V, a_V (z_V follows), and the record's length; ValueError for a layout
    whose fields the boxes would not take whole."""
    d, g = D.value, G.value
    sizes = ((lay.k_codes, d * g // 2), (lay.a_k, 2 * d), (lay.z_k, 2 * d), (lay.tau_k, 2 * g),
             (lay.v_codes, d * g // 4), (lay.sigma_v, 2 * d), (lay.a_v, 2 * g), (lay.z_v, 2 * g))
    fields = (lay.k_codes, lay.a_k, lay.tau_k, lay.v_codes, lay.sigma_v, lay.a_v)
    whole = (all(f.nbytes == n for f, n in sizes)
             and lay.z_k.offset == lay.a_k.offset + lay.a_k.nbytes
             and lay.z_v.offset == lay.a_v.offset + lay.a_v.nbytes
             and all(f.offset % LINE.value == 0 for f in fields)
             and lay.record_bytes % LINE.value == 0)
    if not whole:
        raise ValueError(f"the Gluon kernel's TMA boxes take the k4v2_g128 record layout of "
                         f"D = {D.value}; got {lay}")
    return tuple(f.offset // LINE.value for f in fields) + (lay.record_bytes // LINE.value,)


RECORD_BOXES = _record_lines(layout("kvarn_k4v2_g128", 128))
(K_LINE, AK_LINE, TAU_LINE, V_LINE, SIGMA_LINE, AV_LINE, RECORD_LINES) = map(
    gl.constexpr, RECORD_BOXES)
# TMA destinations: unswizzled, or swizzled over 128-byte lines.
PLAIN = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
SWIZZLED = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
# The boxes of _record_kernel's descriptors, in its argument order (k_desc, v_desc,
# coef_desc, line_desc): [lines, 64 halfwords] and their shared layouts.
BOXES = ((64, SWIZZLED), (32, SWIZZLED), (4, PLAIN), (2, PLAIN))


def _shared_view(shape: tuple[int, ...], address) -> gl.SharedLinearLayout:
    """The shared layout that puts element `index` of a view of `shape` at offset
    address(index) (in elements): a bijection, linear over XOR, as swizzles are."""
    where = {address(i): i for i in itertools.product(*map(range, shape))}
    bits = math.prod(shape).bit_length() - 1
    if sorted(where) != list(range(1 << bits)):
        raise ValueError(f"not a bijection onto the {math.prod(shape)} offsets")
    bases = [where[1 << k] for k in range(bits)]
    for offset, index in where.items():
        got = [0] * len(shape)
        for k in range(bits):
            if offset >> k & 1:
                got = [a ^ c for a, c in zip(got, bases[k])]
        if tuple(got) != index:
            raise ValueError("not linear over XOR")
    return gl.SharedLinearLayout(offset_bases=[list(b) for b in bases])


def _swizzle128(word: int) -> int:
    """A 32-bit word's place in a buffer under the 128-byte swizzle: its 16-byte piece
    within the line XOR the line's index mod 8."""
    return word ^ (((word >> 5) & 7) << 2)


def _k_address(index: tuple[int, int]) -> int:
    ch, hw = index  # halfword hw of channel ch's row (two rows a line)
    return 2 * _swizzle128((ch * 32 + hw) // 2) + hw % 2


def _v_address(index: tuple[int, int]) -> int:
    r, col = index  # word col % 8 of token r + 8 (col // 8) of a chunk, as V_READ reads it
    return _swizzle128((r + 8 * (col // 8)) * (D.value // 16) + col % 8)


def _sigma_address(index: tuple[int]) -> int:
    n, = index  # output row n of the PV accumulator: channel `chan` of _record_kernel
    return 16 * (n % 8) + 8 * (n // 8 % 2) + n // 16


# The K codes of a stage as halfwords [D, 32] (channel rows, chunk c in columns 8 c ..).
K_VIEW = _shared_view((128, 32), _k_address)
# The V codes of a 32-token chunk as words [4 m + 2 a + H, 8 t + g] (see V_READ). The
# chunks follow each other 1 KB apart: a stage is [4 chunks, 8, 32] (the swizzle stays
# within a chunk).
V_VIEW = _shared_view((8, 32), _v_address)
# sigma_V as fp16 [D] in the order of the PV accumulator's rows; tau_K and sigma_V are
# [2, D] (tau_K first).
SIGMA_VIEW = _shared_view((128,), _sigma_address)
# Row-major, unswizzled: the coefficient boxes as [2 fields, rows, 4] (4 channels or tokens
# a row; Gluon indexes the first dimension away).
SMEM = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
# A chunk's V words as read [4 m + 2 a + H, 8 t + g]: thread (g, t) holds its 8 words.
V_READ = gl.DistributedLinearLayout(
    reg_bases=[[1, 0], [2, 0], [4, 0]], lane_bases=[[0, 8], [0, 16], [0, 1], [0, 2], [0, 4]],
    warp_bases=[], block_bases=[], shape=[8, 32])
# Per-token coefficients of a chunk [8 n, 4 i] (token 4 n + i): thread (g, t) holds quad g,
# the tokens of rows g and g + 8 of a score tile (_scores).
C_READ = gl.DistributedLinearLayout(
    reg_bases=[[0, 1], [0, 2]], lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
    warp_bases=[], block_bases=[], shape=[8, 4])
# Per-channel coefficients [32, 4] (channel 4 row + i) as SliceLayout(0, Q_ROWS) holds them.
D_READ = gl.DistributedLinearLayout(
    reg_bases=[[0, 1], [2, 0], [4, 0], [8, 0], [16, 0]],
    lane_bases=[[0, 2], [1, 0], [0, 0], [0, 0], [0, 0]],
    warp_bases=[], block_bases=[], shape=[32, 4])
# V code words of half a 16-token PV step as [4 token pairs, 8 words, 2 tokens of the pair]:
# thread (g, t) holds pair t, word g (the 16 channels 16 g .. 16 g + 15 of a token).
V_WORDS = gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 1]],
    lane_bases=[[1, 0, 0], [2, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
    warp_bases=[], block_bases=[], shape=[4, 8, 2])
# The query rows as loaded: a whole row per thread (lanes past the 8 rows repeat them), so
# the butterflies of its rotation stay within a thread.
Q_LOAD = gl.BlockedLayout(size_per_thread=[1, 128], threads_per_warp=[32, 1],
                          warps_per_cta=[1, 1], order=[1, 0])
LOG_D = gl.constexpr(7)
# The query rows [8, D] (float32) as the B operand [D, 8] of the QK dot holds them
# transposed: thread (g, t) has row g.
Q_ROWS = gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 8], [0, 16], [0, 32], [0, 64]],
                                   lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
                                   warp_bases=[], block_bases=[], shape=[8, 128])
# The accumulators of both dots are transposed, [tokens, 8] and [D, 8]: their rows are
# tokens or channels, their columns the query rows.
ROW = gl.SliceLayout(1, MMA)
COL = gl.SliceLayout(0, MMA)
# Triton reads module globals only as constexprs.
(MMA, A_OP, B_OP, V_WORDS, Q_ROWS, Q_LOAD, ROW, COL, SMEM, PLAIN, SWIZZLED, K_VIEW, V_VIEW,
 SIGMA_VIEW, V_READ, C_READ, D_READ) = map(
    gl.constexpr, (MMA, A_OP, B_OP, V_WORDS, Q_ROWS, Q_LOAD, ROW, COL, SMEM, PLAIN,
                   SWIZZLED, K_VIEW, V_VIEW, SIGMA_VIEW, V_READ, C_READ, D_READ))
HALF = gl.constexpr(8)  # real query rows per program


def _nibbles_asm() -> str:
    """A register of two K code halfwords (channels 2 t, 2 t + 1 of a token quad, as
    ldmatrix delivers them) -> the 4 fp16 pairs of its tokens i = 0 .. 3: the subnormal
    c * 2**-24 (i even) or 16 c * 2**-24 (i odd)."""
    masks = ("0x000F000F", "0x00F000F0")
    out = [f"and.b32 ${i}, {'$4' if i < 2 else 'w8'}, {masks[i % 2]};" for i in range(4)]
    return "{ .reg .b32 w8; shr.b32 w8, $4, 8; " + " ".join(out) + " }"


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
def _stage_buffers():
    """The shared buffers of the STAGES stages _copy_record fills, and their barriers."""
    ks = gl.allocate_shared_memory(gl.int16, [STAGES, 64, 64], SWIZZLED)
    vs = gl.allocate_shared_memory(gl.int16, [STAGES, 32, 64], SWIZZLED)
    cs = gl.allocate_shared_memory(gl.int16, [STAGES, 8, 64], PLAIN)  # a_K z_K, a_V z_V
    ds = gl.allocate_shared_memory(gl.int16, [STAGES, 4, 64], PLAIN)  # tau_K, sigma_V
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(bars.index(st), count=1)
    fence_async_shared()
    return ks, vs, cs, ds, bars


@gluon.jit
def _copy_record(k_desc, v_desc, coef_desc, line_desc, ks, vs, cs, ds, bar, stage, rec):
    """Start the TMA copy of record `rec` (block * heads + head) into stage `stage`; `bar`
    completes when its bytes have landed."""
    line = rec * RECORD_LINES
    mbarrier.expect(bar, RECORD_LINES * LINE)
    tma.async_copy_global_to_shared(k_desc, [line + K_LINE, 0], bar, ks.index(stage))
    tma.async_copy_global_to_shared(v_desc, [line + V_LINE, 0], bar, vs.index(stage))
    c_s = cs.index(stage)
    tma.async_copy_global_to_shared(coef_desc, [line + AK_LINE, 0], bar, c_s.slice(0, 4))
    tma.async_copy_global_to_shared(coef_desc, [line + AV_LINE, 0], bar, c_s.slice(4, 4))
    d_s = ds.index(stage)
    tma.async_copy_global_to_shared(line_desc, [line + TAU_LINE, 0], bar, d_s.slice(0, 2))
    tma.async_copy_global_to_shared(line_desc, [line + SIGMA_LINE, 0], bar, d_s.slice(2, 2))


@gluon.jit
def _k_chunks(k_lines):
    """The K codes of a stage as the B operands [D, 8] (halfwords) of its 4 chunks (tokens
    32 c ..: halfwords 8 c .. of each channel's row), read by ldmatrix all at once: the
    swizzle moves a chunk's pieces between lines, so no view of one chunk is a slice."""
    words = k_lines._reinterpret(gl.float16, [D, 32], K_VIEW).load(B_OP)
    x = gl.permute(gl.reshape(words, [D, 2, 2, 8]), [0, 3, 1, 2])  # [channel, g, c // 2, c % 2]
    even, odd = gl.split(x)
    c0, c2 = gl.split(even)
    c1, c3 = gl.split(odd)
    return (gl.convert_layout(c0, B_OP, assert_trivial=True),
            gl.convert_layout(c1, B_OP, assert_trivial=True),
            gl.convert_layout(c2, B_OP, assert_trivial=True),
            gl.convert_layout(c3, B_OP, assert_trivial=True))


@gluon.jit
def _k_operands(words):
    """B operands [D, 8] of the K codes of a 32-token chunk from its halfwords [D, 8] (as
    _k_chunks leaves them): column block i holds token c0 + 4 g + i in column g, value
    f_i * code * 2**-24 with f_i = 1, 16, 1, 16."""
    return gl.inline_asm_elementwise(NIBBLES_ASM, "=r,=r,=r,=r,r", [words],
                                     dtype=(gl.float16,) * 4, is_pure=True, pack=2)


@gluon.jit
def _v_half(words):
    """The 32 fp16 column blocks (block j, token m: r[2 j + m], each [4, 8]) of the V codes
    [4 t, 8 g, 2 m] of one half of a PV step (see _v_operand)."""
    wa, wb = gl.split(gl.convert_layout(words, V_WORDS, assert_trivial=True))
    return gl.inline_asm_elementwise(CRUMBS_ASM, "=h," * 32 + "r,r", [wa, wb],
                                     dtype=(gl.float16,) * 32, is_pure=True, pack=1)


@gluon.jit
def _v_words(v_chunk):
    """A chunk's V code words (shared [8, 32]) as the [4 t, 8 g, 2 m] words of PV steps
    a = 0, 1 and halves H = 0, 1: (a0h0, a0h1, a1h0, a1h1)."""
    x = gl.reshape(v_chunk.load(V_READ), [2, 2, 2, 4, 8])  # [m, a, H, t, g]
    h0, h1 = gl.split(gl.permute(x, [3, 4, 0, 1, 2]))
    a0h0, a1h0 = gl.split(h0)
    a0h1, a1h1 = gl.split(h1)
    return a0h0, a0h1, a1h0, a1h1


@gluon.jit
def _token_coefs(c_chunk):
    """Per-token coefficients of a chunk (shared [8 n, 4 i], token 4 n + i) as the 2 float32
    vectors [16] (ROW) of its score tiles: tile j row m is token 4 (m % 8) + 2 j + m // 8."""
    x = gl.reshape(c_chunk.load(C_READ).to(gl.float32), [HALF, 2, 2])  # [n, i // 2, i % 2]
    t01, t23 = gl.split(gl.permute(x, [2, 0, 1]))  # [i % 2, n] each
    return (gl.convert_layout(gl.reshape(t01, [ROWS]), ROW, assert_trivial=True),
            gl.convert_layout(gl.reshape(t23, [ROWS]), ROW, assert_trivial=True))


@gluon.jit
def _channel_coefs(c_rows):
    """Per-channel coefficients (shared [32, 4]) as float32 [D] in Q_ROWS's columns."""
    x = gl.reshape(c_rows.load(D_READ), [D]).to(gl.float32)
    return gl.convert_layout(x, gl.SliceLayout(0, Q_ROWS), assert_trivial=True)


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
def _v_operand(w_h0, w_h1):
    """A operand [D, 16] of the transposed PV dot (o^T += c_V^T p'^T) for step t0 from the
    words of its two halves (_v_words): column k = 8 h + 2 t + m is token t0 + 8 t + h + 4 m
    (the token of row k of the P operand, see _pv_b), row 16 mt + 8 r8 + g is channel
    16 g + 8 r8 + mt (v_channel), value v_scale(mt) * code * 2**-24. Thread (g, t) holds
    word g (channels 16 g .. 16 g + 15) of its 4 tokens and unpacks it in place."""
    r0 = _v_half(w_h0)
    r1 = _v_half(w_h1)
    x = gl.join(gl.join(gl.join(_join_rows(r0, 0, 0), _join_rows(r1, 0, 0)),
                        gl.join(_join_rows(r0, 1, 0), _join_rows(r1, 1, 0))),
                gl.join(gl.join(_join_rows(r0, 0, 1), _join_rows(r1, 0, 1)),
                        gl.join(_join_rows(r0, 1, 1), _join_rows(r1, 1, 1))))
    # [t, g, mt2, mt1, mt0, h, r8, m] -> [mt2, mt1, mt0, r8, g, h, t, m] -> [D, 16]
    x = gl.permute(x, [2, 3, 4, 6, 1, 5, 0, 7])
    return gl.convert_layout(gl.reshape(x, [D, 16]), A_OP)


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
def _q_operand(q_rows, a_k):
    """B operand [D, 8] of the QK dot: fp16(q * a_K) transposed (registers only)."""
    qp = (q_rows * a_k[None, :]).to(gl.float16)
    return gl.convert_layout(gl.permute(qp, [1, 0]), B_OP, assert_trivial=True)


@gluon.jit
def _k_rows(u_a, u_b):
    """A operand [16, D] of the QK dot from the K codes of two column blocks (B operands
    [D, 8]): row m is column m % 8 of u_a (m < 8) or u_b (registers only)."""
    x = gl.permute(gl.join(u_a, u_b), [2, 1, 0])  # [block, column, channel]
    return gl.convert_layout(gl.reshape(x, [ROWS, D]), A_OP, assert_trivial=True)


@gluon.jit
def _pv_b(pp):
    """B operand [16, 8] (P^T) of a PV step from a tile of fp16 weights [16 tokens, 8 rows]
    in the accumulator layout: movmatrix transposes each 8 x 8 half in registers, so that a
    register holds two tokens of one query row."""
    y = gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r",
                                  [pp], dtype=gl.float16, is_pure=True, pack=2)
    y = gl.permute(gl.reshape(y, [2, HALF, HALF]), [0, 2, 1])  # y[8 b + r, c] = pp[8 b + c, r]
    return gl.convert_layout(gl.reshape(y, [ROWS, HALF]), B_OP, assert_trivial=True)


@gluon.jit
def _scores(q_t, ca, cb, k_words, tau_chunk):
    """Scores (base 2, scaled) of a 32-token chunk as two tiles [16 tokens, 8 query rows]:
    tile j row m is token c0 + 4 (m % 8) + 2 j + m // 8. ca [16, 8] carries the 1 / f of
    the codes' bit positions (rows m >= 8: odd tokens, 16 x), cb [8] the z_K term."""
    u0, u1, u2, u3 = _k_operands(k_words)
    t01, t23 = _token_coefs(tau_chunk)
    zero = gl.zeros([ROWS, HALF], gl.float32, MMA)
    s01 = (mma_v2(_k_rows(u0, u1), q_t, zero) * ca + cb[None, :]) * t01[:, None]
    s23 = (mma_v2(_k_rows(u2, u3), q_t, zero) * ca + cb[None, :]) * t23[:, None]
    return s01, s23


@gluon.jit
def _max4(a, b, c, d):
    return gl.maximum(gl.maximum(a, b), gl.maximum(c, d))


@gluon.jit
def _probs(s, m_new, a_v, z_v):
    """p = exp2(s - max) of a score tile, p * a_V as the fp16 MMA operand, p * z_V."""
    p = gl.exp2(s - m_new[None, :])
    return p, (p * a_v[:, None]).to(gl.float16), p * z_v[:, None]


@gluon.jit
def _chunk_pv(o_rec, l_acc, pz_sum, s01, s23, m_new, v_chunk, av_chunk, zv_chunk):
    """Softmax weights of a 32-token chunk and their PV dots into o_rec."""
    av01, av23 = _token_coefs(av_chunk)
    zv01, zv23 = _token_coefs(zv_chunk)
    p01, pp01, z01 = _probs(s01, m_new, av01, zv01)
    p23, pp23, z23 = _probs(s23, m_new, av23, zv23)
    l_acc = l_acc + (p01 + p23)
    pz_sum = pz_sum + (z01 + z23)
    a0h0, a0h1, a1h0, a1h1 = _v_words(v_chunk)
    o_rec = mma_v2(_v_operand(a0h0, a0h1), _pv_b(pp01), o_rec)  # tokens c0 + (0, 1) mod 4
    o_rec = mma_v2(_v_operand(a1h0, a1h1), _pv_b(pp23), o_rec)  # tokens c0 + (2, 3) mod 4
    return o_rec, l_acc, pz_sum


# One compiled variant per model, whatever the batch (see triton_attention._RUNTIME_INTS).
@gluon.jit(do_not_specialize=["splits", "part_splits", "bt_stride_b"],
           do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr"])
def _record_kernel(
    q_ptr, part_o_ptr, part_ml_ptr, k_desc, v_desc, coef_desc, line_desc, block_tables_ptr,
    seq_lens_ptr, block_to_slot_ptr, qk_scale, splits, part_splits, q_stride_b, q_stride_h,
    bt_stride_b, GROUP: gl.constexpr,
):
    """One warp: the records of split program_id(2) of sequence program_id(0), KV head
    program_id(1), for its GROUP query heads of q [B, 1, Hq, D] (rotated here and scaled
    by qk_scale = softmax scale * log2 e / sqrt(D): base-2 scores). The descriptors
    (`descriptors`) view the pages as 128-byte lines."""
    b = gl.program_id(0)
    h = gl.program_id(1)
    split = gl.program_id(2)
    hk = gl.num_programs(1)

    n_blocks = gl.cdiv(gl.load(seq_lens_ptr + b), G)
    per = gl.cdiv(n_blocks, splits)
    lo = split * per
    hi = gl.minimum(lo + per, n_blocks)

    # Output row n (transposed: [D, 8]): its channel and the 1 / f of its codes.
    n = gl.arange(0, D, layout=ROW)
    mt = n // 16
    chan = 16 * (n % 8) + 8 * ((n // 8) % 2) + mt
    e = gl.where(mt < 5, mt, mt - 5)
    inv_f = UNIT / (1 << (2 * e)).to(gl.float32)

    m_i = gl.full([HALF], MASKED, gl.float32, COL)
    l_acc = gl.zeros([ROWS, HALF], gl.float32, MMA)
    o = gl.zeros([D, HALF], gl.float32, MMA)
    bt_row = block_tables_ptr + b.to(gl.int64) * bt_stride_b
    ks, vs, cs, ds, bars = _stage_buffers()
    # Software pipeline: record i + 1 is copied while record i is computed, unless its
    # block is in the pool; pool slots are read one record ahead of the copies, block ids
    # two (clamped to the split's last). The records copied are taken in order: the n-th
    # lands in stage n % STAGES, at its barrier's phase n // STAGES.
    has = lo < hi
    blk = gl.load(bt_row + lo, mask=has, other=0)
    blk_next = gl.load(bt_row + gl.minimum(lo + 1, hi - 1), mask=has, other=0)
    blk_after = gl.load(bt_row + gl.minimum(lo + 2, hi - 1), mask=has, other=0)
    slot = gl.load(block_to_slot_ptr + blk, mask=has, other=0)
    slot_next = gl.load(block_to_slot_ptr + blk_next, mask=has, other=0)
    copied = 0
    used = 0
    if has & (slot < 0):
        _copy_record(k_desc, v_desc, coef_desc, line_desc, ks, vs, cs, ds, bars.index(0), 0,
                     blk * hk + h)
        copied = 1

    # The query, rotated while the first record is on its way.
    r = gl.arange(0, HALF, layout=gl.SliceLayout(1, Q_LOAD))
    dq = gl.arange(0, D, layout=gl.SliceLayout(0, Q_LOAD))
    q = gl.load(q_ptr + b.to(gl.int64) * q_stride_b + (h * GROUP + r[:, None]) * q_stride_h
                + dq[None, :], mask=(r < GROUP)[:, None], other=0.0)
    q = gl.convert_layout(_hadamard(q.to(gl.float32), LOG_D) * qk_scale, Q_ROWS)
    q_norm = gl.maximum(gl.max(gl.abs(q), 1), 1e-30)
    q_unit = q / q_norm[:, None]  # |q_unit| <= 1: q_unit * a_K fits fp16
    qn = gl.convert_layout(q_norm, COL)
    # Score tile rows m >= 8 hold odd tokens, whose K codes enter the dot 16 x larger.
    unit_f = gl.where(gl.arange(0, ROWS, layout=ROW) < HALF, UNIT, UNIT / 16)
    coef_a = unit_f[:, None] * qn[None, :]
    for blk_i in range(lo, hi):
        blk_later = gl.load(bt_row + gl.minimum(blk_i + 3, hi - 1))
        slot_after = gl.load(block_to_slot_ptr + blk_after)
        if (blk_i + 1 < hi) & (slot_next < 0):
            nxt = copied % STAGES
            _copy_record(k_desc, v_desc, coef_desc, line_desc, ks, vs, cs, ds, bars.index(nxt),
                         nxt, blk_next * hk + h)
            copied += 1
        if slot < 0:  # (pool blocks: the POOL_ONLY launch)
            stage = used % STAGES
            mbarrier.wait(bars.index(stage), (used // STAGES) & 1)
            coefs = cs.index(stage)._reinterpret(gl.float16, [2, 64, 4], SMEM)
            kz_s = coefs.index(0)  # a_K, z_K
            vz_s = coefs.index(1)  # a_V, z_V
            tau_s = ds.index(stage)._reinterpret(gl.float16, [2, 32, 4], SMEM).index(0)
            q_t = _q_operand(q_unit, _channel_coefs(kz_s.slice(0, 32)))
            z_k = _channel_coefs(kz_s.slice(32, 32))
            coef_b = qn * gl.convert_layout(gl.sum(q_unit * z_k[None, :], 1), COL)

            k0, k1, k2, k3 = _k_chunks(ks.index(stage))
            s0a, s0b = _scores(q_t, coef_a, coef_b, k0, tau_s.slice(0, 8))
            s1a, s1b = _scores(q_t, coef_a, coef_b, k1, tau_s.slice(8, 8))
            s2a, s2b = _scores(q_t, coef_a, coef_b, k2, tau_s.slice(16, 8))
            s3a, s3b = _scores(q_t, coef_a, coef_b, k3, tau_s.slice(24, 8))
            mx = gl.maximum(_max4(s0a, s0b, s1a, s1b), _max4(s2a, s2b, s3a, s3b))
            m_new = gl.maximum(m_i, gl.max(mx, 0))
            alpha = gl.exp2(m_i - m_new)
            m_i = m_new
            l_acc = l_acc * alpha[None, :]

            o_rec = gl.zeros([D, HALF], gl.float32, MMA)
            pz_sum = gl.zeros([ROWS, HALF], gl.float32, MMA)
            v_s = vs.index(stage)._reinterpret(gl.int32, [4, 8, 32], V_VIEW)
            tiles = ((s0a, s0b), (s1a, s1b), (s2a, s2b), (s3a, s3b))
            for c in gl.static_range(4):  # a_V of chunk c, then its z_V 32 rows on
                o_rec, l_acc, pz_sum = _chunk_pv(o_rec, l_acc, pz_sum, tiles[c][0], tiles[c][1],
                                                 m_new, v_s.index(c), vz_s.slice(8 * c, 8),
                                                 vz_s.slice(32 + 8 * c, 8))
            sigma_s = ds.index(stage)._reinterpret(gl.float16, [2, D], SIGMA_VIEW).index(1)
            sigma = sigma_s.load(ROW).to(gl.float32)
            pz = gl.sum(pz_sum, 0)
            o = o * alpha[None, :] + sigma[:, None] * (o_rec * inv_f[:, None] + pz[None, :])
            used += 1
            gl.thread_barrier()  # every lane done with this stage before its next copy
        blk = blk_next
        blk_next = blk_after
        blk_after = blk_later
        slot = slot_next
        slot_next = slot_after

    rq = gl.arange(0, HALF, layout=COL)
    part = (b * hk + h) * part_splits + split
    gl.store(part_o_ptr + (part * ROWS + rq[None, :]) * D + chan[:, None], o)
    gl.store(part_ml_ptr + part * 2 * ROWS + rq, m_i)
    gl.store(part_ml_ptr + part * 2 * ROWS + ROWS + rq, gl.sum(l_acc, 0))


def descriptors(pages: Tensor) -> tuple[TensorDescriptor, ...]:
    """The TMA descriptors of _record_kernel over the pages [blocks, heads, record bytes]
    (contiguous) as 128-byte lines: boxes of the K codes, the V codes, 4 and 2 lines."""
    lines = pages.view(torch.int16).view(-1, 64)
    return tuple(TensorDescriptor.from_tensor(lines, [rows, 64], lay) for rows, lay in BOXES)


def num_splits(pairs: int, pool_splits: int, max_blocks: int, num_sms: int) -> int:
    """Record splits for `pairs` (sequence, KV head) pairs: the record kernel and the
    concurrent pool launch together about PROGRAMS_PER_SM programs per SM."""
    room = PROGRAMS_PER_SM * num_sms - pairs * pool_splits
    return max(1, min(room // pairs, max_blocks, MAX_SPLITS))


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the record kernel runs on while the pool launch runs on the caller's."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def unsupported(q: Tensor, cache: KVarNCache) -> str | None:
    """What `attention` would need changed to take this call, or None if it takes it."""
    b, sq, hq, d = q.shape
    hk = cache.num_kv_heads
    lay = layout(cache.preset, d)
    preset = lay.preset
    if sq != 1:
        return f"decode queries (one token per sequence), got q {list(q.shape)}"
    if d != D.value:
        return f"head_dim {D.value}, got {d}"
    if cache.tile != G.value:
        return f"{G.value}-token tiles, got {cache.preset}"
    if preset.k_bits != 4 or preset.v_bits != 2:
        return f"k4v2 presets, got {cache.preset}"
    try:
        lines = _record_lines(lay)
    except ValueError as e:
        return f"the record layout of kvarn_k4v2_g128 ({e})"
    if lines != RECORD_BOXES:
        return f"the record layout of kvarn_k4v2_g128, got {cache.preset}'s {lay}"
    if hq % hk or hq // hk > HALF.value:
        return f"GQA groups <= {HALF.value} query heads per KV head, got {hq} / {hk}"
    if not cache.pages.is_contiguous():
        return f"contiguous pages, got strides {cache.pages.stride()}"
    if cache.pages.numel() // LINE.value >= 2**31:
        return (f"pages of < 2**31 lines of {LINE.value} bytes (TMA coordinates), got "
                f"{cache.num_blocks} blocks")
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) < (9, 0):
        return (f"CUDA tensors on an sm_90+ GPU (TMA copies; Gluon has no interpreter), got "
                f"{q.device}")
    return None


def applies(q: Tensor, cache: KVarNCache) -> bool:
    """Whether a decode call should take this kernel rather than triton_attention's: one
    it takes, with at least MIN_KV_SEQUENCES (sequence, KV head) pairs; below that the
    one-warp programs leave the GPU too empty to win."""
    return (q.shape[0] * cache.num_kv_heads >= MIN_KV_SEQUENCES
            and unsupported(q, cache) is None)


def attention(q: Tensor, cache: KVarNCache, block_tables: Tensor, seq_lens: Tensor,
              softmax_scale: float | None = None, splits: int | None = None,
              max_registers: int | None = None, out: Tensor | None = None,
              pool_splits: int = POOL_SPLITS) -> Tensor:
    """Decode attention, q [B, 1, Hq, D] -> [B, 1, Hq, D]: the quantized blocks with this
    module's kernel (on a side stream), the pool blocks (sink, tail) with
    triton_attention's at the same time on the caller's stream, then one merge.
    `splits`: of the quantized blocks (default: `num_splits`);
    `pool_splits`: of the pool launch; `out`: as in triton_attention.attention."""
    b, _, hq, d = q.shape
    hk = cache.num_kv_heads
    why = unsupported(q, cache)
    if why:
        raise ValueError(f"the Gluon kernel takes {why}; triton_attention.attention takes "
                         "every cache")
    group = hq // hk
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    if q.stride(3) != 1:
        q = q.contiguous()
    max_blocks = block_tables.shape[1]
    if splits is None:
        splits = num_splits(b * hk, pool_splits, max_blocks, triton_attention._num_sms(q.device))
    shape = (b, hk, 1, splits + pool_splits)  # the last splits: the pool blocks
    part_o = torch.empty(shape + (ROWS, d), dtype=torch.float32, device=q.device)
    part_ml = torch.empty(shape + (2, ROWS), dtype=torch.float32, device=q.device)
    out = triton_attention.output(q, out)
    narrow = NARROW_POOL if b * hk >= NARROW_POOL_MIN_PROGRAMS else {}
    main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
    side.wait_stream(main)
    try:  # joined even if the pool launch rejects its inputs: the side stream writes part_o
        with torch.cuda.stream(side):
            _record_kernel[(b, hk, splits)](
                q, part_o, part_ml, *descriptors(cache.pages), block_tables, seq_lens,
                cache.block_to_slot, float(scale * LOG2E / math.sqrt(d)), splits,
                splits + pool_splits, q.stride(0), q.stride(2), block_tables.stride(0),
                GROUP=group, num_warps=NUM_WARPS,
                **({} if max_registers is None else {"maxnreg": max_registers}))
        triton_attention.attention(
            q, cache, block_tables, seq_lens, softmax_scale=softmax_scale, splits=pool_splits,
            rows=ROWS, pool_partials=(part_o, part_ml, splits), **narrow)
    finally:
        main.wait_stream(side)
    triton_attention.merge(part_o, part_ml, out, 1, group)
    return out
