"""Pallas Mosaic GPU kernel: decode attention over the quantized records of a paged KVarN
cache, the codes unpacked straight into Hopper warpgroup-MMA operand registers and the
records brought into shared memory by TMA: the design of `kvarn_torch.gluon_attention`,
which Pallas's Triton backend (`pallas_attention`) cannot express.

Scope: kvarn_k4v2_g128, head_dim 128, decode (one query token), GQA groups of up to 8
query heads, sm_90 GPUs (wgmma and TMA; Mosaic GPU has no interpreter for the register
code here). A call is three launches and one small XLA op: `pallas_attention`'s kernel in
its pool-only mode (the pool blocks, sink and tail, and the rotated query rows this
kernel reads), `record_blocks` (the block table with -1 for pool blocks), this kernel
over the records, and `pallas_attention`'s merge of both kernels' partials. `applies`
says when `attention` here is the faster choice.

A program is one warpgroup (4 warps) over split program_id(2) of one sequence's block
table positions for one KV head. It steps over the pool blocks (a few per sequence) in
its loop while it looks for the next record to copy, so no table is compacted before the
launch. Each record arrives as two TMA copies into one of two stages while the previous
one is computed: the K codes as int16 [128 channels, 32 token quads] (record rows 0-127
of 64 bytes, under a 64-byte swizzle) and f16 rows 32-53 [22, 128] (a_K, z_K, tau_K, the
V codes, sigma_V, a_V, z_V; `F16_ROWS`).

Both dots are transposed so that the codes are the A operand, from registers, and the 8
query rows (a GQA group, zero-padded) the N = 8 side; scores are in base 2:

    s[t, r]  = tau_K[t] * (sum_d c_K[t, d] * q'[r, d] + sum_d q[r, d] * z_K[d])
    pv[d, r] = sigma_V[d] * (sum_t c_V[t, d] * p'[r, t] + sum_t p[r, t] * z_V[t])

with q' = q * a_K and p' = p * a_V rounded to fp16 into shared memory as the B operands
(q is the rotated query over its largest entry, so q' cannot overflow). A code c masked
at bit position b enters the MMA as the fp16 subnormal 2**b * c * 2**-24, exact; the
2**(24 - b) comes back out of the per-token (tau_K) or per-channel (sigma_V) factor. The
z_K term is a second, K = 16 dot of the same accumulator: fp16 partial sums of q * z_K
over 8 channels against an A operand of constants in the codes' scale (`z_ones`).

Register layout (Mosaic's WGMMA_LAYOUT for a [128, 128] operand): thread (warp w, lane
with g = lane // 4, k = lane % 4) holds rows 64 m + 16 w + 8 h + g (m, h in {0, 1}) and
columns 8 c + 2 k, +1. Row R stands for token PERM[R] in the QK dot and for channel
PERM[R] in the PV dot, PERM[64 m + 16 w + 8 h + g] = 32 w + 4 g + 2 m + h, so that a
thread's 4 rows are one K token quad (one halfword of each channel's K codes: two 16-bit
loads and four `and`s give four operand registers) and the 4 channels of one V code byte
(two tokens' bytes in the halves of a register, one `prmt` and one `and` a channel). The
PV output's rows go back to channel order in the partials' store.

Shared-memory reads are laid out for the banks (Nsight Compute, 16 x 32K on an H100: the
L1 pipe's wavefronts were the limit at 349 a warp per record, now 177; 264.5 -> 175.2
us): the K codes' swizzle puts the 4 lanes k of a load, rows 2 k apart, on distinct
banks, and in the V code loads lanes k = 2, 3 read token t0 + 1 first.

Online softmax per split in base 2; the partials are stored in `pallas_attention.merge`'s
format ([B, Hk, W, 8, D] unnormalized, channel order; max and sum [B, Hk, W, 8]).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import fragmented_array as fa
from jax.experimental.mosaic.gpu import utils as mu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, memref, vector

from kvarn.format import layout
from kvarn_jax import pallas_attention
from kvarn_jax.cache import KVarNCache

D, G, R = 128, 128, 8  # head_dim, tokens per record, query rows per program (a GQA group)
PRESET = "kvarn_k4v2_g128"
RECORD_BYTES = layout(PRESET, D).record_bytes
# The record as f16 rows of 128 (54 rows): 0-31 the K codes (copied as int16 [128, 32]),
# 32 a_K, 33 z_K, 34 tau_K, 35-50 the V codes, 51 sigma_V, 52 a_V, 53 z_V. One TMA box
# takes rows 32-53; these are their rows in it:
F16_FIRST, F16_ROWS = 32, 22
S_AK, S_ZK, S_TAU, S_V, S_SIG, S_AV, S_ZV = 0, 1, 2, 3, 19, 20, 21
STAGES = 2  # 3 and 4 stages measured no faster (175.2 us at 2, 178.4 at 3)
# Programs aimed at per SM (record splits): 3 fit by registers (157 a thread); more
# splits than fit keep the SMs busy to the end (8 splits, 1,024 programs at 16 x 32K).
PROGRAMS_PER_SM = 8
MAX_SPLITS = 64
# From this many (sequence, KV head) pairs on, decode takes this kernel (as the Gluon one).
MIN_KV_SEQUENCES = 40
# q . z_K partial sums are stored times Z_SCALE (|sum| <= 8 max |z_K| stays in fp16 range)
# and z_ones carries 1 / Z_SCALE.
Z_SCALE = 2.0**-8


def _perm_row(row: int) -> int:
    m, rest = divmod(row, 64)
    w, rest = divmod(rest, 16)
    h, g = divmod(rest, 8)
    return 32 * w + 4 * g + 2 * m + h


PERM = np.array([_perm_row(r) for r in range(128)])  # operand row -> token (QK), channel (PV)
# The B operands [8 rows, 128] fp16, K-major under the 128-byte swizzle (written by hand
# in make_qb and store_pt, which follow this layout).
B_OPERAND = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
# The z_K dot's B operand [8 rows, 16] under the 32-byte swizzle (written by make_qb).
Z_OPERAND = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))
# The K codes int16 [128 channels, 32 token quads] under the 64-byte swizzle: 16-byte
# chunk w of row ch at chunk w ^ (ch // 2) % 4, so that build_k's loads (4 lanes k on rows
# 2 k apart) hit 16 distinct banks instead of 4.
K_CODES = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(64))


def c32(v: int):
    i32 = ir.IntegerType.get_signless(32)
    return arith.constant(i32, ir.IntegerAttr.get(i32, v if v < 2**31 else v - 2**32))


def _thread():
    tid = arith.remui(mu.thread_idx(), c32(128))
    warp = arith.divui(tid, c32(32))
    lane = arith.remui(tid, c32(32))
    return tid, warp, lane, arith.divui(lane, c32(4)), arith.remui(lane, c32(4))


def _ix(v):
    return arith.index_cast(ir.IndexType.get(), v)


def _f16x2(x):
    i32 = ir.IntegerType.get_signless(32)
    return vector.bitcast(ir.VectorType.get((2,), ir.F16Type.get()),
                          vector.broadcast(ir.VectorType.get((1,), i32), x))


def _f16_bits(x: float) -> int:
    return int(np.array(x, np.float16).view(np.uint16))


# ---------------------------------------------------------------- register-level pieces

_OPERAND = plgpu.ShapeDtypeStruct((128, 128), jnp.float16, layout=plgpu.Layout.WGMMA)
_Z_OPERAND_A = plgpu.ShapeDtypeStruct((128, 16), jnp.float16, layout=plgpu.Layout.WGMMA)
_ROWV = plgpu.ShapeDtypeStruct((128,), jnp.float32, layout=plgpu.Layout.WGMMA.reduce(1))
_COLV = plgpu.ShapeDtypeStruct((8,), jnp.float32, layout=plgpu.Layout.WGMMA.reduce(0))


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(K_CODES),), return_type=_OPERAND)
def build_k(ctx, codes):
    """The QK dot's A operand from a stage's K codes (int16 [channel, token quad] under
    K_CODES: channel ch = 8 c8 + 2 k (+1) at [c8, 0, 2 k (+1)], quad 8 w + g at column
    8 (w ^ k) + g): row R is token PERM[R], column d channel d, value code * 2**-24
    (even tokens) or 2**-20."""
    i32 = ir.IntegerType.get_signless(32)
    _, warp, _, g, k = _thread()
    col = _ix(arith.addi(arith.muli(arith.xori(warp, k), c32(8)), g))
    r0 = arith.muli(k, c32(2))
    r1 = _ix(arith.addi(r0, c32(1)))
    r0 = _ix(r0)
    zero = _ix(c32(0))
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((128, 128)), dtype=object)
    for c8 in range(16):
        lo = arith.extui(i32, memref.load(codes, [_ix(c32(c8)), zero, r0, col]))
        hi = arith.extui(i32, memref.load(codes, [_ix(c32(c8)), zero, r1, col]))
        x = arith.ori(lo, arith.shli(hi, c32(16)))  # token quad 8 w + g of channels ch, ch + 1
        y = arith.shrui(x, c32(8))
        pairs = [arith.andi(x, c32(0x000F000F)),  # token i = 0: c * 2**-24
                 arith.andi(x, c32(0x00F000F0)),  # i = 1: c * 2**-20
                 arith.andi(y, c32(0x000F000F)),  # i = 2
                 arith.andi(y, c32(0x00F000F0))]  # i = 3
        for i in range(4):
            m, h = divmod(i, 2)  # token 4 (8 w + g) + i = PERM[64 m + 16 w + 8 h + g]
            regs[m, c8, 0, 0, h, 0, 0, 0, 0] = _f16x2(pairs[i])
    return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


def v_read(k: int, g: int) -> tuple[int, int, int]:
    """build_v's reads for lane (g, k) (any warp), as plain integers: the column offsets
    from 32 k + b // 2 of its two 16-bit loads of a V code row, and the `prmt` selector
    that puts byte b % 2 of token t0's halfword in byte 0 and of t0 + 1's in byte 2 (one
    nibble a result byte; source bytes 0-3 the first load, 4-7 the second; bytes 1 and 3
    are masked off). Lanes k = 2, 3 load t0 + 1 first: columns 32 k + b // 2 of lanes k
    and k + 2 share a bank, the swapped order puts the 4 lanes k on 4 banks."""
    upper, j = k // 2, g % 2
    first = 16 * upper
    return first, 16 - first, (j + 4 * upper) | ((j + 4 * (1 - upper)) << 8)


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=_OPERAND)
def build_v(ctx, sc):
    """The PV dot's A operand from a stage's f16 rows: row R is channel PERM[R] = 4 b + e
    (code byte b = 8 w + g, e = 2 m + h), column t token t, value code * 4**e * 2**-24.
    Token t's byte b is byte b % 2 of f16 sc[S_V + t // 8, 16 (t % 8) + b // 2]."""
    i32 = ir.IntegerType.get_signless(32)
    i16 = ir.IntegerType.get_signless(16)
    _, warp, _, g, k = _thread()
    half = arith.divui(arith.addi(arith.muli(warp, c32(8)), g), c32(2))  # b // 2
    col0 = arith.addi(arith.muli(k, c32(32)), half)  # token t0 = 8 c8 + 2 k
    upper = arith.divui(k, c32(2))  # as in v_read
    first = arith.muli(upper, c32(16))
    col_a = _ix(arith.addi(col0, first))
    col_b = _ix(arith.addi(col0, arith.subi(c32(16), first)))
    j = arith.remui(g, c32(2))
    sel = arith.ori(arith.addi(j, arith.muli(upper, c32(4))),
                    arith.shli(arith.addi(j, arith.muli(arith.subi(c32(1), upper), c32(4))),
                               c32(8)))
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((128, 128)), dtype=object)

    def load(row, col):
        return arith.extui(i32, arith.bitcast(i16, memref.load(sc, [_ix(c32(row)), col])))

    for c8 in range(16):  # columns 8 c8 + 2 k, +1: tokens t0, t0 + 1 (t // 8 = c8)
        x = mu.prmt(load(S_V + c8, col_a), load(S_V + c8, col_b), sel)
        for e in range(4):
            m, h = divmod(e, 2)
            regs[m, c8, 0, 0, h, 0, 0, 0, 0] = _f16x2(arith.andi(x, c32(0x00030003 << (2 * e))))
    return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


@plgpu.inline_mgpu(return_type=_Z_OPERAND_A)
def z_ones(ctx):
    """The A operand [128, 16] whose dot with make_qb's partial sums adds sum_d q[r, d]
    z_K[d] to every QK row in build_k's scale: 2**-24 / Z_SCALE in rows h = 0, 2**-20 /
    Z_SCALE in rows h = 1 (fp16 normals)."""
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((128, 16)), dtype=object)
    for idx in np.ndindex(regs.shape):
        bits = _f16_bits((2.0**-24 if idx[4] == 0 else 2.0**-20) / Z_SCALE)
        regs[idx] = _f16x2(c32(bits * 0x00010001))
    return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(B_OPERAND),
                              plgpu.RefType(Z_OPERAND)))
def make_qb(ctx, q, sc, qb, bz):
    """The QK dot's B operands: qb[r, d] = q[r, d] * a_K[d] (fp16) under B_OPERAND,
    element [r, d] at [0, d // 64, r, 8 ((d % 64) // 8 ^ r % 8) + d % 8]; and bz[r, c] =
    Z_SCALE * sum of q[r, d] z_K[d] over d in 8 c .. 8 c + 7 (float32, rounded to fp16)
    under Z_OPERAND, [r, c] at [0, 0, r, 8 (c // 8 ^ r // 4 % 2) + c % 8]. Thread tid
    takes row tid // 16, channels 8 c .. 8 c + 7 with c = tid % 16 (16 bytes)."""
    f32 = ir.F32Type.get()
    v8 = ir.VectorType.get((8,), ir.F16Type.get())
    v8f = ir.VectorType.get((8,), f32)
    tid, _, _, _, _ = _thread()
    r = arith.divui(tid, c32(16))
    c = arith.remui(tid, c32(16))
    d0 = _ix(arith.muli(c, c32(8)))
    qv = vector.load(v8, q, [_ix(r), d0])
    tile = arith.divui(c, c32(8))
    col = arith.muli(arith.xori(arith.remui(c, c32(8)), arith.remui(r, c32(8))), c32(8))
    vector.store(arith.mulf(qv, vector.load(v8, sc, [_ix(c32(S_AK)), d0])), qb,
                 [_ix(c32(0)), _ix(tile), _ix(r), _ix(col)])
    zk = arith.extf(v8f, vector.load(v8, sc, [_ix(c32(S_ZK)), d0]))
    part = vector.reduction(f32, vector.CombiningKind.ADD, arith.mulf(arith.extf(v8f, qv), zk))
    part = arith.mulf(part, arith.constant(f32, ir.FloatAttr.get(f32, Z_SCALE)))
    zcol = arith.addi(arith.muli(arith.xori(tile, arith.remui(arith.divui(r, c32(4)), c32(2))),
                                 c32(8)), arith.remui(c, c32(8)))
    memref.store(arith.truncf(ir.F16Type.get(), part), bz,
                 [_ix(c32(0)), _ix(c32(0)), _ix(r), _ix(zcol)])
    return None


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=_COLV)
def q_norms(ctx, qn):
    """q_norm of the query rows a thread's accumulator columns hold (2 k, 2 k + 1)."""
    f32 = ir.F32Type.get()
    _, _, _, _, k = _thread()
    vals = [memref.load(qn, [_ix(arith.addi(arith.muli(k, c32(2)), c32(v)))]) for v in range(2)]
    regs = np.empty(fa.WGMMA_COL_LAYOUT.registers_shape((8,)), dtype=object)
    regs[0, 0, 0] = vector.from_elements(ir.VectorType.get((2,), f32), vals)
    return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_COL_LAYOUT, _is_signed=None)


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=(_ROWV,) * 5)
def row_vecs(ctx, sc):
    """Per-row factors (a thread's rows 64 m + 16 w + 8 h + g, i = PERM[row]): of token i
    tau_K with the 2**24 or 2**20 of build_k, a_V, z_V; of channel i sigma_V with the
    2**(24 - 2 e) of build_v (e = 2 m + h), sigma_V."""
    f32 = ir.F32Type.get()
    v1 = ir.VectorType.get((1,), f32)
    _, warp, _, g, _ = _thread()
    base = arith.addi(arith.muli(warp, c32(32)), arith.muli(g, c32(4)))
    layout_ = fa.WGMMA_ROW_LAYOUT
    outs = [np.empty(layout_.registers_shape((128,)), dtype=object) for _ in range(5)]

    def const(x):
        return arith.constant(f32, ir.FloatAttr.get(f32, float(x)))

    for m in range(2):
        for h in range(2):
            i = _ix(arith.addi(base, c32(2 * m + h)))

            def load(row):
                return arith.extf(f32, memref.load(sc, [_ix(c32(row)), i]))

            sig = load(S_SIG)
            vals = [arith.mulf(load(S_TAU), const(2.0**24 if h == 0 else 2.0**20)),
                    load(S_AV), load(S_ZV), arith.mulf(sig, const(2.0**(24 - 2 * (2 * m + h)))),
                    sig]
            for o, v in zip(outs, vals):
                o[m, 0, h, 0, 0] = vector.broadcast(v1, v)
    return tuple(mgpu.FragmentedArray(_registers=o, _layout=layout_, _is_signed=None)
                 for o in outs)


@plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(B_OPERAND)))
def store_pt(ctx, p, pb):
    """The PV dot's B operand from p' [128 rows (token PERM[row]), 8] (fp16, accumulator
    layout): pb[r, PERM[row]] = p'[row, r], stored under B_OPERAND as in make_qb."""
    _, warp, _, g, k = _thread()
    for m in range(2):
        for h in range(2):
            reg = p.registers[m, 0, 0, 0, h, 0, 0, 0, 0]  # query rows 2 k, 2 k + 1 of the row
            t = arith.addi(arith.addi(arith.muli(warp, c32(32)), arith.muli(g, c32(4))),
                           c32(2 * m + h))
            tile = arith.divui(t, c32(64))
            tc = arith.remui(t, c32(64))
            for v in range(2):
                r = arith.addi(arith.muli(k, c32(2)), c32(v))
                val = vector.extract(reg, dynamic_position=[], static_position=[v])
                col = arith.addi(arith.muli(arith.xori(arith.divui(tc, c32(8)), r), c32(8)),
                                 arith.remui(tc, c32(8)))
                memref.store(val, pb, [_ix(c32(0)), _ix(tile), _ix(r), _ix(col)])
    return None


@plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
def store_o(ctx, o, out):
    """The PV accumulator [128 rows (channel PERM[row]), 8] into out [8, D] (global) in
    channel order: out[r, PERM[row]] = o[row, r]."""
    _, warp, _, g, k = _thread()
    for m in range(2):
        for h in range(2):
            reg = o.registers[m, 0, 0, 0, h, 0, 0, 0, 0]  # query rows 2 k, 2 k + 1
            ch = _ix(arith.addi(arith.addi(arith.muli(warp, c32(32)), arith.muli(g, c32(4))),
                                c32(2 * m + h)))
            for v in range(2):
                r = _ix(arith.addi(arith.muli(k, c32(2)), c32(v)))
                val = vector.extract(reg, dynamic_position=[], static_position=[v])
                memref.store(val, out, [r, ch])
    return None


# ---------------------------------------------------------------- the kernel


def _record_kernel(codes_hbm, f16_hbm, q_hbm, qn_hbm, rec_ref, lens_ref, o_ref, l_ref, m_ref,
                   codes_smem, f16_smem, q_smem, qn_smem, qb_smem, bz_smem, pb_smem, bars,
                   qbar, *, splits: int):
    """One warpgroup: split program s of the blocks of sequence b, KV head h (rec_ref[b]:
    the block ids, -1 where the block has a pool slot); q_unit [8, D] and q_norm [8] from
    q_hbm / qn_hbm (pool_partials's); out o [8, D], l, m [8] (see _record_partials)."""
    b = jax.lax.axis_index("b")
    h = jax.lax.axis_index("h")
    s = jax.lax.axis_index("s")
    n = (lens_ref[b] + G - 1) // G
    per = (n + splits - 1) // splits
    lo = jnp.minimum(s * per, n)
    hi = jnp.minimum(lo + per, n)

    plgpu.copy_gmem_to_smem(q_hbm.at[b, h, pl.ds(0, R)], q_smem, qbar)
    plgpu.copy_gmem_to_smem(qn_hbm.at[b, h, 0, pl.ds(0, R)], qn_smem, qbar)

    def copy_record(i, stage):
        blk = rec_ref[b, i]
        plgpu.copy_gmem_to_smem(codes_hbm.at[blk, h, pl.ds(0, 128)], codes_smem.at[stage],
                                bars.at[stage])
        plgpu.copy_gmem_to_smem(f16_hbm.at[blk, h, pl.ds(F16_FIRST, F16_ROWS)],
                                f16_smem.at[stage], bars.at[stage])

    def find(i):
        """The first record position from i on in the split (hi if none): pool blocks,
        a few per sequence, are stepped over here."""
        last = rec_ref.shape[1] - 1
        return jax.lax.while_loop(lambda j: (j < hi) & (rec_ref[b, jnp.minimum(j, last)] < 0),
                                  lambda j: j + 1, i)

    def attend(stage, carry):
        m_run, l_acc, o_acc = carry
        sc = f16_smem.at[stage]
        make_qb(q_smem, sc, qb_smem, bz_smem)
        plgpu.commit_smem()
        a_k = build_k(codes_smem.at[stage])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, a_k, qb_smem.T)
            plgpu.wgmma(acc_ref, z_ones(), bz_smem.T)
            vecs = row_vecs(sc)  # while the dots run
            return acc_ref[...], vecs
        acc, (taurs, av, zv, chs, sig) = pl.run_scoped(qk, plgpu.ACC((128, R), jnp.float32))
        scores = acc * taurs[:, None] * qn[None, :]  # row R: token PERM[R]; base 2
        m_new = jnp.maximum(m_run, jnp.max(scores, axis=0))
        alpha = jnp.exp2(m_run - m_new)
        p = jnp.exp2(scores - m_new[None, :])
        # sigma_V changes from record to record, so p's z_V term is summed per record.
        zt = jnp.sum(p * zv[:, None], axis=0)
        a_v = build_v(sc)  # the stage's last read, before the barrier of the next commit
        store_pt((p * av[:, None]).astype(jnp.float16), pb_smem)
        plgpu.commit_smem()

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, a_v, pb_smem.T)
            return acc_ref[...]
        pv_acc = pl.run_scoped(pv, plgpu.ACC((128, R), jnp.float32))  # row R: channel PERM[R]
        o_new = o_acc * alpha[None, :] + pv_acc * chs[:, None] + sig[:, None] * zt[None, :]
        return m_new, l_acc * alpha[None, :] + p, o_new

    pos0 = find(lo)

    @pl.when(pos0 < hi)
    def _():
        copy_record(pos0, 0)

    plgpu.barrier_wait(qbar)
    qn = q_norms(qn_smem)

    def step(carry):
        pos, stage, state = carry
        nxt = find(pos + 1)

        # Into the stage the previous record was read from: its last read (build_v) came
        # before the warpgroup barrier of that step's second commit_smem.
        @pl.when(nxt < hi)
        def _():
            copy_record(nxt, 1 - stage)

        plgpu.barrier_wait(bars.at[stage])
        return nxt, 1 - stage, attend(stage, state)

    wg = plgpu.Layout.WGMMA
    init = (plgpu.layout_cast(jnp.full((R,), -jnp.inf, jnp.float32), wg.reduce(0)),
            plgpu.layout_cast(jnp.zeros((128, R), jnp.float32), wg),
            plgpu.layout_cast(jnp.zeros((128, R), jnp.float32), wg))
    _, _, (m_run, l_acc, o_acc) = jax.lax.while_loop(lambda c: c[0] < hi, step,
                                                     (pos0, jnp.int32(0), init))
    store_o(o_acc, o_ref.at[b, h, s])
    m_ref[b, h, s] = jnp.maximum(m_run, pallas_attention.MASK)  # MASK: no record seen
    l_ref[b, h, s] = jnp.sum(l_acc, axis=0)  # l is summed over tokens once, at the end


def _record_partials(q_unit, q_norm, pages, rec, seq_lens, splits, width):
    """Per split, in merge's format: o [B, Hk, width, 8, D] unnormalized (channel order),
    l, m [B, Hk, width, 8] (m base 2; MASK and l = 0 for a split without records; splits
    from `splits` on not written)."""
    b, hk = q_unit.shape[:2]
    nb = pages.shape[0]
    halves = pages.reshape(nb, hk, RECORD_BYTES // 2, 2)
    codes = jax.lax.bitcast_convert_type(halves, jnp.int16).reshape(nb, hk, -1, 32)
    f16_rows = jax.lax.bitcast_convert_type(halves, jnp.float16).reshape(nb, hk, -1, 128)
    kernel = plgpu.kernel(
        functools.partial(_record_kernel, splits=splits),
        out_type=(jax.ShapeDtypeStruct((b, hk, width, R, D), jnp.float32),
                  jax.ShapeDtypeStruct((b, hk, width, R), jnp.float32),
                  jax.ShapeDtypeStruct((b, hk, width, R), jnp.float32)),
        grid=(b, hk, splits), grid_names=("b", "h", "s"),
        scratch_types=[plgpu.SMEM((STAGES, 128, 32), jnp.int16, transforms=K_CODES),
                       plgpu.SMEM((STAGES, F16_ROWS, 128), jnp.float16),
                       plgpu.SMEM((R, D), jnp.float16),
                       plgpu.SMEM((R,), jnp.float32),
                       plgpu.SMEM((R, D), jnp.float16, transforms=B_OPERAND),
                       plgpu.SMEM((R, 16), jnp.float16, transforms=Z_OPERAND),
                       plgpu.SMEM((R, G), jnp.float16, transforms=B_OPERAND),
                       plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
                       plgpu.Barrier(num_arrivals=2)])
    return kernel(codes, f16_rows, q_unit, q_norm, rec, seq_lens)


# ---------------------------------------------------------------- the call


def record_blocks(block_to_slot: jax.Array, block_tables: jax.Array) -> jax.Array:
    """The block table with -1 where a block has a pool slot: the blocks read from their
    records (the kernel's table)."""
    return jnp.where(block_to_slot[jnp.maximum(block_tables, 0)] < 0, block_tables, -1)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _attention(q, cache, block_tables, seq_lens, scale, splits):
    o_pool, l_pool, m_pool, q_unit, q_norm = pallas_attention.pool_partials(
        q, cache, block_tables, seq_lens, scale, interpret=False)
    width = 1 << math.ceil(math.log2(splits))
    o, l, m = _record_partials(q_unit, q_norm, cache.pages,
                               record_blocks(cache.block_to_slot, block_tables), seq_lens,
                               splits, width)
    return pallas_attention.merge(o, l[..., None], m[..., None], q, splits, interpret=False,
                                  more=(o_pool, l_pool, m_pool, 1))


def unsupported(q: jax.Array, cache: KVarNCache) -> str | None:
    """What `attention` would need changed to take this call, or None if it takes it."""
    b, sq, hq, d = q.shape
    hk = cache.num_kv_heads
    if sq != 1:
        return f"decode queries (one token per sequence), got q {list(q.shape)}"
    if d != D or cache.preset != PRESET:
        return f"{PRESET} at head_dim {D}, got {cache.preset} at {d}"
    if hq % hk or hq // hk > R:
        return f"GQA groups <= {R} query heads per KV head, got {hq} / {hk}"
    device = jax.devices()[0]
    if device.platform != "gpu" or float(getattr(device, "compute_capability", 0)) < 9.0:
        return (f"an sm_90+ GPU (wgmma, TMA; Mosaic GPU has no interpreter for this kernel), "
                f"got {device.device_kind}")
    return None


def applies(q: jax.Array, cache: KVarNCache) -> bool:
    """Whether a decode call should take this kernel rather than pallas_attention's: one it
    takes, with at least MIN_KV_SEQUENCES (sequence, KV head) pairs."""
    return q.shape[0] * cache.num_kv_heads >= MIN_KV_SEQUENCES and unsupported(q, cache) is None


def num_splits(pairs: int, max_blocks: int, num_sms: int) -> int:
    """Record splits for `pairs` (sequence, KV head) pairs: about PROGRAMS_PER_SM per SM."""
    return max(1, min(PROGRAMS_PER_SM * num_sms // pairs, max_blocks, MAX_SPLITS))


def attention(q: jax.Array, cache: KVarNCache, block_tables: jax.Array, seq_lens: jax.Array,
              softmax_scale: float | None = None, splits: int | None = None) -> jax.Array:
    """Decode attention, q [B, 1, Hq, D] -> [B, 1, Hq, D] in q's dtype: the pool blocks and
    the query rows with pallas_attention's kernel, the records with this module's, one
    merge. `splits`: of each sequence's blocks (default `num_splits`)."""
    why = unsupported(q, cache)
    if why:
        raise ValueError(f"the Mosaic GPU kernel takes {why}; pallas_attention.attention "
                         "takes every cache")
    b = q.shape[0]
    if block_tables.ndim != 2 or block_tables.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(f"block_tables must be [B={b}, M] and seq_lens [B]; got "
                         f"{block_tables.shape}, {seq_lens.shape}")
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits must be a positive int or None (automatic); got {splits!r}")
    if splits is None:
        splits = num_splits(b * cache.num_kv_heads, block_tables.shape[1],
                            pallas_attention._num_sms())
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    return _attention(q, cache, block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32),
                      float(scale), int(splits))
