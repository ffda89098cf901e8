"""Triton kernel: the data movement of a flush (`cache.flush`) for every layer in one launch.

A flush gathers the pool tiles of the blocks it quantizes from each layer's pool, runs
one codec call over all of them, and writes each layer's records into its pages. Done
with torch ops that is ~10 small launches per layer (indexing, a transposing copy, the
masked scatter): ~360 for a 36-layer model, each costing more host time than GPU time,
so vLLM's GPU sat idle behind them at every commit step.

Here one kernel moves units of [ROWS, COLS] int32 words between the per-layer buffers
(pools or pages, found through a table of their base addresses) and one stacked buffer
[layers * items * heads, ROWS, COLS]: program (layer, item, head) copies

    table[layer] + index[item] * item_stride + head * head_stride + row * row_stride

(columns contiguous) to or from its unit of the stacked buffer, and skips items whose
index is negative. Pure copies: the bytes are those of the torch path, which stays the
reference (and serves layers whose buffers differ in shape or strides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

WORDS_PER_PROGRAM = 4096  # a unit is split into row blocks of at most this many words
NUM_WARPS = 4


@triton.jit(do_not_specialize=["items", "heads", "item_stride", "head_stride", "row_stride"])
def _copy_kernel(
    table_ptr, stacked_ptr, index_ptr, items, heads, item_stride, head_stride, row_stride,
    ROWS: tl.constexpr, ROW_BLOCK: tl.constexpr, COLS: tl.constexpr, COLS_P2: tl.constexpr,
    GATHER: tl.constexpr,
):
    """GATHER: per-layer buffers -> stacked; else stacked -> per-layer buffers."""
    unit = tl.program_id(0)  # (layer * items + item) * heads + head
    h = unit % heads
    item = (unit // heads) % items
    layer = unit // (heads * items)
    i = tl.load(index_ptr + item).to(tl.int64)
    if i >= 0:
        base = tl.load(table_ptr + layer).to(tl.pointer_type(tl.int32))
        r = tl.program_id(1) * ROW_BLOCK + tl.arange(0, ROW_BLOCK)[:, None]
        c = tl.arange(0, COLS_P2)[None, :]
        mask = (r < ROWS) & (c < COLS)
        layered = base + i * item_stride + h * head_stride + r * row_stride + c
        stacked = stacked_ptr + unit.to(tl.int64) * (ROWS * COLS) + r * COLS + c
        if GATHER:
            tl.store(stacked, tl.load(layered, mask=mask), mask=mask)
        else:
            tl.store(layered, tl.load(stacked, mask=mask), mask=mask)


def _words(x: Tensor) -> tuple[int, ...]:
    """x's strides in int32 words (`uniform` checked that they are whole words)."""
    return tuple(s * x.element_size() // 4 for s in x.stride())


_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}
MAX_TABLES = 64  # an engine flushes one set of pools and one of pages; tests make many


def _table(buffers: list[Tensor]) -> Tensor:
    """The buffers' base addresses as an int64 tensor on their device. Cached: a flush's
    buffers (pools, pages) live as long as the engine, and an upload per flush would cost
    launches; the pinned host copy is kept with it so that the asynchronous upload never
    reads freed memory."""
    key = (str(buffers[0].device),) + tuple(b.data_ptr() for b in buffers)
    if key not in _TABLES:
        if len(_TABLES) >= MAX_TABLES:
            del _TABLES[next(iter(_TABLES))]  # the oldest, its upload long done
        host = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
        if buffers[0].is_cuda:
            host = host.pin_memory()
        _TABLES[key] = (host, host.to(buffers[0].device, non_blocking=True))
    return _TABLES[key][1]


def uniform(buffers: list[Tensor]) -> bool:
    """Whether one launch can address all these per-layer buffers: same shape, dtype and
    strides, contiguous last axis, rows and bases in whole int32 words."""
    head = buffers[0]
    size = head.element_size()
    return (head.stride(-1) == 1 and head.shape[-1] * size % 4 == 0
            and all(s * size % 4 == 0 for s in head.stride()[:-1])
            and all(b.shape == head.shape and b.dtype == head.dtype
                    and b.stride() == head.stride() and b.data_ptr() % 4 == 0
                    for b in buffers))


def row_block(rows: int, cols: int) -> int:
    """Rows of a unit one program copies: a power of two, at most WORDS_PER_PROGRAM words."""
    return max(1, min(triton.next_power_of_2(rows),
                      WORDS_PER_PROGRAM // triton.next_power_of_2(cols)))


def _launch(buffers: list[Tensor], stacked: Tensor, index: Tensor, heads: int,
            strides: tuple[int, int, int], rows: int, cols: int, gather: bool) -> None:
    items = index.shape[0]
    if items == 0:
        return
    block = row_block(rows, cols)
    _copy_kernel[(len(buffers) * items * heads, triton.cdiv(rows, block))](
        _table(buffers), stacked.view(torch.int32), index, items, heads, *strides,
        ROWS=rows, ROW_BLOCK=block, COLS=cols, COLS_P2=triton.next_power_of_2(cols),
        GATHER=gather, num_warps=NUM_WARPS)


def gather_tiles(pools: list[Tensor], slots: Tensor) -> Tensor:
    """Tiles [L * n * Hk, G, D] (layer-major, then slot, then head) of the pool slots
    `slots` [n] of each layer's pool [S, G, Hk, D] (all alike: `uniform`), what
    `pool[slots].transpose(1, 2)` stacks per layer. Tiles of negative slots hold
    don't-care values."""
    head = pools[0]
    _, g, hk, d = head.shape
    out = torch.empty((len(pools) * slots.shape[0] * hk, g, d), dtype=head.dtype,
                      device=head.device)
    s_slot, s_tok, s_head, _ = _words(head)
    _launch(pools, out, slots, hk, (s_slot, s_head, s_tok), g, d * head.element_size() // 4,
            gather=True)
    return out


def scatter_records(records: Tensor, pages: list[Tensor], blocks: Tensor) -> None:
    """Write records [L * n * Hk, R] uint8 (layer-major, then block, then head) into each
    layer's pages [num_blocks, Hk, R] (all alike: `uniform`) at `blocks` [n]; negative
    blocks are skipped."""
    hk, r = pages[0].shape[1:]
    s_block, s_head, _ = _words(pages[0])
    _launch(pages, records.contiguous(), blocks, hk, (s_block, s_head, 0), 1, r // 4, gather=False)
