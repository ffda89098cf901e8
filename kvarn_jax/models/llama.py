"""A Llama/Qwen-family decoder in Flax NNX whose KV cache lives outside the modules.

The modules own only weights. Every attention layer takes its cache (one per layer) and
returns the updated one, so a whole model step is a pure function that can be jitted with
the caches donated and XLA updates them in place (see `kvarn_jax.models.generate`).

Two cache kinds share one code path (projections, RoPE, GQA, output projection, the
masking rules of `dense_attention`) and differ only in how K/V are written and read:

* `kvarn_jax.cache.KVarNCache`: the KVarN paged cache (fp16/bf16 tail pool + quantized
  records). Read by the Pallas kernel (`pallas_attention`, interpreted on the CPU, slow)
  or by the exact fp32 reference (`attention_reference`), chosen by `AttentionOptions`.
* `kvarn_jax.models.paged_cache.PagedCache`: raw fp16/bf16 pages with the same paging,
  the baseline that quantization is compared with.

A fresh prompt ("prefill", `fresh=True`) attends over its own raw K/V with plain dense
causal attention, then writes the cache; every later step ("extend": decode, or several
query rows over an existing context) first writes its tokens, then attends over the cache.
With `AttentionOptions(chunk_invariant=True)` a prompt too attends over the cache, and
every row reads the blocks before its own from their records (DESIGN §4's decode rule
for every row), so a sequence's logits do not depend on how its prompt was cut into steps.

Weights use Hugging Face's layout (rotate-half RoPE, q/k/v/o and gate/up/down
projections, RMSNorm scaling `w * norm(x)`), so logits match transformers' Llama/Qwen2/
Qwen3 implementations for the same weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvarn_jax import attention_reference, mosaic_attention, pallas_attention
from kvarn_jax import cache as kvarn_cache
from kvarn_jax.cache import KVarNCache
from kvarn_jax.models import paged_cache
from kvarn_jax.models.paged_cache import PagedCache

F32 = jnp.float32
# Accuracy work compares logits with transformers' fp32 model: keep fp32 matmuls exact on
# GPUs too (TF32 would otherwise be the default there).
PRECISION = jax.lax.Precision.HIGHEST

LayerCache = KVarNCache | PagedCache


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position: int = 8192
    tie_embeddings: bool = True
    attention_bias: bool = False  # Qwen2: biases on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of q and k before RoPE
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim; got {self.head_dim}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """Where the tokens of one step sit. B sequences, S token rows each (right-padded).

    positions [B, S] int32: RoPE position of each row;
    slot_mapping [B, S] int32: cache position block * G + offset, -1 for padding rows;
    block_tables [B, M] int32: physical block of each sequence's j-th block;
    seq_lens [B] int32: tokens in each sequence after this step;
    query_lens [B] int32: tokens this step adds (the last query_lens of seq_lens).
    """

    positions: jax.Array
    slot_mapping: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    query_lens: jax.Array


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Static choices of a step (hashable: a jit static argument).

    kvarn_attention: "reference" (exact fp32 jnp over the dequantized view; fast on CPU)
      or "pallas" (the fused kernels; interpreted on CPU, so slow there; decode steps
      that `mosaic_attention.applies` to read the records with the Mosaic GPU kernel).
    codec_impl: the rotate/quantize implementation for cache writes ("auto": Pallas on
      GPU, jnp reference elsewhere; both give the same bytes).
    pallas_splits: split-KV count of the Pallas kernel (None: its automatic choice).
    mesh: a `jax.sharding.Mesh` with axis "kv" (`sharding.kv_mesh()`): caches and
      attention split by KV head across its devices; None: one device.
    chunk_invariant: every row of a KVarN cache reads the blocks before its own from
      their records (sinks excepted) and its own block from the pool, whichever step
      filled them: a prompt prefilled at once, in chunks or token by token gives the same
      logits (up to float rounding). Prompts then attend over the cache, not over their
      raw K/V, and a step's blocks are quantized once more (`cache.snapshot`) ahead of
      the rows past them.
    """

    kvarn_attention: str = "reference"
    codec_impl: str = "auto"
    pallas_splits: int | None = None
    mesh: jax.sharding.Mesh | None = None
    chunk_invariant: bool = False

    def __post_init__(self):
        if self.kvarn_attention not in ("reference", "pallas"):
            raise ValueError(f"kvarn_attention must be 'reference' or 'pallas'; "
                             f"got {self.kvarn_attention!r}")


# ----------------------------------------------------------------------------- layers


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (Flax's layout, HF's weight transposed)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype=F32, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.matmul(x, self.kernel[...], precision=PRECISION)
        return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype=F32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in fp32 whatever the model dtype; the scale applies after casting
        # back, as HF does (so bf16 models round where theirs do).
        x32 = x.astype(F32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype=F32, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.embedding = nnx.Param(init(rngs.params(), (vocab, dim), dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied output head: h @ embedding.T."""
        return jnp.matmul(h, self.embedding[...].T, precision=PRECISION)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, S, head_dim] (fp32) for HF's rotate-half layout."""
    inv_freq = jnp.asarray(1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim)), F32)
    freqs = positions.astype(F32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, H, D]: channel i pairs with i + D/2 (HF's rotate_half)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rotated * s


# -------------------------------------------------------------------- attention core


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, seq_lens: jax.Array,
                    query_lens: jax.Array, *, scale: float, causal: bool = True) -> jax.Array:
    """Plain fp32 GQA attention. q [B, Sq, Hq, D] holds the last query_lens[b] of the
    seq_lens[b] tokens of each sequence; k, v [B, T, Hk, D] hold positions 0..T-1.
    Row i sits at position seq_len - query_len + i (the convention of
    `kvarn_jax.attention_reference`, so all cache kinds mask alike). -> [B, Sq, Hq, D] f32.
    """
    b, sq, hq, d = q.shape
    hk = k.shape[2]
    qg = q.astype(F32).reshape(b, sq, hk, hq // hk, d)
    s = jnp.einsum("bqhgd,bthd->bhgqt", qg, k.astype(F32), precision=PRECISION) * scale
    pos = jnp.arange(k.shape[1])
    row = (seq_lens - query_lens)[:, None] + jnp.arange(sq)[None, :]  # [B, Sq]
    limit = row + 1 if causal else jnp.broadcast_to(seq_lens[:, None], row.shape)
    mask = pos[None, None, :] < limit[:, :, None]  # [B, Sq, T]; position 0 always visible
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhgqt,bthd->bqhgd", p, v.astype(F32), precision=PRECISION)
    return out.reshape(b, sq, hq, d)


def _commit_tiles(cache: KVarNCache, batch_size: int, rows: int) -> int:
    """Tiles one commit may quantize: the commit always computes this many (padding
    included), so size it to what can actually become full, not to the pool."""
    return min(cache.pool_slots, batch_size * (-(-rows // cache.tile) + 1))


def write_cache(cache: LayerCache, k: jax.Array, v: jax.Array, batch: Batch, *, fresh: bool,
                opts: AttentionOptions) -> LayerCache:
    """Write this step's post-RoPE K/V [B, S, Hk, D] into the cache. A fresh prompt's full
    blocks are committed at once, except under chunk_invariant, whose prompt rows read
    their own blocks from the pool: there `commit_prompt` follows the attention."""
    b, s, hk, d = k.shape
    slots = batch.slot_mapping.reshape(b * s)
    if isinstance(cache, PagedCache):
        return paged_cache.append(cache, k.reshape(b * s, hk, d), v.reshape(b * s, hk, d), slots)
    if not isinstance(cache, KVarNCache):
        raise TypeError(f"unknown cache type {type(cache).__name__}")
    # The tail pool stores the rotation of the model-dtype values (the codec's contract);
    # cast first so an fp32 model writes what an fp16 one would.
    dt = cache.pool_k.dtype
    kf, vf = k.reshape(b * s, hk, d).astype(dt), v.reshape(b * s, hk, d).astype(dt)
    if not fresh:
        # Commit before append: blocks filled by earlier steps (all accepted) leave the
        # pool before this step's tokens claim slots, so 2 slots per sequence (sink + tail)
        # suffice, and this step's attention already reads them quantized, as in serving.
        cache = kvarn_cache.commit(cache, batch.block_tables, batch.seq_lens,
                                   batch.query_lens, max_tiles=_commit_tiles(cache, b, s),
                                   impl=opts.codec_impl)
    cache = kvarn_cache.append(cache, kf, vf, slots, impl=opts.codec_impl)
    if opts.chunk_invariant:
        if s > 1:  # one row per sequence fills no block ahead of itself
            cache = kvarn_cache.snapshot(cache, _filled_ahead(cache, batch, s),
                                         impl=opts.codec_impl)
        return cache
    return commit_prompt(cache, batch, opts) if fresh else cache


def commit_prompt(cache: LayerCache, batch: Batch, opts: AttentionOptions) -> LayerCache:
    """Prompt tokens are never speculative, so they count as accepted at once: their full
    blocks are quantized and their pool slots freed before decoding starts."""
    if isinstance(cache, PagedCache):
        return cache
    b, s = batch.slot_mapping.shape
    return kvarn_cache.commit(cache, batch.block_tables, batch.seq_lens,
                              jnp.zeros_like(batch.query_lens),
                              max_tiles=_commit_tiles(cache, b, s), impl=opts.codec_impl)


def _filled_ahead(cache: KVarNCache, batch: Batch, rows: int) -> jax.Array:
    """[B * ceil(rows / G)] the blocks this step writes that end before its last row's
    block (sinks excepted, -1 pads): chunk-invariant rows past them read their records."""
    g, bt = cache.tile, batch.block_tables
    first = (batch.seq_lens - batch.query_lens) // g
    last = (batch.seq_lens - 1) // g
    j = first[:, None] + jnp.arange(-(-rows // g))[None, :]
    ahead = (j < last[:, None]) & (j >= cache.sink_blocks) & (batch.query_lens[:, None] > 0)
    ids = jnp.take_along_axis(bt, jnp.minimum(j, bt.shape[1] - 1), axis=1)
    return jnp.where(ahead, ids, -1).reshape(-1)


def cached_attention(q: jax.Array, cache: LayerCache, batch: Batch, *, scale: float,
                     opts: AttentionOptions) -> jax.Array:
    """Attention of q [B, Sq, Hq, D] (already written to the cache) over the cache."""
    bt, lens, qlens = batch.block_tables, batch.seq_lens, batch.query_lens
    if isinstance(cache, PagedCache):
        k, v = paged_cache.gather_kv(cache, bt)
        return dense_attention(q, k, v, lens, qlens, scale=scale)
    if opts.kvarn_attention == "pallas":
        if (q.shape[1] == 1 and not opts.chunk_invariant and opts.pallas_splits is None
                and mosaic_attention.applies(q, cache)):  # decode on an sm_90+ GPU
            return mosaic_attention.attention(q, cache, bt, lens, softmax_scale=scale)
        return pallas_attention.attention(q, cache, bt, lens, qlens, softmax_scale=scale,
                                          splits=opts.pallas_splits,
                                          chunk_invariant=opts.chunk_invariant)
    return attention_reference.attention(q, cache, bt, lens, qlens, max_blocks=bt.shape[1],
                                         softmax_scale=scale,
                                         chunk_invariant=opts.chunk_invariant)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, cache: LayerCache, batch: Batch, *,
           fresh: bool, scale: float, opts: AttentionOptions) -> tuple[jax.Array, LayerCache]:
    """Attention for one layer and step; returns (out [B, S, Hq, D] f32, new cache)."""
    if opts.mesh is not None:
        from kvarn_jax.models import sharding
        return sharding.attend_sharded(_attend_local, q, k, v, cache, batch, fresh=fresh,
                                       scale=scale, opts=opts)
    return _attend_local(q, k, v, cache, batch, fresh=fresh, scale=scale, opts=opts)


def _attend_local(q: jax.Array, k: jax.Array, v: jax.Array, cache: LayerCache, batch: Batch,
                  *, fresh: bool, scale: float, opts: AttentionOptions
                  ) -> tuple[jax.Array, LayerCache]:
    if fresh and not opts.chunk_invariant:
        # A fresh prompt has no context in the cache: its raw K/V are the whole sequence.
        out = dense_attention(q, k, v, batch.seq_lens, batch.query_lens, scale=scale)
        return out, write_cache(cache, k, v, batch, fresh=True, opts=opts)
    cache = write_cache(cache, k, v, batch, fresh=fresh, opts=opts)
    out = cached_attention(q, cache, batch, scale=scale, opts=opts)
    return out, commit_prompt(cache, batch, opts) if fresh else cache


# --------------------------------------------------------------------------- modules


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype=F32, rngs: nnx.Rngs):
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        bias = cfg.attention_bias
        self.q_proj = Linear(h, cfg.num_heads * d, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * d, h, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype) if cfg.qk_norm else None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: LayerCache,
                 batch: Batch, *, fresh: bool, opts: AttentionOptions
                 ) -> tuple[jax.Array, LayerCache]:
        b, s, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).reshape(b, s, self.num_heads, d)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, d)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, cache = attend(q, k, v, cache, batch, fresh=fresh, scale=d ** -0.5, opts=opts)
        return self.o_proj(out.astype(x.dtype).reshape(b, s, self.num_heads * d)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype=F32, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, i, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(h, i, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(i, h, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype=F32, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, cache, batch, *, fresh, opts):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, cache, batch,
                                  fresh=fresh, opts=opts)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
    """The decoder. `__call__` returns the final-normed hidden states and the caches;
    `logits` applies the output head (fp32)."""

    def __init__(self, cfg: LlamaConfig, *, dtype=F32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if cfg.tie_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs))

    def __call__(self, tokens: jax.Array, caches: Sequence[LayerCache], batch: Batch, *,
                 fresh: bool, opts: AttentionOptions = AttentionOptions()
                 ) -> tuple[jax.Array, list[LayerCache]]:
        """tokens [B, S] int32 -> hidden [B, S, H], updated caches (one per layer)."""
        if len(caches) != len(self.layers):
            raise ValueError(f"need one cache per layer ({len(self.layers)}); got {len(caches)}")
        x, cos, sin = self.embed(tokens, batch.positions)
        out = []
        # An unrolled Python loop (not a scan) keeps each layer's cache update in place.
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, cos, sin, cache, batch, fresh=fresh, opts=opts)
            out.append(cache)
        return self.norm(x), out

    def embed(self, tokens: jax.Array, positions: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Token embeddings [B, S, H] and the RoPE tables every layer shares."""
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        return self.embed_tokens(tokens), cos, sin

    def logits(self, h: jax.Array) -> jax.Array:
        y = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return y.astype(F32)


# --------------------------------------------------------------------------- weights


def _param(model: Llama, hf_name: str) -> tuple[nnx.Variable, bool]:
    """The Variable an HF tensor name maps to, and whether the weight is transposed."""
    parts = hf_name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    node = model
    i = 0
    while i < len(parts) - 1:
        p = parts[i]
        node = node[int(p)] if p.isdigit() else getattr(node, p)
        i += 1
    leaf = parts[-1]
    if isinstance(node, Linear):
        return (node.kernel, True) if leaf == "weight" else (node.bias, False)
    if isinstance(node, Embed):
        return node.embedding, False
    if isinstance(node, RMSNorm):
        return node.weight, False
    raise KeyError(hf_name)


def from_weights(cfg: LlamaConfig, weights: Mapping[str, np.ndarray], *, dtype=F32) -> Llama:
    """Build the model from HF-named, HF-layout weights without a random init."""
    model = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    for name, w in weights.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        try:
            var, transpose = _param(model, name)
        except (KeyError, AttributeError, IndexError, TypeError):
            raise ValueError(f"weight {name!r} has no place in the model") from None
        w = np.asarray(w).T if transpose else np.asarray(w)
        if var is None or tuple(var.get_value().shape) != w.shape:
            raise ValueError(f"weight {name!r}: shape {w.shape} does not fit the model")
        var.set_value(jnp.asarray(w, dtype))
    missing = [jax.tree_util.keystr(path) for path, x in
               jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
               if isinstance(x, jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"weights missing for {missing[:5]} ({len(missing)} in all)")
    return model
