"""The tail pool and the commit / release rules of DESIGN §4 for the layers of one vLLM
worker, on top of `kvarn_torch.cache`.

vLLM's layers share block ids, so they share one pair of slot tables (`SlotTables`); each
layer has its own pages (vLLM's KV-cache tensor) and pool. Once per step, in the metadata
builder and outside any CUDA graph, `PoolGroup.step` releases the blocks of finished and
preempted requests, commits every full block whose tokens were all accepted before this
step, and gives a pool slot to every block this step writes. The layers' `do_kv_cache_update`
then only rotate and scatter their tokens (graph-safe, no allocation).

Which requests finished is not part of the attention metadata: `RequestBlocks` follows the
scheduler outputs the worker receives (block ids and token counts per request) and hands
out the blocks of finished and preempted requests once.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from kvarn_torch import cache as kvcache
from kvarn_torch.cache import KVarNCache


class PoolExhausted(RuntimeError):
    pass


class RequestBlocks:
    """Blocks (KV-cache group 0) and written-token counts of the running requests, as the
    scheduler outputs report them. Token counts are upper bounds (speculative tokens that
    get rejected are counted): safe for `release`, which then at worst quantizes a block
    holding rejected tokens that nothing will read."""

    def __init__(self) -> None:
        self.blocks: dict[str, list[int]] = {}
        self.tokens: dict[str, int] = {}
        self.finished: list[tuple[list[int], int]] = []
        self.in_step = False  # True while the worker executes a real scheduler step
        self.steps = 0

    def observe(self, out) -> None:
        """Follow one `SchedulerOutput`."""
        gone = set(out.finished_req_ids) | set(out.preempted_req_ids or ())
        for rid in gone:
            if rid in self.blocks:
                self.finished.append((self.blocks.pop(rid), self.tokens.pop(rid)))
        if getattr(out, "kv_cache_block_copies", None):
            raise NotImplementedError(
                "vLLM asked to copy KV blocks (partial-block prefix hits, copy-on-write); the "
                "kvarn cache cannot copy tail-pool blocks yet: run without "
                "--enable-prefix-caching or with --kv-cache-dtype auto")
        n = out.num_scheduled_tokens
        for req in out.scheduled_new_reqs:
            self.blocks[req.req_id] = list(req.block_ids[0]) if req.block_ids else []
            self.tokens[req.req_id] = req.num_computed_tokens + n.get(req.req_id, 0)
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            new = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids or rid not in self.blocks:
                self.blocks[rid] = list(new[0]) if new else []
            elif new:
                self.blocks[rid].extend(new[0])
            self.tokens[rid] = cached.num_computed_tokens[i] + n.get(rid, 0)
        self.steps += 1

    def take_finished(self) -> list[tuple[list[int], int]]:
        out, self.finished = self.finished, []
        return out


REQUESTS = RequestBlocks()  # one per worker process; fed by the worker patch


@dataclasses.dataclass
class SlotTables:
    block_to_slot: Tensor  # int32 [num_blocks]
    slot_to_block: Tensor  # int32 [pool_slots]
    dropped_tokens: Tensor  # int32 [], tokens that found no slot (must stay 0)


_TABLES: dict[tuple, SlotTables] = {}


def shared_tables(device: torch.device, num_blocks: int, pool_slots: int) -> SlotTables:
    """The slot tables every layer of this worker uses; allocated once, so the tensors
    captured in CUDA graphs stay the live ones."""
    key = (str(device), num_blocks, pool_slots)
    if key not in _TABLES:
        _TABLES[key] = SlotTables(
            block_to_slot=torch.full((num_blocks,), -1, dtype=torch.int32, device=device),
            slot_to_block=torch.full((pool_slots,), -1, dtype=torch.int32, device=device),
            dropped_tokens=torch.zeros((), dtype=torch.int32, device=device))
    return _TABLES[key]


class PoolGroup:
    """The caches of the layers of one KV-cache group and their per-step bookkeeping."""

    def __init__(self, caches: list[KVarNCache], tables: SlotTables) -> None:
        self.caches = caches
        self.tables = tables
        self.started = False
        self._dropped_host = torch.zeros((), dtype=torch.int32,
                                         pin_memory=tables.dropped_tokens.is_cuda)

    def _start(self) -> None:
        """Forget what warm-up and graph capture wrote: they ran on dummy batches."""
        self.tables.block_to_slot.fill_(-1)
        self.tables.slot_to_block.fill_(-1)
        self.tables.dropped_tokens.zero_()
        self._dropped_host.zero_()
        self.started = True

    def _check_dropped(self) -> None:
        """Raise if the previous step wrote tokens that found no pool slot (read one step
        late through a pinned copy, so no step waits for the GPU)."""
        if int(self._dropped_host):
            pool = self.tables.slot_to_block.numel()
            raise PoolExhausted(
                f"kvarn tail pool exhausted: {int(self._dropped_host)} token writes found "
                f"none of the {pool} slots free, so their K/V were lost. Raise "
                f"KVARN_POOL_SLOTS above {pool}, or lower --max-num-seqs / "
                "--max-num-batched-tokens")
        self._dropped_host.copy_(self.tables.dropped_tokens, non_blocking=True)

    def step(self, block_table: Tensor, seq_lens: Tensor, query_lens: Tensor,
             slot_mapping: Tensor, finished: list[tuple[list[int], int]]) -> None:
        if not self.started:
            self._start()
        self._check_dropped()
        head = self.caches[0]
        if finished:
            width = max(1, max(len(b) for b, _ in finished))
            table = torch.full((len(finished), width), -1, dtype=torch.int32)
            for i, (blocks, _) in enumerate(finished):
                table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            lens = torch.tensor([t for _, t in finished], dtype=torch.int32)
            kvcache.release(self.caches, table.to(head.device), lens.to(head.device))
        if block_table.shape[0]:
            kvcache.commit(self.caches, block_table, seq_lens, query_lens)
        kvcache.allocate(head, slot_mapping)
