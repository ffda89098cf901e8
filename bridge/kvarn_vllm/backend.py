"""The kvarn attention backend for vLLM: metadata builder and impl side by side.

Decoder self-attention over a paged KVarN cache (DESIGN §4-§5):
* `do_kv_cache_update` rotates the step's K/V into the layer's tail pool (slots were
  given out by the builder), graph-safe;
* `forward` runs the fused Triton kernel of `kvarn_torch.triton_attention` over the
  quantized records and pool blocks: decode rows, speculative-verify rows and short
  chunked-prefill continuations (multi-query rows, causal). Where vLLM's FlashAttention
  is there, a fresh prompt (no cached context) attends over its own raw K/V with it, and
  a long continuation over its context gathered dense by `kvarn_torch.triton_gather`
  (rotated q in, output rotated back);
* the builder, once per step and outside CUDA graphs, runs `lifecycle.PoolGroup.step`:
  release finished requests, commit accepted full blocks, give slots to new blocks;
* the blocks that FlashAttention's prompt rows open and fill in one step never take a
  slot: `forward` quantizes them straight from the step's K/V (`cache.write_blocks`),
  so the pool needs no room for a step's prompt tokens (`direct_prompts_only`).

With KVARN_CHUNK_INVARIANT=1 (`settings.chunk_invariant`; the default under vLLM's
VLLM_BATCH_INVARIANT=1) every row reads the blocks before its own from their records and
its own block raw, so results do not depend on how a sequence was cut into steps:
`forward` first writes the records of the blocks this step filled (`cache.snapshot` for
those an earlier step began, their slots kept until the commit), and prompt rows run
FlashAttention block by block over the records of the earlier blocks (dequantized once,
`triton_gather`) and their own block from the pool or, for a block they open and fill,
from their K/V, a step's consecutive prompts in one call (`blockwise_run`).

The KV-cache tensor of a layer is its pages, uint8 [num_blocks, num_kv_heads,
record_bytes]; the tail pool lives beside it, allocated with the weights so vLLM counts
it before sizing the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import ClassVar

import torch

from kvarn_torch import cache as kvcache
from kvarn_torch import codec
from kvarn_torch import gluon_attention, triton_attention, triton_gather, warmup
from kvarn_torch.cache import KVarNCache
from kvarn_vllm import lifecycle, settings
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

log = logging.getLogger("kvarn_vllm")


def _current_kvarn_dtype(cache_dtype_str: str | None = None) -> str:
    if settings.is_kvarn(cache_dtype_str):
        return cache_dtype_str
    name = get_current_vllm_config().cache_config.cache_dtype
    if not settings.is_kvarn(name):
        raise RuntimeError(f"the kvarn backend runs only with a kvarn kv-cache dtype; the "
                           f"current configuration has {name!r}")
    return name


class KVarNAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(settings.DTYPES)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # the registry slot vLLM keeps for out-of-tree backends

    @staticmethod
    def get_impl_cls() -> type[KVarNAttentionImpl]:
        return KVarNAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVarNMetadataBuilder]:
        return KVarNMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int, cache_dtype_str: str = "auto") -> tuple[int, ...]:
        dtype = _current_kvarn_dtype(cache_dtype_str)
        return (num_blocks, num_kv_heads, settings.record_bytes(dtype, head_size))

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int]:
        return sorted({settings.tile(d) for d in settings.DTYPES})

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return settings.tile(_current_kvarn_dtype())

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(settings.HEAD_DIMS)

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype in settings.DTYPES

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        """VLLM_BATCH_INVARIANT=1: with the chunk-invariant reads (on by default then) a
        row's kernels and split points do not depend on the batch."""
        return settings.chunk_invariant()

    @classmethod
    def validate_configuration(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla,
                               has_sink, use_sparse, use_mm_prefix, use_per_head_quant_scales,
                               device_capability, attn_type, has_sliding_window=False,
                               **kwargs) -> list[str]:
        """vLLM's generic reasons, replaced by ours where we can name the fix."""
        ours = settings.layer_problems(
            kv_cache_dtype, head_size, block_size,
            model_dtype_ok=dtype in cls.supported_dtypes, use_mla=use_mla,
            sliding_window=has_sliding_window,
            attn_type="decoder" if attn_type == AttentionType.DECODER else str(attn_type),
            batch_invariant=bool(kwargs.get("use_batch_invariant", False)))
        generic = super().validate_configuration(
            head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse,
            use_mm_prefix, use_per_head_quant_scales, device_capability, attn_type,
            has_sliding_window, **kwargs)
        covered = ("head_size", "dtype", "kv_cache_dtype", "block_size", "MLA", "sliding",
                   "attention type", "batch invariance")
        return ours + [r for r in generic if not any(c in r for c in covered)]


@dataclasses.dataclass
class KVarNMetadata(AttentionMetadata):
    # Views of vLLM's persistent buffers only: a captured CUDA graph reads them at replay.
    seq_lens: torch.Tensor  # [B] tokens in the cache, this step's included
    query_start_loc: torch.Tensor  # [B + 1]
    block_table: torch.Tensor  # [B, max_blocks]
    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    uniform_query_len: int  # > 0: every request has this many query tokens (decode/verify)
    num_decodes: int  # leading requests with one query token (vLLM orders them first)
    runs: list[Run]  # a mixed batch's requests after the decodes, one launch each
    chunk_invariant: bool = False  # settings.chunk_invariant
    # chunk_invariant steps with multi-query rows: the blocks their rows fill (records
    # written ahead, `cache.snapshot`); -1 pads
    snapshot_blocks: torch.Tensor | None = None
    # prompt blocks this step opens and fills (`KVarNMetadataBuilder._direct_blocks`):
    # their first tokens in the batch and physical ids, written straight to their records
    direct_starts: torch.Tensor | None = None
    direct_blocks: torch.Tensor | None = None

    def query_lens(self) -> torch.Tensor:
        return self.query_start_loc[1:] - self.query_start_loc[:-1]


@dataclasses.dataclass(frozen=True)
class Run:
    """Requests [r0, r1) of a mixed batch that one launch serves, tokens [start, end):
    consecutive fresh prompts (causal over their own raw K/V, one varlen FlashAttention
    call), consecutive chunk-invariant prompt rows (`blockwise_run`), or a single other
    request (verify rows, a prefill continuation)."""
    fresh: bool
    r0: int
    r1: int
    start: int
    end: int
    max_len: int
    cu: torch.Tensor | None = None  # fresh and dense runs: [0, ...] query offsets (device)
    # A long prefill continuation: its first `dense_blocks` blocks gathered dense (in the
    # model's frame) for one FlashAttention call over keys [0, seq_len), `cu_k` =
    # [0, seq_len] on the device.
    dense_blocks: int = 0
    cu_k: torch.Tensor | None = None
    raw_from: int = -1  # >= 0: the chunk's first position; its K/V replace what was gathered
    # chunk_invariant prompt rows of consecutive requests (`blockwise_run`): one
    # FlashAttention sequence per block the rows lie in, `cu` their query offsets, over
    # the pages `page_blocks` (physical ids on the device, one gather launch): the first
    # `page_records` read from their records (each request's earlier blocks past the
    # sinks), the rest as stored (the sinks and the rows' own blocks)
    blockwise: bool = False
    seqused_k: torch.Tensor | None = None
    page_table: torch.Tensor | None = None
    page_blocks: torch.Tensor | None = None
    page_records: int = 0
    max_keys: int = 0
    # blocks the rows open and fill (records only): their own pages, and the rows of their
    # first tokens (from the run's first row)
    raw_pages: torch.Tensor | None = None
    raw_rows: torch.Tensor | None = None


# From this many query tokens on, a prefill continuation runs FlashAttention over its
# context gathered dense (`triton_gather`) instead of the paged kernel, whose programs of
# 64 query rows each re-read and re-dequantize the whole context: on an H100, a 2048-token
# chunk over 8K tokens takes 2.5 ms there vs 0.36 ms in FlashAttention
# (benchmarks/results/chunk_attention_h100.json).
DENSE_MIN_QUERY = 128
# Contexts up to this many tokens only: the dense copy is a transient outside vLLM's memory
# profile (256 MiB for K and V at 8 KV heads x 128 x fp16).
DENSE_MAX_TOKENS = 65536


def direct_prompts_only(flash_attention: bool, tile: int, max_model_len: int,
                        speculative_tokens: int) -> bool:
    """Whether every block a step opens and fills goes straight to its record (so the pool
    needs no room for a step's prompt blocks): FlashAttention serves every row run that
    fills a block over its raw K/V (`KVarNMetadataBuilder.raw_prompt`), with contexts of
    at most DENSE_MAX_TOKENS and verify windows shorter than a tile, and, with default
    reads (the kernel serves continuations shorter than DENSE_MIN_QUERY), tiles of at
    least DENSE_MIN_QUERY tokens."""
    return (flash_attention and max_model_len <= DENSE_MAX_TOKENS
            and 1 + speculative_tokens < tile
            and (settings.chunk_invariant() or tile >= DENSE_MIN_QUERY))


def on_finish(vllm_config) -> lifecycle.OnFinish:
    """What becomes of finished requests' blocks (`lifecycle.OnFinish`): a KV connector
    reads the records of every full block; prefix caching reads them through our own
    attention, which finds a retired sink in the pool, unquantized as its writer read it
    (chunk-invariant reads need that of every sink); otherwise nothing reads them. Prefix
    caching None (not decided yet) takes the safe side. Retired sinks hold slots beyond
    the pool's sizing, freed when the host mirror sees a step short of slots; with
    speculative decoding too: the GPU then counts the tiles to quantize, but the mirror
    still follows every slot (the scheduler replays with ngram drafts and rejections)."""
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        return "quantize"
    if vllm_config.cache_config.enable_prefix_caching is not False:
        return "retire_sinks"
    return "drop"


def blockwise_tables(start: int, rows: int,
                     tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query positions start .. start + rows - 1 of one sequence as one FlashAttention
    sequence per block they lie in: int32 (query offsets [n + 1], keys each sequence sees
    [n], page tables [n, last + 1]) over pages [the records of blocks 0 .. last - 1, then
    the blocks first .. last as stored] (first, last: the blocks of the first and last
    row). Aligned at its end, FlashAttention's causal mask then gives each row the earlier
    blocks' records and its own block up to itself. (Host tensors, no Python loop: a 64K
    context has 512 blocks.)"""
    first, last = start // tile, (start + rows - 1) // tile
    j = torch.arange(first, last + 1, dtype=torch.int32)  # the blocks the rows lie in
    ends = torch.clamp((j + 1) * tile, max=start + rows)  # past each block's last row
    cu = torch.nn.functional.pad(ends - start, (1, 0))
    page = torch.arange(last + 1, dtype=torch.int32)[None, :]
    tables = torch.where(page < j[:, None], page, last + j[:, None] - first)  # own block last
    return cu, ends, tables


def blockwise_run(group: list[tuple[Run, int]], block_table: torch.Tensor, tile: int,
                  sink_blocks: int, direct: bool = False) -> Run:
    """One launch for the chunk-invariant prompt rows of consecutive requests (`group`:
    each request's run and sequence length): each request's `blockwise_tables`, its
    pages laid out as [the records of every request's earlier blocks past the sinks,
    then every request's sinks and own blocks as stored], so one gather window reads
    the records. `direct`: the blocks the rows open and fill hold only their records
    (`KVarNMetadataBuilder._direct_blocks`); their own pages come from the rows' K/V
    (`raw_pages`, `raw_rows`)."""
    g = tile
    spans = [(run, seq, (seq - run.max_len) // g, (seq - 1) // g) for run, seq in group]
    rec_at = 0  # where the next request's records go
    pool_at = sum(max(0, last - sink_blocks) for *_, last in spans)
    records, stored, cus, seen, tables = [], [], [], [], []
    raw_pages, raw_rows = [], []
    for run, seq, first, last in spans:
        cu, ends, table = blockwise_tables(seq - run.max_len, run.max_len, g)
        sinks = min(sink_blocks, last)  # earlier blocks read as stored
        earlier = torch.where(table < sinks, pool_at + table, rec_at + table - sinks)
        tables.append(torch.where(table < last, earlier, pool_at + sinks + table - last))
        row = block_table[run.r0]
        records.append(row[sinks:last])
        stored += [row[:sinks], row[first: last + 1]]
        cus.append(cu[1:] + (run.start - spans[0][0].start))
        seen.append(ends)
        computed = seq - run.max_len
        if direct:
            for j in lifecycle.filled_in_step(computed, run.max_len, g, sink_blocks):
                raw_pages.append(pool_at + sinks + j - first)
                raw_rows.append(run.start - spans[0][0].start + j * g - computed)
        rec_at += last - sinks
        pool_at += sinks + last + 1 - first
    width = max(t.shape[1] for t in tables)
    table = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tables])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), *cus])
    dev = block_table.device
    head, tail = spans[0][0], spans[-1][0]
    raw = ([lifecycle.to_device(torch.tensor(x), dev) for x in (raw_pages, raw_rows)]
           if raw_pages else (None, None))
    return Run(False, head.r0, tail.r1, head.start, tail.end,
               int((cu[1:] - cu[:-1]).max()), cu=lifecycle.to_device(cu, dev),
               blockwise=True, seqused_k=lifecycle.to_device(torch.cat(seen), dev),
               page_table=lifecycle.to_device(table, dev),
               page_blocks=torch.cat(records + stored), page_records=rec_at,
               max_keys=max(last + 1 for *_, last in spans) * g,
               raw_pages=raw[0], raw_rows=raw[1])


def mixed_runs(starts: list[int], fresh: list[bool], first: int) -> list[Run]:
    """Group requests first.. of a batch (`starts` = query_start_loc, B + 1 host ints)
    into launches; requests without query tokens are skipped."""
    runs: list[Run] = []
    for r in range(first, len(fresh)):
        s, e = starts[r], starts[r + 1]
        if e == s:
            continue
        last = runs[-1] if runs else None
        if fresh[r] and last is not None and last.fresh and last.r1 == r:
            runs[-1] = Run(True, last.r0, r + 1, last.start, e, max(last.max_len, e - s))
        else:
            runs.append(Run(fresh[r], r, r + 1, s, e, e - s))
    return runs


class KVarNMetadataBuilder(AttentionMetadataBuilder[KVarNMetadata]):
    # Uniform batches (decode, speculative verify) replay as full CUDA graphs: their
    # forward and cache update read only persistent buffers and never sync.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        self.vllm_config = vllm_config
        self.group: lifecycle.PoolGroup | None = None
        spec = vllm_config.speculative_config
        self.sync_commit = settings.sync_commit(spec.num_speculative_tokens if spec else 0)
        self.flash_attention = _flash_attention(kv_cache_spec.head_size) is not None
        self.tile = kv_cache_spec.block_size
        self.chunk_invariant = settings.chunk_invariant()
        self.sink_blocks = settings.sink_blocks()
        # rows of a request up to this many are verify rows (the kernel), longer ones prompts
        self.verify_len = 1 + (spec.num_speculative_tokens if spec else 0)
        # the blocks a step opens and fills go straight to their records where
        # FlashAttention serves their rows over raw K/V (`raw_prompt`)
        self.direct = self.flash_attention

    def raw_prompt(self, computed: int, new: int) -> bool:
        """Whether a request's rows of a step are prompt rows that FlashAttention serves
        over their own K/V unquantized (`_metadata`): a fresh prompt or a continuation
        that runs dense, or, chunk-invariant, any that runs blockwise. Nothing reads the
        blocks they open and fill from the pool then."""
        if not self.direct or new <= self.verify_len or computed + new > DENSE_MAX_TOKENS:
            return False
        return self.chunk_invariant or computed == 0 or new >= DENSE_MIN_QUERY

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """Chunk-invariant verify batches write records ahead, a launch sized by the step:
        they run with piecewise CUDA graphs (attention eager), decode batches in full."""
        if settings.chunk_invariant() and vllm_config.speculative_config is not None:
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return cls._cudagraph_support

    def _pool_group(self) -> lifecycle.PoolGroup | None:
        if self.group is None:
            ctx = self.vllm_config.compilation_config.static_forward_context
            caches = [ctx[name].impl.bind(ctx[name].kv_cache) for name in self.layer_names]
            if any(c is None for c in caches):
                return None  # the KV cache is not allocated yet (profiling run)
            head = caches[0]
            self.group = lifecycle.PoolGroup(caches, lifecycle.SlotTables(
                head.block_to_slot, head.slot_to_block, head.dropped_tokens),
                on_finish=on_finish(self.vllm_config),
                direct=self.raw_prompt if self.direct else None)
        return self.group

    def _metadata(self, cam: CommonAttentionMetadata) -> KVarNMetadata:
        b = cam.num_reqs
        qsl_cpu = cam.query_start_loc_cpu[: b + 1]
        q_lens_cpu = qsl_cpu[1:] - qsl_cpu[:-1]
        single = (q_lens_cpu == 1).int()
        num_decodes = int(single.cumprod(0).sum()) if b else 0
        uniform = int(q_lens_cpu[0]) if b and bool((q_lens_cpu == q_lens_cpu[0]).all()) else 0
        if uniform > self.reorder_batch_threshold:
            uniform = 0  # equal-length prompts are not decode rows: FlashAttention serves them
        qsl = cam.query_start_loc[: b + 1]
        invariant = self.chunk_invariant
        runs: list[Run] = []
        if not uniform:  # once per step, not per layer: host lists and device offsets
            seq_cpu = cam.seq_lens_cpu_upper_bound
            fresh = ((seq_cpu[:b] == q_lens_cpu).tolist()
                     if seq_cpu is not None and self.flash_attention and not invariant
                     else [False] * b)
            runs = mixed_runs(qsl_cpu.tolist(), fresh, num_decodes)
            runs = (self._blockwise_runs(runs, cam, seq_cpu) if invariant
                    else [self._launch(run, cam, seq_cpu) for run in runs])
        snapshot, direct = None, (None, None)
        wants_snapshot = invariant and b and cam.max_query_len > 1
        wants_direct = self.direct and not uniform
        if wants_snapshot or wants_direct:
            lens = self._host_lens(cam, q_lens_cpu)
            raw = [self.raw_prompt(s - n, n) for s, n in lens]
            if wants_snapshot:
                snapshot = self._snapshot_blocks(cam, lens, raw)
            if wants_direct:
                direct = self._direct_blocks(cam, qsl_cpu.tolist(), lens, raw) or direct
        return KVarNMetadata(
            seq_lens=cam.seq_lens[:b], query_start_loc=qsl,
            block_table=cam.block_table_tensor[:b], num_actual_tokens=cam.num_actual_tokens,
            num_reqs=b, max_query_len=cam.max_query_len, uniform_query_len=uniform,
            num_decodes=num_decodes, runs=runs, chunk_invariant=invariant,
            snapshot_blocks=snapshot, direct_starts=direct[0], direct_blocks=direct[1])

    @staticmethod
    def _host_lens(cam: CommonAttentionMetadata, q_lens_cpu) -> list[tuple[int, int]]:
        """(sequence length, rows this step) per request on the host: exact for prompt
        rows, upper bounds for verify rows (speculative tokens may be rejected)."""
        seq = cam.seq_lens_cpu_upper_bound
        seq = (seq if seq is not None else cam.seq_lens.cpu())[: cam.num_reqs]
        return list(zip(seq.tolist(), q_lens_cpu.tolist()))

    def _direct_blocks(self, cam: CommonAttentionMetadata, starts: list[int],
                       lens: list[tuple[int, int]], raw: list[bool]
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The blocks past the sinks that this step's `raw_prompt` rows open and fill, as
        (their first tokens in the batch, their physical ids) on the device, or None. The
        layers write them straight into their records (`cache.write_blocks`), so they take
        no pool slot (`lifecycle.PoolMirror` applies the same rule to the scheduler's
        numbers) and `build` keeps their tokens out of the pool writes."""
        g = self.tile
        at, rows, cols = [], [], []
        for r, ((s, n), is_raw) in enumerate(zip(lens, raw)):
            if is_raw:
                c = s - n
                js = lifecycle.filled_in_step(c, n, g, self.sink_blocks)
                at += [starts[r] + j * g - c for j in js]
                rows += [r] * len(js)
                cols += js
        if not at:
            return None
        dev = cam.block_table_tensor.device
        rows_t, cols_t = (lifecycle.to_device(torch.tensor(x), dev) for x in (rows, cols))
        return (lifecycle.to_device(torch.tensor(at), dev),
                cam.block_table_tensor[rows_t, cols_t])

    def _snapshot_blocks(self, cam: CommonAttentionMetadata, lens: list[tuple[int, int]],
                         raw: list[bool]) -> torch.Tensor:
        """The blocks, past the sinks, that the rows of this step fill. Their records are
        written before attention reads: by the same request's rows past them, and by a
        request that hits them in vLLM's prefix cache in this very step (vLLM caches a
        block's hash when it schedules the rows that fill it), both of which read them
        from their records. Their number sizes the snapshot's quantize launch, which would
        otherwise quantize every padding entry: from the host's exact lengths, or, with
        speculative decoding (the host's lengths are upper bounds), counted on the device,
        one sync in steps that sync for the commit already (`settings.sync_commit`). Blocks
        that `raw_prompt` rows open and fill are not among them: they hold only records,
        written straight (`_direct_blocks`)."""
        b, g = cam.num_reqs, self.tile
        bt = cam.block_table_tensor[:b]
        seq = cam.seq_lens[:b].long()[:, None]
        q_lens = (cam.query_start_loc[1: b + 1] - cam.query_start_loc[:b]).long()[:, None]
        j = torch.arange(bt.shape[1], device=bt.device)[None, :]
        last = (j + 1) * g - 1  # each block's last position
        fills = (j >= self.sink_blocks) & (last >= seq - q_lens) & (last < seq)
        if any(raw):
            opened = j * g >= seq - q_lens
            fills &= ~(opened & lifecycle.to_device(torch.tensor(raw), bt.device)[:, None])
        if self.verify_len > 1 or cam.seq_lens_cpu_upper_bound is None:
            count = int(fills.sum())
        else:  # blocks j >= sink whose last position lies in rows [seq - n, seq - 1]
            count = sum(max(0, s // g - max(-(-(s - n + 1) // g), self.sink_blocks + 1) + 1)
                        - (len(lifecycle.filled_in_step(s - n, n, g, self.sink_blocks)) if r
                           else 0) for (s, n), r in zip(lens, raw))
        ids = torch.cat([torch.where(fills, bt, -1).flatten(),
                         torch.full((1,), -1, dtype=bt.dtype, device=bt.device)])
        return ids[kvcache.nth_true(fills.flatten(), count)]

    def _blockwise_runs(self, runs: list[Run], cam: CommonAttentionMetadata,
                        seq_cpu) -> list[Run]:
        """chunk_invariant: the prompt rows (longer than a verify window) of consecutive
        requests as one FlashAttention call (`blockwise_run`), where FlashAttention is
        there and their pages stay within DENSE_MAX_TOKENS; other requests keep the
        kernel's chunk-invariant reads."""
        if not self.flash_attention or seq_cpu is None:
            return runs
        out: list[Run] = []
        group: list[tuple[Run, int]] = []

        def close() -> None:
            if group:
                out.append(blockwise_run(group, cam.block_table_tensor, self.tile,
                                         self.sink_blocks, self.direct))
                group.clear()

        for run in runs:
            seq = int(seq_cpu[run.r0])  # exact for prompt rows: no speculative tokens
            if run.max_len <= self.verify_len or seq > DENSE_MAX_TOKENS:
                close()
                out.append(run)
                continue
            # the pages, up to a context and a chunk per request, stay a bounded transient
            if sum(s for _, s in group) + seq > DENSE_MAX_TOKENS:
                close()
            group.append((run, seq))
        close()
        return out

    def _launch(self, run: Run, cam: CommonAttentionMetadata, seq_cpu) -> Run:
        """Device offsets for the runs that FlashAttention serves, made once per step."""
        qsl = cam.query_start_loc
        if run.fresh:
            return dataclasses.replace(run, cu=qsl[run.r0: run.r1 + 1] - run.start)
        if not self.flash_attention or seq_cpu is None or run.max_len < DENSE_MIN_QUERY:
            return run
        r = run.r0
        if int(seq_cpu[r]) > DENSE_MAX_TOKENS:
            return run
        blocks = -(-int(seq_cpu[r]) // self.tile)  # an upper bound: cu_k holds the exact length
        computed = int(seq_cpu[r]) - run.max_len  # exact for prompt rows
        return dataclasses.replace(
            run, cu=qsl[r: r + 2] - run.start, dense_blocks=blocks,
            cu_k=torch.nn.functional.pad(cam.seq_lens[r: r + 1].to(torch.int32), (1, 0)),
            raw_from=computed if self.raw_prompt(computed, run.max_len) else -1)

    def build_for_cudagraph_capture(self, cam: CommonAttentionMetadata) -> KVarNMetadata:
        return self._metadata(cam)  # dummy batch: no cache bookkeeping

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVarNMetadata:
        md = self._metadata(common_attn_metadata)
        keep_out_of_pool(md, common_attn_metadata.slot_mapping, self.tile)
        group = self._pool_group()
        if group is not None and lifecycle.REQUESTS.in_step:  # real steps only
            group.step(md.block_table, md.seq_lens, md.query_lens(),
                       common_attn_metadata.slot_mapping[: md.num_actual_tokens],
                       lifecycle.REQUESTS.plan, sync=self.sync_commit)
        return md


def keep_out_of_pool(md: KVarNMetadata, slot_mapping: torch.Tensor, tile: int) -> None:
    """Make the tokens of the step's direct blocks padding in vLLM's slot mapping, which
    only the pool's slot allocation and writes read: `forward` writes their records."""
    if md.direct_starts is not None:
        rows = md.direct_starts[:, None] + torch.arange(tile, device=slot_mapping.device)
        slot_mapping.index_fill_(0, rows.flatten(), -1)


class KVarNAttentionImpl(AttentionImpl[KVarNMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype: str = settings.DTYPES[0], logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 **kwargs) -> None:
        problems = settings.layer_problems(
            kv_cache_dtype, head_size, None, sliding_window=sliding_window is not None,
            attn_type="decoder" if attn_type == AttentionType.DECODER else str(attn_type),
            batch_invariant=settings.batch_invariant())
        if alibi_slopes is not None:
            problems.append("kvarn does not implement ALiBi: use --kv-cache-dtype auto")
        if logits_soft_cap:
            problems.append("kvarn does not implement logit soft-capping: use "
                            "--kv-cache-dtype auto")
        if kv_sharing_target_layer_name is not None:
            problems.append("kvarn does not support cross-layer KV sharing: use "
                            "--kv-cache-dtype auto")
        if problems:
            raise ValueError("; ".join(problems))
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.preset = settings.preset(kv_cache_dtype)
        self.tile = settings.tile(kv_cache_dtype)
        self.pool_k: torch.Tensor | None = None
        self.pool_v: torch.Tensor | None = None
        self.cache: KVarNCache | None = None
        cfg = get_current_vllm_config()
        sched = cfg.scheduler_config
        drafts = cfg.speculative_config.num_speculative_tokens if cfg.speculative_config else 0
        self._fa = _flash_attention(head_size)
        self.prompt_blocks_pooled = not direct_prompts_only(
            self._fa is not None, self.tile, cfg.model_config.max_model_len, drafts)
        self.pool_slots, self.pool_needed = settings.pool_slots(
            sched.max_num_seqs, sched.max_num_batched_tokens, self.tile, drafts,
            prompt_blocks_pooled=self.prompt_blocks_pooled,
            partial_prefills=sched.max_num_seqs if sched.long_prefill_token_threshold else 1)

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Allocate the tail pool now, before vLLM measures memory for the KV cache."""
        if act_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"kvarn needs a float16 or bfloat16 model; got {act_dtype}: use "
                             "--dtype float16")
        if self.pool_k is not None:
            return
        device = torch.device("cuda", torch.cuda.current_device())
        shape = (self.pool_slots, self.tile, self.num_kv_heads, self.head_size)
        self.pool_k = torch.zeros(shape, dtype=act_dtype, device=device)
        self.pool_v = torch.zeros(shape, dtype=act_dtype, device=device)
        _log_pool_once(self, act_dtype)
        _compile_once(self, act_dtype, device)

    def bind(self, kv_cache: torch.Tensor) -> KVarNCache | None:
        """This layer's KVarNCache over vLLM's KV-cache tensor (its pages)."""
        if kv_cache is None or kv_cache.dim() != 3:
            return None  # not allocated yet
        if self.cache is None or self.cache.pages.data_ptr() != kv_cache.data_ptr():
            if self.pool_k is None:
                raise RuntimeError("kvarn: the tail pool was not allocated at model load")
            tables = lifecycle.shared_tables(kv_cache.device, kv_cache.shape[0],
                                             self.pool_slots)
            self.cache = KVarNCache(
                pages=kv_cache, pool_k=self.pool_k, pool_v=self.pool_v,
                block_to_slot=tables.block_to_slot, slot_to_block=tables.slot_to_block,
                dropped_tokens=tables.dropped_tokens, preset=self.preset,
                sink_blocks=settings.sink_blocks())
        return self.cache

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        cache = self.bind(kv_cache)
        n = slot_mapping.shape[0]
        if cache is None or n == 0:
            return
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        kvcache.write(cache, k, v, slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: KVarNMetadata | None,
                output: torch.Tensor | None = None, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kvarn does not fuse output quantization")
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        md = attn_metadata
        cache = self.bind(kv_cache)
        if md is None or cache is None:
            return output.fill_(0)  # memory-profiling run
        if md.snapshot_blocks is not None:  # after this layer's cache update
            kvcache.snapshot(cache, md.snapshot_blocks)
        if md.uniform_query_len:  # decode / verify: one launch, graph-safe
            b, sq = md.num_reqs, md.uniform_query_len
            t = b * sq  # (a padded graph batch has padded requests too)
            q = query[:t].view(b, sq, self.num_heads, self.head_size)
            o = out[:t].view(b, sq, self.num_heads, self.head_size)
            if sq == 1:
                self._decode(q, cache, md.block_table, md.seq_lens, o, md.chunk_invariant)
            else:
                triton_attention.attention(q, cache, md.block_table, md.seq_lens,
                                           md.query_lens(), softmax_scale=self.scale,
                                           chunk_invariant=md.chunk_invariant, out=o)
            return output
        n = md.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        if md.direct_starts is not None:  # before any row reads them (a prefix hit may)
            kvcache.write_blocks(cache, key[:n].view(n, self.num_kv_heads, self.head_size),
                                 value[:n].view(n, self.num_kv_heads, self.head_size),
                                 md.direct_starts, md.direct_blocks)
        self._mixed(q, key[:n], value[:n], cache, md, out)
        return output

    def _mixed(self, q, k, v, cache, md: KVarNMetadata, out) -> None:
        """Mixed batches (eager): single-token decodes in one launch, then one launch per
        run (`mixed_runs`): fresh prompts together through FlashAttention on their raw
        K/V, long continuations through FlashAttention over their gathered context,
        every other request through the kernel over the cache."""
        d, hq, hk = self.head_size, self.num_heads, self.num_kv_heads
        nd = md.num_decodes
        if nd:
            self._decode(q[:nd].view(nd, 1, hq, d), cache, md.block_table[:nd],
                         md.seq_lens[:nd], out[:nd].view(nd, 1, hq, d), md.chunk_invariant)
        for run in md.runs:
            s, e = run.start, run.end
            if run.fresh:
                self._fa(q[s:e], k[s:e].view(-1, hk, d), v[s:e].view(-1, hk, d), run.cu,
                         run.cu, run.max_len, run.max_len, self.scale, out[s:e])
                continue
            if run.blockwise:
                self._blockwise(q[s:e], k[s:e].view(-1, hk, d), v[s:e].view(-1, hk, d), cache,
                                run, out[s:e])
                continue
            if run.dense_blocks:
                self._dense(q[s:e], k[s:e].view(-1, hk, d), v[s:e].view(-1, hk, d), cache,
                            md.block_table[run.r0], run, out[s:e])
                continue
            triton_attention.attention(q[s:e].view(1, e - s, hq, d), cache,
                                       md.block_table[run.r0: run.r1],
                                       md.seq_lens[run.r0: run.r1], softmax_scale=self.scale,
                                       chunk_invariant=md.chunk_invariant,
                                       out=out[s:e].view(1, e - s, hq, d))

    def _decode(self, q, cache, block_table, seq_lens, out, chunk_invariant: bool) -> None:
        """One query token per sequence, into out (q's shape): the Gluon kernel where it is
        the faster one; chunk-invariant, the Triton kernel's launch of verify rows (splits
        at fixed positions), so a token gets the same sums from a decode and a verify row."""
        if chunk_invariant:
            triton_attention.attention(q, cache, block_table, seq_lens,
                                       softmax_scale=self.scale, chunk_invariant=True, out=out)
            return
        kernel = gluon_attention if gluon_attention.applies(q, cache) else triton_attention
        kernel.attention(q, cache, block_table, seq_lens, softmax_scale=self.scale, out=out)

    def _dense(self, q, k_new, v_new, cache, block_table, run: Run, out) -> None:
        """One request's prefill chunk, FlashAttention over its whole context gathered
        dense: attention is invariant under the orthonormal rotation of q and K, and V's
        rotation is undone on the output. The chunk's own K/V (k_new, v_new) come as the
        pool holds them (rotated, rounded to the model dtype), also for the blocks it
        fills, which hold only records (`raw_from`)."""
        k, v = triton_gather.gather(cache, block_table, run.dense_blocks)
        if run.raw_from >= 0:
            k[run.raw_from: run.raw_from + k_new.shape[0]] = codec.rotate(k_new)
            v[run.raw_from: run.raw_from + v_new.shape[0]] = codec.rotate(v_new)
        o = torch.empty_like(q)
        self._fa(codec.rotate(q), k, v, run.cu, run.cu_k, run.max_len, k.shape[0],
                 self.scale, o)
        out.copy_(codec.unrotate(o))

    def _blockwise(self, q, k_new, v_new, cache, run: Run, out) -> None:
        """Consecutive requests' prompt rows, chunk-invariant (`blockwise_run`): the
        records of each one's blocks before its last row's, dequantized once, and the
        blocks the rows lie in as stored, gathered in one launch as the pages of one paged
        FlashAttention call (rotated frame); those of them that hold only records
        (`raw_pages`) from the rows' K/V (k_new, v_new), as the pool would hold them."""
        k, v = triton_gather.gather(cache, run.page_blocks, run.page_blocks.shape[0],
                                    records_from=0, records_to=run.page_records)
        shape = (-1, cache.tile, cache.num_kv_heads, cache.head_dim)
        k, v = k.view(shape), v.view(shape)
        if run.raw_pages is not None:
            rows = run.raw_rows[:, None] + torch.arange(cache.tile, device=q.device)
            k[run.raw_pages] = codec.rotate(k_new[rows])
            v[run.raw_pages] = codec.rotate(v_new[rows])
        o = torch.empty_like(q)
        self._fa(codec.rotate(q), k, v, run.cu, None, run.max_len,
                 run.max_keys, self.scale, o, seqused_k=run.seqused_k,
                 block_table=run.page_table)
        out.copy_(codec.unrotate(o))


def _flash_attention(head_size: int):
    """vLLM's FlashAttention for fresh prompts (causal over their own raw K/V), or None."""
    try:
        from vllm.v1.attention.backends.fa_utils import (
            get_flash_attn_version,
            is_flash_attn_varlen_func_available,
        )
        if not is_flash_attn_varlen_func_available():
            return None
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func
        version = get_flash_attn_version(head_size=head_size)
    except Exception:  # no CUDA build of FlashAttention here: the Triton kernel serves all
        return None

    def run(q, k, v, cu_q, cu_k, max_q, max_k, scale, out, *, seqused_k=None,
            block_table=None):
        """Causal (aligned at the end of each sequence) attention of q, out [t, heads, D]
        over k, v [t_k, kv heads, D]; cu_q, cu_k int32 offsets on the device (a tensor
        built from host ints here would sync the stream), max_q, max_k upper bounds.
        Paged: k, v [pages, page size, kv heads, D], sequence i's keys the first
        seqused_k[i] of its pages block_table[i] (cu_k None); one split per row (FA3), so a
        row's result does not depend on the other sequences of the call."""
        extra = {} if version is None else {"fa_version": version}
        if block_table is not None and version == 3:
            extra["num_splits"] = 1
        flash_attn_varlen_func(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                               max_seqlen_q=max_q, max_seqlen_k=max_k, seqused_k=seqused_k,
                               block_table=block_table, softmax_scale=scale, causal=True,
                               out=out, **extra)
    return run


_LOGGED: set = set()
_COMPILED: set = set()


def _compile_once(impl: KVarNAttentionImpl, act_dtype: torch.dtype,
                  device: torch.device) -> None:
    """Compile every kernel variant of this layer shape now, not in the middle of a step
    (outside vLLM's memory profile and graph capture: model load comes first)."""
    key = (impl.preset, impl.num_heads, impl.num_kv_heads, impl.head_size, act_dtype, device)
    if key in _COMPILED:
        return
    _COMPILED.add(key)
    t0 = time.perf_counter()
    n = warmup.compile_kernels(impl.preset, impl.num_heads, impl.num_kv_heads,
                               impl.head_size, act_dtype, device,
                               chunk_invariant=settings.chunk_invariant())
    log.info(f"kvarn: {n} kernel launches compiled in {time.perf_counter() - t0:.1f} s")


def _log_pool_once(impl: KVarNAttentionImpl, act_dtype: torch.dtype) -> None:
    key = (impl.pool_slots, impl.num_kv_heads, impl.head_size)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    per_layer = settings.pool_bytes_per_slot(impl.num_kv_heads, impl.head_size, impl.tile,
                                             torch.finfo(act_dtype).bits // 8)
    cfg = get_current_vllm_config()
    msg = (f"kvarn {impl.kv_cache_dtype}: tail pool of {impl.pool_slots} slots "
           f"({impl.pool_slots * per_layer / 2**20:.1f} MiB per layer, "
           f"{impl.tile} tokens x {impl.num_kv_heads} KV heads in {act_dtype} per slot), "
           f"sized for max_num_seqs={cfg.scheduler_config.max_num_seqs} and "
           f"max_num_batched_tokens={cfg.scheduler_config.max_num_batched_tokens}"
           + ("" if impl.prompt_blocks_pooled else
              " (the prompt blocks a step fills go straight to their records)"))
    log.warning(msg)
    if settings.chunk_invariant():
        why = ("VLLM_BATCH_INVARIANT=1" if settings.ENV_CHUNK_INVARIANT not in os.environ
               else "KVARN_CHUNK_INVARIANT=1")
        log.warning(f"kvarn: chunk-invariant reads ({why}): every row reads the blocks "
                    "before its own quantized, prompt rows included (results independent of "
                    "chunking, prefix hits and speculative decoding; prefill quantizes each "
                    "block twice)")
    if impl.pool_slots < impl.pool_needed:
        log.warning(f"kvarn: KVARN_POOL_SLOTS={impl.pool_slots} is below the "
                    f"{impl.pool_needed} slots this configuration can need at full "
                    "concurrency; if the pool runs out the engine stops with "
                    "PoolExhausted rather than lose tokens")
