"""Teacher-forced scoring in the decode regime, one tile of tokens per model step.

Serving commits (quantizes) a tile as soon as it is full, before the step that appends the
next token, and keeps the sink tile in the pool. So when token p is decoded it reads tiles
[sink, p // G) quantized, the sink and its own tile raw (fp16). Feeding a whole tile of G
tokens per step, with causal attention inside the tile, gives every token exactly that
view: the same computation as G decode steps, G times fewer steps. Windows of text are
batched along B.

Quantization is applied to the K/V the model wrote to its fp16 cache, by any tile
quantize-dequantize `kv_quant.Method` (KVarN's real codec or an emulated baseline), at the
moment the schedule commits the tile. The K/V store of every layer is kept twice, raw fp16
and quantized-dequantized fp32; each step reads, per tile, the copy the schedule says.
`tests/test_accuracy_eval.py` checks this against the real KVarN cache stepped one token
at a time (`generate.score`).

Layers run under `lax.scan` (one compiled layer body instead of 30 unrolled ones), and the
step is the same program for every method: only the small quantize-dequantize function
compiles per method. On the model run, the fp16 reference's Q/K/V of window 0 can be
captured for the per-layer attention-output error (`attention_error`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvarn_jax.models.kv_quant import Method
from kvarn_jax.models.llama import PRECISION, Llama, apply_rope

F32 = jnp.float32
SCHEDULES = ("decode", "prefill_only", "prefill_decode")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which tiles are read quantized while tile c is being processed.

    decode: tiles [sink, c) (serving: each tile committed as soon as it is full);
    prefill_decode: nothing before tile `prefill_tiles` (a prefill over raw K/V), then as
      decode (the prefill's tiles committed at once, later ones as they fill);
    prefill_only: nothing before `prefill_tiles`, then only the prefill's tiles (later
      tokens never quantized: how "quantize the prompt once" evaluations measure).
    """

    kind: str = "decode"
    prefill_tiles: int = 0
    sink_tiles: int = 1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {self.kind!r}")

    def quantized(self, c: int, n_tiles: int) -> np.ndarray:
        """[n_tiles] bool: tiles read quantized by tile c's tokens."""
        if self.kind == "decode":
            upto = c
        elif c < self.prefill_tiles:
            upto = 0
        else:
            upto = self.prefill_tiles if self.kind == "prefill_only" else c
        j = np.arange(n_tiles)
        return (j >= self.sink_tiles) & (j < upto)


class _Static:
    """A hashable wrapper (hashed once) for NNX graphdefs as jit static arguments."""

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _Static) and (self.value is other.value or self.value == other.value)


def _chunk_attention(q, k_ctx, v_ctx, k_new, v_new, start, scale):
    """q [B, G, Hq, D] at positions start..start+G-1 over the context k/v_ctx [B, T, Hk, D]
    (positions < start visible) and the chunk's own k/v_new [B, G, Hk, D] (causal)."""
    b, g, hq, d = q.shape
    hk = k_ctx.shape[2]
    qg = q.astype(F32).reshape(b, g, hk, hq // hk, d)
    s_ctx = jnp.einsum("bqhgd,bthd->bhgqt", qg, k_ctx, precision=PRECISION) * scale
    s_new = jnp.einsum("bqhgd,bthd->bhgqt", qg, k_new.astype(F32), precision=PRECISION) * scale
    ctx_ok = jnp.arange(k_ctx.shape[1]) < start
    new_ok = jnp.arange(g)[None, :] <= jnp.arange(g)[:, None]  # [query, key]
    s = jnp.concatenate([jnp.where(ctx_ok, s_ctx, -jnp.inf),
                         jnp.where(new_ok, s_new, -jnp.inf)], axis=-1)
    p = jax.nn.softmax(s, axis=-1)
    t = k_ctx.shape[1]
    out = (jnp.einsum("bhgqt,bthd->bqhgd", p[..., :t], v_ctx, precision=PRECISION)
           + jnp.einsum("bhgqt,bthd->bqhgd", p[..., t:], v_new.astype(F32), precision=PRECISION))
    return out.reshape(b, g, hq, d)


def _layer(layer, x, cos, sin, ks, vs, kqs, vqs, qmask, start, cache_dtype):
    """One decoder layer over a chunk; returns (x, the chunk's fp16 K/V, its Q)."""
    att = layer.self_attn
    b, s, _ = x.shape
    d = att.head_dim
    h = layer.input_layernorm(x)
    q = att.q_proj(h).reshape(b, s, att.num_heads, d)
    k = att.k_proj(h).reshape(b, s, att.num_kv_heads, d)
    v = att.v_proj(h).reshape(b, s, att.num_kv_heads, d)
    if att.q_norm is not None:
        q, k = att.q_norm(q), att.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # What the fp16 cache holds; this step's own tokens are read from it too, as the
    # paged and KVarN caches do (append, then attend).
    k16, v16 = k.astype(cache_dtype), v.astype(cache_dtype)
    sel = qmask[None, :, None, None]
    k_ctx = jnp.where(sel, kqs, ks.astype(F32))
    v_ctx = jnp.where(sel, vqs, vs.astype(F32))
    out = _chunk_attention(q, k_ctx, v_ctx, k16, v16, start, d ** -0.5)
    x = x + att.o_proj(out.astype(x.dtype).reshape(b, s, att.num_heads * d))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, k16, v16, q


@functools.partial(jax.jit, static_argnames=("graphdef", "layer_def"),
                   donate_argnames=("k_store", "v_store"))
def _step(graphdef, layer_def, state, layers, tokens, targets, c, qmask, k_store, v_store,
          kq_store, vq_store, ref_logp):
    """One tile of every window. Stores [L, B, T, Hk, D]; tokens/targets [B, G]."""
    model = nnx.merge(graphdef.value, state)
    b, g = tokens.shape
    start = c * g
    positions = jnp.broadcast_to(start + jnp.arange(g, dtype=jnp.int32), (b, g))
    x, cos, sin = model.embed(tokens, positions)

    def body(x, xs):
        ls, ks, vs, kqs, vqs = xs
        x, k, v, q = _layer(nnx.merge(layer_def.value, ls), x, cos, sin, ks, vs, kqs, vqs,
                            qmask, start, k_store.dtype)
        return x, (k, v, q[0])

    x, (k_new, v_new, q0) = jax.lax.scan(body, x, (layers, k_store, v_store, kq_store, vq_store))
    logp = jax.nn.log_softmax(model.logits(model.norm(x)), axis=-1)  # [B, G, V]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    agree = jnp.argmax(logp, -1) == jnp.argmax(ref_logp, -1)
    at = (0, 0, start, 0, 0)
    k_store = jax.lax.dynamic_update_slice(k_store, k_new, at)
    v_store = jax.lax.dynamic_update_slice(v_store, v_new, at)
    return logp, nll, kl, agree, k_store, v_store, k_new, v_new, q0


@functools.partial(jax.jit, static_argnames=("method",))
def _qdq(method: Method, k, v):
    """[..., G, Hk, D] fp16 tiles -> quantize-dequantized fp32, leading axes flattened."""
    flat = (-1,) + k.shape[-3:]
    kq, vq = method.fn(k.reshape(flat), v.reshape(flat))
    return kq.reshape(k.shape), vq.reshape(v.shape)


@functools.partial(jax.jit, donate_argnames=("kq_store", "vq_store"))
def _write(kq_store, vq_store, kq, vq, start):
    at = (0, 0, start, 0, 0)
    return (jax.lax.dynamic_update_slice(kq_store, kq, at),
            jax.lax.dynamic_update_slice(vq_store, vq, at))


@dataclasses.dataclass
class Run:
    """Per-token results [B, T] (position p predicts token p + 1) and the last stores."""

    nll: np.ndarray
    kl: np.ndarray
    agree: np.ndarray
    k_store: jax.Array  # [L, B, T, Hk, D] fp16: what the fp16 cache held
    v_store: jax.Array
    q0: jax.Array | None  # [L, T, Hq, D] fp32: window 0's queries (capture runs only)
    logp: list | None  # per-chunk log-probs [B, G, V] (reference runs only)


class Evaluator:
    """Scores B windows of T tokens (plus one target each) through `model`."""

    def __init__(self, model: Llama, windows: np.ndarray, *, cache_dtype=jnp.float16):
        cfg = model.config
        self.cfg = cfg
        self.windows = np.asarray(windows, np.int32)  # [B, T + 1]
        self.batch, self.length = self.windows.shape[0], self.windows.shape[1] - 1
        graphdef, self.state = nnx.split(model)
        layer_splits = [nnx.split(layer) for layer in model.layers]
        if any(g != layer_splits[0][0] for g, _ in layer_splits[1:]):
            raise ValueError("decoder layers differ in structure; cannot scan over them")
        self.graphdef, self.layer_def = _Static(graphdef), _Static(layer_splits[0][0])
        self.layers = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s in layer_splits])
        self.cache_dtype = jnp.dtype(cache_dtype)

    def _stores(self):
        c = self.cfg
        shape = (c.num_layers, self.batch, self.length, c.num_kv_heads, c.head_dim)
        return (jnp.zeros(shape, self.cache_dtype), jnp.zeros(shape, self.cache_dtype),
                jnp.zeros(shape, F32), jnp.zeros(shape, F32))

    def run(self, method: Method | None, schedule: Schedule = Schedule(), *, tile: int = 128,
            ref: Run | None = None, keep_logp: bool = False, capture: bool = False) -> Run:
        """method None: the fp16 cache (nothing quantized). `ref` (a run with keep_logp)
        gives the distributions KL and top-1 agreement are measured against."""
        g = method.tile if method is not None else tile
        if self.length % g:
            raise ValueError(f"window length {self.length} is not a multiple of the tile {g}")
        n = self.length // g
        ref_g = None if ref is None else ref.logp[0].shape[1]
        if ref_g is not None and ref_g % g:
            raise ValueError(f"reference chunks of {ref_g} tokens cannot be cut into {g}")
        vocab = self.cfg.vocab_size
        k_store, v_store, kq_store, vq_store = self._stores()
        nll, kl, agree, q0s, logps = [], [], [], [], []
        zeros_ref = jnp.zeros((self.batch, g, vocab), F32)
        for c in range(n):
            tokens = jnp.asarray(self.windows[:, c * g:(c + 1) * g])
            targets = jnp.asarray(self.windows[:, c * g + 1:(c + 1) * g + 1])
            # Without a method nothing is quantized, whatever the schedule.
            quantized = schedule.quantized(c, n) & (method is not None)
            qmask = jnp.asarray(np.repeat(quantized, g))
            if ref is None:
                ref_logp = zeros_ref
            else:
                per = ref_g // g
                ref_logp = ref.logp[c // per][:, (c % per) * g:(c % per + 1) * g]
            logp, a, b, d, k_store, v_store, k_new, v_new, q0 = _step(
                self.graphdef, self.layer_def, self.state, self.layers, tokens, targets,
                jnp.int32(c), qmask, k_store, v_store, kq_store, vq_store, ref_logp)
            if method is not None:
                kq, vq = _qdq(method, k_new, v_new)
                kq_store, vq_store = _write(kq_store, vq_store, kq, vq, jnp.int32(c * g))
            nll.append(a), kl.append(b), agree.append(d)
            if capture:
                q0s.append(q0)
            if keep_logp:
                logps.append(logp)
        return Run(nll=np.concatenate([np.asarray(x) for x in nll], axis=1),
                   kl=np.concatenate([np.asarray(x) for x in kl], axis=1),
                   agree=np.concatenate([np.asarray(x) for x in agree], axis=1),
                   k_store=k_store, v_store=v_store,
                   q0=jnp.concatenate(q0s, axis=1) if capture else None,
                   logp=logps if keep_logp else None)


# --------------------------------------------------------------- attention-output error


def quantize_layers(method: Method, k: jax.Array, v: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """Quantize-dequantize every tile of k, v [L, T, Hk, D] (fp16), `group` tiles per
    layer per call: the shape of the model run's calls ([L, B, G, ...]), so the compiled
    quantizer is reused."""
    lyr, t, hk, d = k.shape
    g = method.tile
    n = t // g
    pad = -n % group

    def tiles(x):
        x = x.reshape(lyr, n, g, hk, d)
        return jnp.concatenate([x, jnp.zeros((lyr, pad, g, hk, d), x.dtype)], axis=1)

    kt, vt = tiles(k), tiles(v)
    outs = [_qdq(method, kt[:, i:i + group], vt[:, i:i + group]) for i in range(0, n + pad, group)]
    kq = jnp.concatenate([o[0] for o in outs], axis=1)[:, :n].reshape(lyr, t, hk, d)
    vq = jnp.concatenate([o[1] for o in outs], axis=1)[:, :n].reshape(lyr, t, hk, d)
    return kq, vq


@functools.partial(jax.jit, static_argnames=("tile", "sink_tiles", "block"))
def attention_error(q, k, v, kq, vq, *, tile: int, sink_tiles: int = 1, block: int = 512):
    """Relative L2 error [L, T, Hq] of each query's attention output when it reads tiles
    [sink, own tile) quantized (kq, vq) instead of fp16 (k, v), decode schedule.
    q [L, T, Hq, D] f32; k, v [L, T, Hk, D] fp16; kq, vq f32."""
    lyr, t, hq, d = q.shape
    hk = k.shape[2]
    scale = d ** -0.5
    pos = jnp.arange(t)

    def one_layer(args):
        ql, kl, vl, kql, vql = args
        kl, vl = kl.astype(F32), vl.astype(F32)
        errs = []
        for s0 in range(0, t, block):  # query blocks bound the score memory
            qb = ql[s0:s0 + block].reshape(-1, hk, hq // hk, d)
            p = pos[s0:s0 + block]
            causal = pos[None, :] <= p[:, None]  # [query, key]
            use_q = ((pos[None, :] // tile < p[:, None] // tile)
                     & (pos[None, :] // tile >= sink_tiles))
            s_raw = jnp.einsum("qhgd,thd->hgqt", qb, kl, precision=PRECISION) * scale
            s_qnt = jnp.einsum("qhgd,thd->hgqt", qb, kql, precision=PRECISION) * scale
            ref = jax.nn.softmax(jnp.where(causal, s_raw, -jnp.inf), axis=-1)
            mix = jax.nn.softmax(jnp.where(causal, jnp.where(use_q, s_qnt, s_raw), -jnp.inf), -1)
            o_ref = jnp.einsum("hgqt,thd->qhgd", ref, vl, precision=PRECISION)
            o_mix = (jnp.einsum("hgqt,thd->qhgd", jnp.where(use_q, mix, 0), vql, precision=PRECISION)
                     + jnp.einsum("hgqt,thd->qhgd", jnp.where(use_q, 0, mix), vl, precision=PRECISION))
            err = jnp.linalg.norm(o_mix - o_ref, axis=-1) / jnp.maximum(
                jnp.linalg.norm(o_ref, axis=-1), 1e-12)
            errs.append(err.reshape(-1, hq))
        return jnp.concatenate(errs, axis=0)

    return jax.lax.map(one_layer, (q, k, v, kq, vq))
