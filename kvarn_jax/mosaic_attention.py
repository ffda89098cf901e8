"""Pallas Mosaic GPU kernel: decode attention over the quantized records of a paged KVarN
cache, the codes unpacked straight into Hopper warpgroup-MMA operand registers and the
records brought into shared memory by TMA: the design of `kvarn_torch.gluon_attention`,
which Pallas's Triton backend (`pallas_attention`) cannot express.

Scope: kvarn_k4v2_g128, head_dim 128, decode (one query token), GQA groups of up to 8
query heads, sm_90 GPUs (wgmma and TMA; Mosaic GPU has no interpreter for the register
code here). The pool blocks (sink, tail) go through `pallas_attention`'s kernel in its
pool-only mode, and its merge kernel combines both kernels' partials; `applies` says when
`attention` here is the faster choice.

A program is one warpgroup (4 warps) over split program_id(2) of one sequence's records
for one KV head. The records of each sequence are listed first (`record_table`: the
blocks without a pool slot, in order), so the kernel never looks at the pool. Each record
arrives as two TMA copies into one of two stages while the previous one is computed: the
K codes as int16 [128 channels, 32 token quads] (record rows 0-127 of 64 bytes) and f16
rows 32-53 [22, 128] (a_K, z_K, tau_K, the V codes, sigma_V, a_V, z_V; `_F16_ROWS`).

Both dots are transposed so that the codes are the A operand, from registers, and the 8
query rows (a GQA group, zero-padded) the N = 8 side:

    s[t, r]  = tau_K[t] * (sum_d c_K[t, d] * q'[r, d] + sum_d q[r, d] * z_K[d])
    pv[d, r] = sigma_V[d] * (sum_t c_V[t, d] * p'[r, t] + sum_t p[r, t] * z_V[t])

with q' = q * a_K and p' = p * a_V rounded to fp16 into shared memory as the B operands
(q is scaled to |q| <= 1 first, so q' cannot overflow). A code c masked at bit position b
enters the MMA as the fp16 subnormal 2**b * c * 2**-24, exact; the 2**(24 - b) comes back
out of the per-token (tau_K) or per-channel (sigma_V) factor.

Register layout (Mosaic's WGMMA_LAYOUT for a [128, 128] operand): thread (warp w, lane
with g = lane // 4, k = lane % 4) holds rows 64 m + 16 w + 8 h + g (m, h in {0, 1}) and
columns 8 c + 2 k, +1. Row R stands for token PERM[R] in the QK dot and for channel
PERM[R] in the PV dot, PERM[64 m + 16 w + 8 h + g] = 32 w + 4 g + 2 m + h, so that a
thread's 4 rows are one K token quad (one halfword of each channel's K codes: two 16-bit
loads and four `and`s give four operand registers) and the 4 channels of one V code byte
(two tokens' bytes in the halves of a register, one `and` a channel). The PV output's
rows are put back in channel order when the partials are merged.

Online softmax per split, natural-log base; the partials are converted to
`pallas_attention.merge`'s format (base 2, [rows, D]) and merged with the pool's.
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
from kvarn_jax import pallas_attention, reference
from kvarn_jax.cache import KVarNCache

D, G, R = 128, 128, 8  # head_dim, tokens per record, query rows per program (a GQA group)
PRESET = "kvarn_k4v2_g128"
RECORD_BYTES = layout(PRESET, D).record_bytes
# The record as f16 rows of 128 (54 rows): 0-31 the K codes (copied as int16 [128, 32]),
# 32 a_K, 33 z_K, 34 tau_K, 35-50 the V codes, 51 sigma_V, 52 a_V, 53 z_V. One TMA box
# takes rows 32-53; these are their rows in it:
F16_FIRST, F16_ROWS = 32, 22
S_AK, S_ZK, S_TAU, S_V, S_SIG, S_AV, S_ZV = 0, 1, 2, 3, 19, 20, 21
STAGES = 2
# Programs aimed at per SM (record splits): at 16 x 32K on an H100, 8 splits (1,024
# programs) took 288 us, 2-7 splits 317-324, 16 294 (mosaic_attention_h100.txt).
PROGRAMS_PER_SM = 8
MAX_SPLITS = 64
# From this many (sequence, KV head) pairs on, decode takes this kernel (as the Gluon one).
MIN_KV_SEQUENCES = 40


def _perm_row(row: int) -> int:
    m, rest = divmod(row, 64)
    w, rest = divmod(rest, 16)
    h, g = divmod(rest, 8)
    return 32 * w + 4 * g + 2 * m + h


PERM = np.array([_perm_row(r) for r in range(128)])  # operand row -> token (QK), channel (PV)
INV_PERM = np.argsort(PERM)  # channel -> row of the PV output
# The B operands [8 rows, 128] fp16, K-major under the 128-byte swizzle (written by hand
# in make_qb and store_pt, which follow this layout).
B_OPERAND = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


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


# ---------------------------------------------------------------- register-level pieces

_OPERAND = plgpu.ShapeDtypeStruct((128, 128), jnp.float16, layout=plgpu.Layout.WGMMA)
_ROWV = plgpu.ShapeDtypeStruct((128,), jnp.float32, layout=plgpu.Layout.WGMMA.reduce(1))
_COLV = plgpu.ShapeDtypeStruct((8,), jnp.float32, layout=plgpu.Layout.WGMMA.reduce(0))


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=_OPERAND)
def build_k(ctx, codes):
    """The QK dot's A operand from a stage's K codes (int16 [channel, token quad]): row R
    is token PERM[R], column d channel d, value code * 2**-24 (even tokens) or 2**-20."""
    i32 = ir.IntegerType.get_signless(32)
    _, warp, _, g, k = _thread()
    quad = _ix(arith.addi(arith.muli(warp, c32(8)), g))  # tokens 4 (8 w + g) + i: the rows
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((128, 128)), dtype=object)
    for c8 in range(16):
        ch = arith.addi(arith.muli(k, c32(2)), c32(8 * c8))  # channels 8 c8 + 2 k, +1
        lo = arith.extui(i32, memref.load(codes, [_ix(ch), quad]))
        hi = arith.extui(i32, memref.load(codes, [_ix(arith.addi(ch, c32(1))), quad]))
        x = arith.ori(lo, arith.shli(hi, c32(16)))
        y = arith.shrui(x, c32(8))
        pairs = [arith.andi(x, c32(0x000F000F)),  # token i = 0: c * 2**-24
                 arith.andi(x, c32(0x00F000F0)),  # i = 1: c * 2**-20
                 arith.andi(y, c32(0x000F000F)),  # i = 2
                 arith.andi(y, c32(0x00F000F0))]  # i = 3
        for i in range(4):
            m, h = divmod(i, 2)  # token 4 (8 w + g) + i = PERM[64 m + 16 w + 8 h + g]
            regs[m, c8, 0, 0, h, 0, 0, 0, 0] = _f16x2(pairs[i])
    return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=_OPERAND)
def build_v(ctx, sc):
    """The PV dot's A operand from a stage's f16 rows: row R is channel PERM[R] = 4 b + e
    (code byte b = 8 w + g, e = 2 m + h), column t token t, value code * 4**e * 2**-24.
    Token t's byte b is byte b % 2 of f16 sc[S_V + t // 8, 16 (t % 8) + b // 2]."""
    i32 = ir.IntegerType.get_signless(32)
    i16 = ir.IntegerType.get_signless(16)
    _, warp, _, g, k = _thread()
    half = arith.divui(arith.addi(arith.muli(warp, c32(8)), g), c32(2))  # b // 2
    shift = arith.muli(arith.remui(g, c32(2)), c32(8))  # 8 (b % 2)
    col0 = _ix(arith.addi(arith.muli(k, c32(32)), half))  # token t0 = 8 c8 + 2 k
    col1 = _ix(arith.addi(arith.muli(k, c32(32)), arith.addi(half, c32(16))))  # t0 + 1
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((128, 128)), dtype=object)

    def load(row, col):
        return arith.extui(i32, arith.bitcast(i16, memref.load(sc, [_ix(c32(row)), col])))

    for c8 in range(16):  # columns 8 c8 + 2 k, +1: tokens t0, t0 + 1 (t // 8 = c8)
        words = arith.ori(load(S_V + c8, col0), arith.shli(load(S_V + c8, col1), c32(16)))
        x = arith.andi(arith.shrui(words, shift), c32(0x00FF00FF))  # byte b of t0 | t0 + 1
        for e in range(4):
            m, h = divmod(e, 2)
            regs[m, c8, 0, 0, h, 0, 0, 0, 0] = _f16x2(arith.andi(x, c32(0x00030003 << (2 * e))))
    return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(B_OPERAND)))
def make_qb(ctx, q, sc, qb):
    """The QK dot's B operand qb[r, d] = q[r, d] * a_K[d] (fp16), stored under B_OPERAND:
    element [r, d] at [r // 8, d // 64, r % 8, 8 ((d % 64) // 8 ^ r % 8) + d % 8]. Thread
    tid stores row tid // 16, channels 8 (tid % 16) .. +7 (16 bytes)."""
    v8 = ir.VectorType.get((8,), ir.F16Type.get())
    tid, _, _, _, _ = _thread()
    r = arith.divui(tid, c32(16))
    chunk16 = arith.remui(tid, c32(16))
    d0 = arith.muli(chunk16, c32(8))
    prod = arith.mulf(vector.load(v8, q, [_ix(r), _ix(d0)]),
                      vector.load(v8, sc, [_ix(c32(S_AK)), _ix(d0)]))
    tile = arith.divui(chunk16, c32(8))
    col = arith.muli(arith.xori(arith.remui(chunk16, c32(8)), arith.remui(r, c32(8))), c32(8))
    vector.store(prod, qb, [_ix(c32(0)), _ix(tile), _ix(r), _ix(col)])
    return None


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=(_ROWV,) * 6)
def row_vecs(ctx, sc):
    """Per-row factors (a thread's rows 64 m + 16 w + 8 h + g, i = PERM[row]): of token i
    tau_K with the 2**24 or 2**20 of build_k, tau_K, a_V, z_V; of channel i sigma_V with
    the 2**(24 - 2 e) of build_v (e = 2 m + h), sigma_V."""
    f32 = ir.F32Type.get()
    v1 = ir.VectorType.get((1,), f32)
    _, warp, _, g, _ = _thread()
    base = arith.addi(arith.muli(warp, c32(32)), arith.muli(g, c32(4)))
    layout_ = fa.WGMMA_ROW_LAYOUT
    outs = [np.empty(layout_.registers_shape((128,)), dtype=object) for _ in range(6)]

    def const(x):
        return arith.constant(f32, ir.FloatAttr.get(f32, float(x)))

    for m in range(2):
        for h in range(2):
            i = _ix(arith.addi(base, c32(2 * m + h)))

            def load(row):
                return arith.extf(f32, memref.load(sc, [_ix(c32(row)), i]))

            tau, av, zv, sig = load(S_TAU), load(S_AV), load(S_ZV), load(S_SIG)
            vals = [arith.mulf(tau, const(2.0**24 if h == 0 else 2.0**20)), tau, av, zv,
                    arith.mulf(sig, const(2.0**(24 - 2 * (2 * m + h)))), sig]
            for o, v in zip(outs, vals):
                o[m, 0, h, 0, 0] = vector.broadcast(v1, v)
    return tuple(mgpu.FragmentedArray(_registers=o, _layout=layout_, _is_signed=None)
                 for o in outs)


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()),
                   return_type=(_COLV, _COLV))
def zq_col(ctx, q, sc, qn):
    """Per query row r (a thread holds r = 2 k, 2 k + 1): q_norm[r] * sum_d z_K[d] q[r, d]
    and q_norm[r]. Lane group g sums channels 16 g .. 16 g + 15, butterflies the rest."""
    f32 = ir.F32Type.get()
    v8h = ir.VectorType.get((8,), ir.F16Type.get())
    v8f = ir.VectorType.get((8,), f32)
    _, _, _, g, k = _thread()
    zqs, qns = [], []
    for rr in range(2):
        r = arith.addi(arith.muli(k, c32(2)), c32(rr))
        acc = None
        for half in range(2):
            d0 = arith.addi(arith.muli(g, c32(16)), c32(8 * half))
            qv = arith.extf(v8f, vector.load(v8h, q, [_ix(r), _ix(d0)]))
            zv = arith.extf(v8f, vector.load(v8h, sc, [_ix(c32(S_ZK)), _ix(d0)]))
            prod = arith.mulf(qv, zv)
            acc = prod if acc is None else arith.addf(acc, prod)
        dot = vector.reduction(f32, vector.CombiningKind.ADD, acc)
        for dist in (4, 8, 16):
            dot = arith.addf(dot, mu.shfl_bfly(dot, dist))
        norm = memref.load(qn, [_ix(r)])
        zqs.append(arith.mulf(dot, norm))
        qns.append(norm)
    res = []
    for vals in (zqs, qns):
        regs = np.empty(fa.WGMMA_COL_LAYOUT.registers_shape((8,)), dtype=object)
        regs[0, 0, 0] = vector.from_elements(ir.VectorType.get((2,), f32), vals)
        res.append(mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_COL_LAYOUT,
                                        _is_signed=None))
    return tuple(res)


@plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(B_OPERAND)))
def store_pt(ctx, p, pb):
    """The PV dot's B operand from p' [128 rows (token PERM[row]), 8] (fp16, accumulator
    layout): pb[r, t] = p'[INV_PERM[t], r], stored under B_OPERAND as in make_qb."""
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


# ---------------------------------------------------------------- the kernel


def _record_kernel(codes_hbm, f16_hbm, q_hbm, qn_hbm, table_ref, count_ref, o_ref, m_ref, l_ref,
                   codes_smem, f16_smem, q_smem, qn_smem, qb_smem, pb_smem, bars, qbar, *,
                   splits: int):
    """One warpgroup: the records of split program s of sequence b, KV head h (the first
    count_ref[b] entries of its row of table_ref), q_unit [8, D] and q_norm [8] from
    q_hbm / qn_hbm; out o [128 rows, 8], m, l [8] (see _record_partials)."""
    b = jax.lax.axis_index("b")
    h = jax.lax.axis_index("h")
    s = jax.lax.axis_index("s")
    n = count_ref[b]
    per = (n + splits - 1) // splits
    lo = jnp.minimum(s * per, n)
    hi = jnp.minimum(lo + per, n)

    plgpu.copy_gmem_to_smem(q_hbm.at[b, h], q_smem, qbar)
    plgpu.copy_gmem_to_smem(qn_hbm.at[b, h], qn_smem, qbar)

    def copy_record(i, stage):
        blk = table_ref[b, i]
        plgpu.copy_gmem_to_smem(codes_hbm.at[blk, h, pl.ds(0, 128)], codes_smem.at[stage],
                                bars.at[stage])
        plgpu.copy_gmem_to_smem(f16_hbm.at[blk, h, pl.ds(F16_FIRST, F16_ROWS)],
                                f16_smem.at[stage], bars.at[stage])

    @pl.when(lo < hi)
    def _():
        copy_record(lo, 0)

    plgpu.barrier_wait(qbar)

    def record(i, carry):
        m_run, l_acc, o_acc = carry
        stage = (i - lo) % STAGES

        @pl.when(i + 1 < hi)
        def _():
            copy_record(i + 1, 1 - stage)

        plgpu.barrier_wait(bars.at[stage])
        sc = f16_smem.at[stage]
        make_qb(q_smem, sc, qb_smem)
        plgpu.commit_smem()
        a_k = build_k(codes_smem.at[stage])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, a_k, qb_smem.T)
            return acc_ref[...]
        acc = pl.run_scoped(qk, plgpu.ACC((128, R), jnp.float32))  # row R: token PERM[R]
        taurs, tau, av, zv, chs, sig = row_vecs(sc)
        zqn, qn = zq_col(q_smem, sc, qn_smem)
        scores = acc * taurs[:, None] * qn[None, :] + tau[:, None] * zqn[None, :]
        m_new = jnp.maximum(m_run, jnp.max(scores, axis=0))
        alpha = jnp.exp(m_run - m_new)
        p = jnp.exp(scores - m_new[None, :])
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

    wg = plgpu.Layout.WGMMA
    init = (plgpu.layout_cast(jnp.full((R,), -jnp.inf, jnp.float32), wg.reduce(0)),
            plgpu.layout_cast(jnp.zeros((128, R), jnp.float32), wg),
            plgpu.layout_cast(jnp.zeros((128, R), jnp.float32), wg))
    m_run, l_acc, o_acc = jax.lax.fori_loop(lo, hi, record, init)
    o_ref[b, h, s] = o_acc
    m_ref[b, h, s] = m_run
    l_ref[b, h, s] = jnp.sum(l_acc, axis=0)  # l is summed over tokens once, at the end


def _record_partials(q_unit, q_norm, pages, table, counts, splits):
    """Per split: o [B, Hk, S, 128 rows (channel PERM[row]), 8] unnormalized, m, l [B, Hk,
    S, 8] (m natural-log base; -inf, l = 0 for a split without records)."""
    b, hk = q_unit.shape[:2]
    nb = pages.shape[0]
    halves = pages.reshape(nb, hk, RECORD_BYTES // 2, 2)
    codes = jax.lax.bitcast_convert_type(halves, jnp.int16).reshape(nb, hk, -1, 32)
    f16_rows = jax.lax.bitcast_convert_type(halves, jnp.float16).reshape(nb, hk, -1, 128)
    kernel = plgpu.kernel(
        functools.partial(_record_kernel, splits=splits),
        out_type=(jax.ShapeDtypeStruct((b, hk, splits, 128, R), jnp.float32),
                  jax.ShapeDtypeStruct((b, hk, splits, R), jnp.float32),
                  jax.ShapeDtypeStruct((b, hk, splits, R), jnp.float32)),
        grid=(b, hk, splits), grid_names=("b", "h", "s"),
        scratch_types=[plgpu.SMEM((STAGES, 128, 32), jnp.int16),
                       plgpu.SMEM((STAGES, F16_ROWS, 128), jnp.float16),
                       plgpu.SMEM((R, 128), jnp.float16),
                       plgpu.SMEM((R,), jnp.float32),
                       plgpu.SMEM((R, 128), jnp.float16, transforms=B_OPERAND),
                       plgpu.SMEM((R, 128), jnp.float16, transforms=B_OPERAND),
                       plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
                       plgpu.Barrier(num_arrivals=2)])
    return kernel(codes, f16_rows, q_unit, q_norm, table, counts)


# ---------------------------------------------------------------- the call


def record_table(block_to_slot: jax.Array, block_tables: jax.Array,
                 seq_lens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each sequence's blocks read from their records (no pool slot), in order, at the
    front of its row of a [B, M] table, and their count [B]. Such a block is full: only
    full blocks are quantized (DESIGN §4)."""
    b, width = block_tables.shape
    j = jnp.arange(width)[None, :]
    n_blocks = (seq_lens[:, None] + G - 1) // G
    slot = block_to_slot[jnp.maximum(block_tables, 0)]
    is_record = (j < n_blocks) & (slot < 0)
    where = jnp.where(is_record, jnp.cumsum(is_record, axis=1) - 1, width)  # width: dropped
    table = jnp.zeros_like(block_tables).at[jnp.arange(b)[:, None], where].set(
        block_tables, mode="drop")
    return table, jnp.sum(is_record, axis=1).astype(jnp.int32)


def _queries(q, group, scale):
    """q [B, 1, Hq, D] -> q_unit fp16 [B, Hk, 8, D] (rotated, scaled, |q_unit| <= 1; rows
    past the group zero) and q_norm float32 [B, Hk, 8]."""
    b, _, hq, d = q.shape
    qs = reference.rotate(q.astype(jnp.float32)).reshape(b, hq // group, group, d) * scale
    norm = jnp.sqrt(jnp.sum(qs * qs, axis=-1))
    unit = qs / jnp.where(norm > 0, norm, 1.0)[..., None]
    pad = ((0, 0), (0, 0), (0, R - group))
    return jnp.pad(unit, pad + ((0, 0),)).astype(jnp.float16), jnp.pad(norm, pad)


def _as_merge_partials(o, m, l, rows):
    """The record kernel's partials in pallas_attention.merge's format: o [B, Hk, S, rows,
    D] in channel order, m in base 2 (MASK for none), l, both [B, Hk, S, rows, 1]."""
    pad = ((0, 0),) * 3 + ((0, rows - R),)
    o = jnp.pad(jnp.swapaxes(o[:, :, :, INV_PERM, :], -1, -2), pad + ((0, 0),))
    m = jnp.maximum(m * pallas_attention.LOG2E, pallas_attention.MASK)
    return (o, jnp.pad(l, pad, constant_values=0.0)[..., None],
            jnp.pad(m, pad, constant_values=pallas_attention.MASK)[..., None])


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _attention(q, cache, block_tables, seq_lens, scale, splits, group):
    q_unit, q_norm = _queries(q, group, scale)
    table, counts = record_table(cache.block_to_slot, block_tables, seq_lens)
    rec = _record_partials(q_unit, q_norm, cache.pages, table, counts, splits)
    pool = pallas_attention.pool_partials(q, cache, block_tables, seq_lens, scale,
                                          interpret=False)
    rows = pool[0].shape[3]
    parts = [jnp.concatenate(x, axis=2) for x in zip(_as_merge_partials(*rec, rows), pool)]
    total = splits + 1  # the pool's partial last
    width = 1 << math.ceil(math.log2(total))
    pad = ((0, 0), (0, 0), (0, width - total), (0, 0), (0, 0))
    o, l, m = (jnp.pad(x, pad) for x in parts)
    return pallas_attention.merge(o, l, m, q, total, interpret=False)


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
    """Decode attention, q [B, 1, Hq, D] -> [B, 1, Hq, D] in q's dtype: the records with this
    module's kernel, the pool blocks with pallas_attention's, one merge. `splits`: of the
    records (default `num_splits`)."""
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
                      float(scale), int(splits), q.shape[2] // cache.num_kv_heads)
