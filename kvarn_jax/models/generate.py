"""Prefill, greedy decoding and teacher-forced scoring over a paged cache.

A `Session` holds a batch of sequences: their block tables (from a trivial allocator),
their lengths, and one cache per layer. Each model step is one jitted pure function of
(weights, tokens, caches, batch) with the caches donated, so the cache buffers are
updated in place; the Python loop only advances lengths and slot mappings.

Scoring runs in the decode regime: after the context's prefill, the continuation is fed
one token per step, so every tile is quantized as soon as it is full, as in serving, and
the log-probability of each token is read from the step before it.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvarn.format import layout
from kvarn_jax import cache as kvarn_cache
from kvarn_jax.models import paged_cache
from kvarn_jax.models.llama import AttentionOptions, Batch, LayerCache, Llama


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Which cache a session uses.

    kind: "kvarn" (quantized tiles + tail pool) or "paged" (raw pages, the baseline);
    dtype: the stored dtype (float16 or bfloat16; the KVarN pool and the baseline pages);
    preset: the KVarN preset; its tile is the block size of both kinds;
    sink_blocks, iters: KVarN cache parameters.
    """

    kind: str = "kvarn"
    dtype: str = "float16"
    preset: str = "kvarn_k4v2_g128"
    sink_blocks: int = 1
    iters: int = 8

    def __post_init__(self):
        if self.kind not in ("kvarn", "paged"):
            raise ValueError(f"cache kind must be 'kvarn' or 'paged'; got {self.kind!r}")


class BlockAllocator:
    """Hands out physical block ids from a free list (no sharing, no eviction)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"out of cache blocks: need {n}, {len(self._free)} free of "
                               f"{self.num_blocks}")
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, blocks: Sequence[int]) -> None:
        self._free.extend(int(b) for b in blocks if b >= 0)


def make_caches(model: Llama, spec: CacheSpec, *, num_blocks: int,
                pool_slots: int) -> list[LayerCache]:
    cfg = model.config
    dtype = jnp.dtype(spec.dtype)
    if spec.kind == "kvarn":
        return [kvarn_cache.init(num_blocks, cfg.num_kv_heads, cfg.head_dim,
                                 pool_slots=pool_slots, dtype=dtype, preset=spec.preset,
                                 sink_blocks=spec.sink_blocks, iters=spec.iters)
                for _ in range(cfg.num_layers)]
    tile = layout(spec.preset, cfg.head_dim).preset.tile
    return [paged_cache.init(num_blocks, cfg.num_kv_heads, cfg.head_dim, tile=tile, dtype=dtype)
            for _ in range(cfg.num_layers)]


def _select(h: jax.Array, query_lens: jax.Array, all_logits: bool) -> jax.Array:
    if all_logits:
        return h
    last = jnp.maximum(query_lens - 1, 0)  # each sequence's last new token
    return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "fresh", "opts", "all_logits"),
                   donate_argnames=("caches",))
def _model_step(graphdef, state, tokens, caches, batch: Batch, *, fresh: bool,
                opts: AttentionOptions, all_logits: bool):
    """One whole model step in one program (compile="step")."""
    model = nnx.merge(graphdef.value, state)
    h, caches = model(tokens, caches, batch, fresh=fresh, opts=opts)
    return model.logits(_select(h, batch.query_lens, all_logits)), caches


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, tokens, positions):
    return nnx.merge(graphdef.value, state).embed(tokens, positions)


@functools.partial(jax.jit, static_argnames=("graphdef", "fresh", "opts"),
                   donate_argnames=("cache",))
def _layer_step(graphdef, state, x, cos, sin, cache, batch: Batch, *, fresh: bool,
                opts: AttentionOptions):
    return nnx.merge(graphdef.value, state)(x, cos, sin, cache, batch, fresh=fresh, opts=opts)


@functools.partial(jax.jit, static_argnames=("graphdef", "all_logits"))
def _head(graphdef, state, x, query_lens, *, all_logits: bool):
    model = nnx.merge(graphdef.value, state)
    return model.logits(_select(model.norm(x), query_lens, all_logits))


def model_step(model_parts, tokens: jax.Array, caches: list[LayerCache], batch: Batch, *,
               fresh: bool, opts: AttentionOptions, all_logits: bool, compile: str
               ) -> tuple[jax.Array, list[LayerCache]]:
    """logits ([B, V], or [B, S, V] with all_logits) and the new caches; the caches
    passed in are donated (invalid afterwards).

    compile="step": the whole step is one jitted program (one dispatch; what a GPU
    wants). compile="layer": one jitted program per decoder layer, the same for every
    layer, so it compiles once instead of once per layer; a KVarN step carries the
    quantizer per layer and unrolled it compiles for about a minute on a small CPU.
    """
    graphdef, state, layers = model_parts
    if compile == "step":
        return _model_step(graphdef, state, tokens, caches, batch, fresh=fresh, opts=opts,
                           all_logits=all_logits)
    x, cos, sin = _embed(graphdef, state, tokens, batch.positions)
    out = []
    for (lg, ls), cache in zip(layers, caches):
        x, cache = _layer_step(lg, ls, x, cos, sin, cache, batch, fresh=fresh, opts=opts)
        out.append(cache)
    return _head(graphdef, state, x, batch.query_lens, all_logits=all_logits), out


class _Static:
    """A jit static argument with its hash computed once and identity checked first:
    hashing and comparing an NNX GraphDef walks the whole module tree, which costs more
    than a decode step when done for every layer call."""

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _Static) and (self.value is other.value
                                               or self.value == other.value)


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_model(model: Llama):
    """(graphdef, state, [(layer graphdef, layer state)]) for `model_step`; kept per model
    so sessions share the same static objects (cheap jit cache hits)."""
    if model not in _SPLITS:
        graphdef, state = nnx.split(model)
        layers = [nnx.split(layer) for layer in model.layers]
        # Every layer has the same structure: one graphdef (one compilation) for all.
        layer_def = _Static(layers[0][0])
        if any(g != layer_def.value for g, _ in layers[1:]):
            raise ValueError("decoder layers differ in structure")
        _SPLITS[model] = (_Static(graphdef), state, [(layer_def, st) for _, st in layers])
    return _SPLITS[model]


COMPILE_MODES = ("auto", "step", "layer")


def _compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}; got {mode!r}")
    if mode == "auto":
        return "layer" if jax.default_backend() == "cpu" else "step"
    return mode


class Session:
    """A batch of sequences stepping through one model with paged caches."""

    def __init__(self, model: Llama, batch_size: int, max_len: int, *,
                 cache: CacheSpec = CacheSpec(), opts: AttentionOptions = AttentionOptions(),
                 max_prompt_len: int | None = None, compile: str = "auto"):
        cfg = model.config
        if max_len > cfg.max_position:
            raise ValueError(f"max_len {max_len} exceeds the model's context "
                             f"{cfg.max_position}")
        self.parts = split_model(model)
        self.compile = _compile_mode(compile)
        self.spec, self.opts = cache, opts
        self.tile = g = layout(cache.preset, cfg.head_dim).preset.tile
        self.batch_size = batch_size
        blocks_per_seq = -(-max_len // g)
        self.allocator = BlockAllocator(batch_size * blocks_per_seq)
        self.block_tables = np.array([self.allocator.allocate(blocks_per_seq)
                                      for _ in range(batch_size)], np.int32)
        # A prefill holds every block of its prompts in the pool until its commit; decode
        # then holds sink + tail per sequence.
        prompt_blocks = -(-(max_prompt_len or max_len) // g)
        self.pool_slots = batch_size * max(2, cache.sink_blocks + 1, prompt_blocks)
        self.caches = make_caches(model, cache, num_blocks=self.allocator.num_blocks,
                                  pool_slots=self.pool_slots)
        if opts.mesh is not None:  # each device holds its KV heads of every layer
            from kvarn_jax.models import sharding
            self.caches = [sharding.shard_cache(c, opts.mesh) for c in self.caches]
        self.max_len = max_len
        self.seq_lens = np.zeros(batch_size, np.int32)

    def _slots(self, positions: np.ndarray, valid: np.ndarray) -> np.ndarray:
        g = self.tile
        blk = np.take_along_axis(self.block_tables, np.minimum(positions // g,
                                 self.block_tables.shape[1] - 1), axis=1)
        return np.where(valid, blk * g + positions % g, -1).astype(np.int32)

    def _run(self, tokens: np.ndarray, positions: np.ndarray, valid: np.ndarray,
             query_lens: np.ndarray, *, fresh: bool, all_logits: bool) -> jax.Array:
        seq_lens = self.seq_lens + query_lens
        if int(seq_lens.max()) > self.max_len:
            raise ValueError(f"a sequence would reach {int(seq_lens.max())} tokens; the "
                             f"session was sized for {self.max_len}")
        batch = Batch(positions=jnp.asarray(positions, jnp.int32),
                      slot_mapping=jnp.asarray(self._slots(positions, valid)),
                      block_tables=jnp.asarray(self.block_tables),
                      seq_lens=jnp.asarray(seq_lens, jnp.int32),
                      query_lens=jnp.asarray(query_lens, jnp.int32))
        logits, self.caches = model_step(self.parts, jnp.asarray(tokens, jnp.int32),
                                         self.caches, batch, fresh=fresh, opts=self.opts,
                                         all_logits=all_logits, compile=self.compile)
        self.seq_lens = seq_lens
        return logits

    def prefill(self, prompts: Sequence[Sequence[int]], *, all_logits: bool = False,
                chunk: int | None = None) -> jax.Array:
        """Fresh prompts (one per sequence, ragged, each >= 1 token) -> logits [B, V] of
        each prompt's last token, or [B, S, V] for every (right-padded) position.

        chunk: prefill at most this many tokens per sequence and step (chunked prefill,
        as a serving scheduler does); the first chunk is a fresh prompt, the rest extend
        it (`feed`). With `AttentionOptions(chunk_invariant=True)` the logits do not
        depend on the chunk size."""
        if len(prompts) != self.batch_size or self.seq_lens.any():
            raise ValueError(f"prefill takes {self.batch_size} prompts on a fresh session")
        lens = np.array([len(p) for p in prompts], np.int32)
        if lens.min() < 1:
            raise ValueError("every prompt needs at least one token")
        if chunk is not None:
            if not isinstance(chunk, int) or chunk < 1:
                raise ValueError(f"chunk must be a positive int or None; got {chunk!r}")
            if all_logits:
                raise ValueError("all_logits needs the whole prompt in one step (chunk=None)")
            if chunk < lens.max():
                return self._prefill_chunked(prompts, chunk)
        s = int(lens.max())
        tokens = np.zeros((self.batch_size, s), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        positions = np.broadcast_to(np.arange(s, dtype=np.int32), tokens.shape)
        valid = positions < lens[:, None]
        return self._run(tokens, positions, valid, lens, fresh=True, all_logits=all_logits)

    def _prefill_chunked(self, prompts: Sequence[Sequence[int]], chunk: int) -> jax.Array:
        last = self.prefill([p[:chunk] for p in prompts])
        for start in range(chunk, max(len(p) for p in prompts), chunk):
            pieces = [p[start:start + chunk] for p in prompts]
            logits = self.feed(pieces)
            ended = np.array([len(x) > 0 for x in pieces])  # each prompt's logits come
            last = jnp.where(jnp.asarray(ended)[:, None], logits, last)  # from its last piece
        return last

    def feed(self, tokens: Sequence[Sequence[int]]) -> jax.Array:
        """Append a ragged run of tokens to each sequence (a chunked-prefill continuation;
        an empty run adds nothing) in one step -> logits [B, V] after each sequence's last
        new token (meaningless where its run is empty)."""
        if len(tokens) != self.batch_size:
            raise ValueError(f"feed takes one token run per sequence ({self.batch_size}); "
                             f"got {len(tokens)}")
        qlens = np.array([len(t) for t in tokens], np.int32)
        s = max(1, int(qlens.max()))
        tok = np.zeros((self.batch_size, s), np.int32)
        for b, t in enumerate(tokens):
            tok[b, :len(t)] = t
        rows = np.arange(s, dtype=np.int32)[None, :]
        return self._run(tok, self.seq_lens[:, None] + rows, rows < qlens[:, None], qlens,
                         fresh=False, all_logits=False)

    def extend(self, tokens: Sequence[int] | np.ndarray,
               active: Sequence[bool] | np.ndarray | None = None) -> jax.Array:
        """Append one token per sequence (decode step) -> logits [B, V] after it.
        Inactive sequences add nothing; their logits are meaningless."""
        act = np.ones(self.batch_size, bool) if active is None else np.asarray(active, bool)
        tok = np.asarray(tokens, np.int32).reshape(self.batch_size)
        return self.feed([[int(t)] if a else [] for t, a in zip(tok, act)])

    def check(self) -> None:
        """Raise if the KVarN pool ran out of slots (tokens were dropped)."""
        if self.spec.kind != "kvarn":
            return
        dropped = [int(c.dropped_tokens) for c in self.caches]
        if any(dropped):
            raise RuntimeError(f"the KVarN tail pool ({self.pool_slots} slots for "
                               f"{self.batch_size} sequences) overflowed: tokens dropped per "
                               f"layer {dropped}")


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # [B, N] int32 greedy tokens
    logits: np.ndarray | None  # [B, N, V] float32: the logits each token was chosen from
    session: Session  # the caches and block tables after the last step


def generate(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             cache: CacheSpec = CacheSpec(), opts: AttentionOptions = AttentionOptions(),
             return_logits: bool = False, compile: str = "auto",
             prefill_chunk: int | None = None) -> Generation:
    """Greedy decoding of a batch of prompts for a fixed number of tokens (no early stop:
    sequences keep the same step count, which keeps comparisons simple). prefill_chunk:
    prefill at most this many prompt tokens per step (`Session.prefill`'s chunk)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    longest = max(len(p) for p in prompts)
    sess = Session(model, len(prompts), longest + max_new_tokens, cache=cache, opts=opts,
                   max_prompt_len=longest, compile=compile)
    logits = sess.prefill(prompts, chunk=prefill_chunk)
    out_tokens, out_logits = [], []
    for step in range(max_new_tokens):
        host = np.asarray(logits)
        tok = host.argmax(-1).astype(np.int32)
        out_tokens.append(tok)
        if return_logits:
            out_logits.append(host)
        if step + 1 < max_new_tokens:
            logits = sess.extend(tok)
    sess.check()
    return Generation(tokens=np.stack(out_tokens, axis=1),
                      logits=np.stack(out_logits, axis=1) if return_logits else None,
                      session=sess)


@dataclasses.dataclass
class Scores:
    logprobs: np.ndarray  # [B, N] float32 log p(continuation token | prefix), 0 where padded
    mask: np.ndarray  # [B, N] bool: real continuation tokens
    logits: np.ndarray | None  # [B, N, V] float32 logits each token was scored with
    session: Session


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))).astype(np.float32)


def score(model: Llama, contexts: Sequence[Sequence[int]],
          continuations: Sequence[Sequence[int]], *, cache: CacheSpec = CacheSpec(),
          opts: AttentionOptions = AttentionOptions(), return_logits: bool = False,
          compile: str = "auto") -> Scores:
    """Teacher-forced log-probs of each continuation after its context, in the decode
    regime: the context is prefilled, then the continuation is appended one token per
    step (so tiles are quantized as they fill, as in serving). Perplexity is
    exp(-mean(logprobs[mask]))."""
    if len(contexts) != len(continuations):
        raise ValueError("need one continuation per context")
    b = len(contexts)
    n = max(len(c) for c in continuations)
    clen = np.array([len(c) for c in continuations])
    cont = np.zeros((b, n), np.int32)
    for i, c in enumerate(continuations):
        cont[i, :len(c)] = c
    longest = max(len(c) for c in contexts)
    max_len = max(len(x) + len(c) for x, c in zip(contexts, continuations))
    sess = Session(model, b, max_len, cache=cache, opts=opts, max_prompt_len=longest,
                   compile=compile)
    logprobs = np.zeros((b, n), np.float32)
    kept = []
    logits = sess.prefill(contexts)
    for i in range(n):
        host = np.asarray(logits)
        lp = _log_softmax(host)
        logprobs[:, i] = lp[np.arange(b), cont[:, i]]
        if return_logits:
            kept.append(host)
        if i + 1 < n:
            # Feed token i only where token i + 1 is still to be scored.
            logits = sess.extend(cont[:, i], active=i + 1 < clen)
    sess.check()
    mask = np.arange(n)[None, :] < clen[:, None]
    return Scores(logprobs=np.where(mask, logprobs, 0.0).astype(np.float32), mask=mask,
                  logits=np.stack(kept, axis=1) if return_logits else None, session=sess)
