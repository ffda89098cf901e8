"""The tail pool and the commit / release rules of DESIGN §4 for the layers of one vLLM
worker, on top of `kvarn_torch.cache`.

vLLM's layers share block ids, so they share one pair of slot tables (`SlotTables`); each
layer has its own pages (vLLM's KV-cache tensor) and pool. Once per step, in the metadata
builder and outside any CUDA graph, `PoolGroup.step` settles the blocks of finished and
preempted requests (`OnFinish`: dropped, quantized, or quantized but for the sinks, which
stay in the pool for prefix hits until their slots are needed), quantizes every full block
whose tokens were all accepted before this step (one codec call for all layers), frees
their slots, and gives a pool slot to every block this step writes but the prompt blocks
it opens and fills, which the layers quantize straight from their tokens (`Direct`). The
layers' `do_kv_cache_update` then only rotate and scatter their tokens (graph-safe, no
allocation).

Neither which requests finished nor how many tiles a step quantizes is part of the
attention metadata: `RequestBlocks` follows the scheduler outputs the worker receives
(block ids and token counts per request), and `PoolGroup` keeps a host mirror of which
blocks hold a pool slot, driven by the same rules, so it knows each step's tile count
without reading it back from the GPU (a host sync per step would stall vLLM's overlap of
CPU and GPU work). The GPU counts what the mirror missed whenever it flushes; a mismatch
stops the engine loudly in the step after, like an exhausted pool. Steps the mirror
finds nothing to do for launch no bookkeeping at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from kvarn_torch import cache as kvcache
from kvarn_torch.cache import KVarNCache


@dataclasses.dataclass
class Scheduled:
    """One request of a step: its blocks (group 0), the tokens computed before the step
    and the tokens the step writes."""
    req_id: str
    blocks: list[int]
    computed: int
    new_tokens: int


@dataclasses.dataclass
class Finished:
    """A finished or preempted request: its blocks and (an upper bound of) its tokens."""
    req_id: str
    blocks: list[int]
    tokens: int


@dataclasses.dataclass
class StepPlan:
    scheduled: list[Scheduled] = dataclasses.field(default_factory=list)
    finished: list[Finished] = dataclasses.field(default_factory=list)


class PoolExhausted(RuntimeError):
    pass


# What becomes of a finished (or preempted) request's blocks:
# * "drop": nothing reads them again (no prefix caching, no KV connector): slots freed,
#   nothing quantized;
# * "quantize": DESIGN §4's release, full blocks quantized, partial ones dropped (a KV
#   connector reads the records);
# * "retire_sinks": the same, but a full sink block keeps its pool slot ("retired"), so a
#   prefix hit reads it unquantized, as the request that wrote it did; the oldest retired
#   sink is quantized when a step needs its slot (upstream KVarN's rule).
OnFinish = Literal["drop", "quantize", "retire_sinks"]


class RequestBlocks:
    """Blocks (KV-cache group 0) and written-token counts of the running requests, as the
    scheduler outputs report them. Token counts are upper bounds (speculative tokens that
    get rejected are counted): safe for `release`, which then at worst quantizes a block
    holding rejected tokens that nothing will read."""

    def __init__(self) -> None:
        self.blocks: dict[str, list[int]] = {}
        self.tokens: dict[str, int] = {}
        self.plan = StepPlan()  # of the step being executed
        self.finished: list[Finished] = []  # not yet handed to a PoolGroup
        self.in_step = False  # True while the worker executes a real scheduler step
        self.steps = 0

    def observe(self, out) -> None:
        """Follow one `SchedulerOutput`."""
        gone = set(out.finished_req_ids) | set(out.preempted_req_ids or ())
        for rid in gone:
            if rid in self.blocks:
                self.finished.append(Finished(rid, self.blocks.pop(rid), self.tokens.pop(rid)))
        if getattr(out, "kv_cache_block_copies", None):
            raise NotImplementedError(
                "vLLM asked to copy KV blocks (partial-block prefix hits, copy-on-write); the "
                "kvarn cache cannot copy tail-pool blocks yet: run without "
                "--enable-prefix-caching or with --kv-cache-dtype auto")
        n = out.num_scheduled_tokens
        scheduled = []
        for req in out.scheduled_new_reqs:
            self.blocks[req.req_id] = list(req.block_ids[0]) if req.block_ids else []
            scheduled.append((req.req_id, req.num_computed_tokens))
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            new = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids or rid not in self.blocks:
                self.blocks[rid] = list(new[0]) if new else []
            elif new:
                self.blocks[rid].extend(new[0])
            scheduled.append((rid, cached.num_computed_tokens[i]))
        self.plan = StepPlan(
            [Scheduled(rid, self.blocks[rid], c, n.get(rid, 0)) for rid, c in scheduled],
            self.take_finished())
        for s in self.plan.scheduled:
            self.tokens[s.req_id] = s.computed + s.new_tokens
        self.steps += 1

    def take_finished(self) -> list[Finished]:
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


def written_blocks(plan: StepPlan, tile: int) -> set[int]:
    """The blocks the step's rows write. vLLM caches a block's hash when it schedules the
    rows that fill it, so a request scheduled after them in the same step can list the
    block as a prefix hit, full in its eyes, before it is: it must not be committed for
    that request (quantized half written, its slot freed under the writer)."""
    return {b for s in plan.scheduled
            for b in s.blocks[s.computed // tile: -(-(s.computed + s.new_tokens) // tile)]}


def filled_in_step(computed: int, new: int, tile: int, sink_blocks: int) -> range:
    """Which of a request's blocks (positions in its block list) past the sinks its rows
    of one step open and fill."""
    return range(max(sink_blocks, -(-computed // tile)), (computed + new) // tile)


# Whether a request's blocks that one step opens and fills go straight to their records
# (`cache.write_blocks`) rather than through pool slots, given (computed, new tokens).
Direct = Callable[[int, int], bool]


class PoolMirror:
    """Which blocks hold a pool slot, on the host, following the rules of
    `kvarn_torch.cache` (allocate / commit / release) from the scheduler's numbers."""

    def __init__(self, tile: int, sink_blocks: int, pool_slots: int,
                 on_finish: OnFinish = "quantize", direct: Direct | None = None) -> None:
        if on_finish not in get_args(OnFinish):
            raise ValueError(f"on_finish must be one of {get_args(OnFinish)}; got "
                             f"{on_finish!r}")
        self.tile, self.sink, self.pool_slots = tile, sink_blocks, pool_slots
        self.on_finish = on_finish
        self.direct = direct
        self.held: set[int] = set()
        self.retired: dict[int, None] = {}  # held sinks of finished requests, oldest first
        self.checked: dict[str, int] = {}  # per request: blocks below this are settled
        self.recycled: list[int] = []  # the last flush's: held blocks now written direct

    def kept_sinks(self, f: Finished) -> int:
        """How many leading blocks of finished request `f` retire instead of quantizing."""
        if self.on_finish != "retire_sinks":
            return 0
        return min(self.sink, f.tokens // self.tile, len(f.blocks))

    def flush(self, plan: StepPlan) -> int:
        """Apply release and commit; -> how many held blocks get quantized. Held blocks
        that a request now writes straight to their records (a retired sink whose id vLLM
        handed on) are freed unquantized, listed in `recycled`: their slots hold the old
        tokens, which the pool would give readers in place of the new record."""
        g, sink = self.tile, self.sink
        quantize: set[int] = set()
        free: set[int] = set()
        self.recycled = []
        for f in plan.finished:
            self.checked.pop(f.req_id, None)
            full = min(f.tokens // g, len(f.blocks)) if self.on_finish != "drop" else 0
            kept = self.kept_sinks(f)
            self.retired.update((b, None) for b in f.blocks[:kept] if b in self.held)
            quantize.update(b for b in f.blocks[kept:full] if b in self.held)
            free.update(b for b in f.blocks[full: -(-f.tokens // g)] if b in self.held)
        writing = written_blocks(plan, g)
        for s in plan.scheduled:
            # in use again (a prefix hit on the sink, or vLLM reused the block); a block
            # allocated ahead of the writes stays retired until they come
            for b in s.blocks[: -(-(s.computed + s.new_tokens) // g)]:
                self.retired.pop(b, None)
            self.recycled += [b for b in self._direct(s) if b in self.held]
            # blocks below `checked` were committed when they filled; a prefix hit's blocks
            # are checked on first sight (another request may still hold one in the pool),
            # but for those another request fills in this very step: its commit takes them
            full = min(s.computed // g, len(s.blocks))
            lo = max(sink, self.checked.get(s.req_id, 0))
            quantize.update(b for b in s.blocks[lo:full] if b in self.held and b not in writing)
            self.checked[s.req_id] = max(lo, full)
        free = (free | set(self.recycled)) - quantize
        self.held -= quantize | free
        return len(quantize)

    def _direct(self, s: Scheduled) -> list[int]:
        """The blocks of `s` that its rows of this step write straight to their records."""
        if not (self.direct and self.direct(s.computed, s.new_tokens)):
            return []
        return [s.blocks[j] for j in filled_in_step(s.computed, s.new_tokens, self.tile,
                                                    self.sink) if j < len(s.blocks)]

    def _starting(self, plan: StepPlan) -> list[int]:
        """The blocks this step starts that hold no slot and are not written straight to
        their records, in order of first appearance."""
        g, out = self.tile, {}
        for s in plan.scheduled:
            if s.new_tokens <= 0:
                continue
            first = -(-s.computed // g)  # blocks from here on are written from offset 0
            last = (s.computed + s.new_tokens - 1) // g
            direct = set(self._direct(s))
            out.update((b, None) for b in s.blocks[first: last + 1]
                       if b not in self.held and b not in direct)
        return list(out)

    def allocate(self, plan: StepPlan) -> tuple[list[int], int, int]:
        """Give slots to the blocks this step starts, first making room by evicting
        retired sinks (oldest first) where the free slots fall short; -> (the evicted
        blocks, to quantize; slots given; slots still missing: 0 if the pool holds them
        all)."""
        start = self._starting(plan)
        short = len(start) - (self.pool_slots - len(self.held))
        evicted = list(self.retired)[: max(0, short)]
        for b in evicted:
            del self.retired[b]
            self.held.discard(b)
        granted = min(len(start), self.pool_slots - len(self.held))
        self.held.update(start[:granted])
        return evicted, granted, len(start) - granted


class PoolGroup:
    """The caches of the layers of one KV-cache group and their per-step bookkeeping.

    `on_finish` (see `OnFinish`) settles finished and preempted requests' blocks. Prefix
    caching needs them readable: vLLM may hand such a block to a later request as a prefix
    hit, after its pool slot went to another block. Without prefix caching nothing reads
    them again, and "drop" saves their quantize launch (in a burst of 64 x 1K prompts,
    every sequence's sink block at its end).

    `direct` (see `Direct`): the requests whose blocks a step opens and fills the layers
    write straight into their records; the step's slot mapping leaves their tokens out.
    """

    def __init__(self, caches: list[KVarNCache], tables: SlotTables,
                 on_finish: OnFinish = "quantize", direct: Direct | None = None) -> None:
        self.caches = caches
        self.tables = tables
        head = caches[0]
        self.mirror = PoolMirror(head.tile, head.sink_blocks, head.pool_slots, on_finish,
                                 direct)
        self.started = False
        # GPU-side counters read one step late through pinned copies (no step waits):
        # tokens that found no slot, and ready tiles the mirror did not count.
        self.backlog = torch.zeros((), dtype=torch.int32, device=head.device)
        pin = head.device.type == "cuda"
        self._seen = torch.zeros(2, dtype=torch.int32, pin_memory=pin)

    def _start(self) -> None:
        """Forget what warm-up and graph capture wrote: they ran on dummy batches."""
        self.tables.block_to_slot.fill_(-1)
        self.tables.slot_to_block.fill_(-1)
        self.tables.dropped_tokens.zero_()
        self.backlog.zero_()
        self._seen.zero_()
        self.started = True

    def _check_counters(self, sync: bool) -> None:
        """Raise if an earlier step lost tokens (no free slot) or left ready tiles
        unquantized (the host mirror went wrong)."""
        dropped, backlog = (int(x) for x in self._seen)
        pool = self.caches[0].pool_slots
        if dropped:
            # allocating on the GPU (sync), a pool too small for the step explains it;
            # from the mirror, which checks its count first, a block it missed does
            why = ("" if sync else
                   f" (the host-side mirror holds {len(self.mirror.held)} slots now; well "
                   f"below {pool}, it missed a block: please report it, KVARN_SYNC_COMMIT=1 "
                   "allocates on the GPU)")
            raise PoolExhausted(
                f"kvarn tail pool exhausted: {dropped} token writes found none of the "
                f"{pool} slots free, so their K/V were lost. Raise KVARN_POOL_SLOTS above "
                f"{pool}, or lower --max-num-seqs / --max-num-batched-tokens{why}")
        if backlog:
            raise RuntimeError(
                f"kvarn internal error: {backlog} tiles were ready to quantize but not "
                "counted by the host-side pool mirror; please report it with the vLLM "
                "arguments used (KVARN_SYNC_COMMIT=1 counts on the GPU instead)")

    def step(self, block_table: Tensor, seq_lens: Tensor, query_lens: Tensor,
             slot_mapping: Tensor, plan: StepPlan, *, sync: bool = False) -> None:
        """One step: quantize and free as the plan's finished requests and accepted blocks
        require, then allocate for the step's writes. `sync` counts the tiles on the GPU
        (one host sync) instead of trusting the mirror.

        Trusting it, a step the mirror finds nothing to quantize, free or allocate for
        (most decode steps) launches none of the ~35 small bookkeeping ops: their host
        time would hold up vLLM's next step. A tile the mirror missed is then counted at
        the next flush (a commit or a release) instead of this step's."""
        if not self.started:
            self._start()
        self._check_counters(sync)
        head = self.caches[0]
        n = self.mirror.flush(plan)
        evicted, granted, missing = self.mirror.allocate(plan)
        n += len(evicted)
        if missing and not sync:
            pool = self.mirror.pool_slots
            raise PoolExhausted(
                f"kvarn tail pool exhausted: this step starts {missing} more blocks than the "
                f"{pool} slots hold. Raise KVARN_POOL_SLOTS above {pool}, or lower "
                "--max-num-seqs / --max-num-batched-tokens")
        quantize = free = None
        if plan.finished:
            width = max(1, max(len(f.blocks) for f in plan.finished))
            table = torch.full((len(plan.finished), width), -1, dtype=torch.int32)
            for i, f in enumerate(plan.finished):
                table[i, : len(f.blocks)] = torch.tensor(f.blocks, dtype=torch.int32)
                table[i, : self.mirror.kept_sinks(f)] = -1  # retired: neither marked
            lens = torch.tensor([f.tokens for f in plan.finished], dtype=torch.int32)
            quantize, free = kvcache.release_marks(head, to_device(table, head.device),
                                                   to_device(lens, head.device))
            if self.mirror.on_finish == "drop":  # dropped with their slots, none quantized
                quantize, free = torch.zeros_like(quantize), free | quantize
        if evicted:
            marks = _block_marks(head, evicted)
            quantize = marks if quantize is None else quantize | marks
        if self.mirror.recycled:
            marks = _block_marks(head, self.mirror.recycled)
            free = marks if free is None else free | marks
            quantize = torch.zeros_like(marks) if quantize is None else quantize
        if block_table.shape[0] and (sync or n or quantize is not None):
            ready = kvcache.commit_marks(head, block_table, seq_lens, query_lens)
            ready &= ~_written_marks(head, slot_mapping)  # see written_blocks
            quantize = ready if quantize is None else quantize | ready
        if quantize is not None:
            kvcache.flush(self.caches, quantize, free if free is not None else
                          torch.zeros_like(quantize), None if sync else n,
                          backlog=None if sync else self.backlog)
        if sync or granted:
            kvcache.allocate(head, slot_mapping)
        # read by the next step; the layers' writes of this step count in the one after
        self._seen[0].copy_(self.tables.dropped_tokens, non_blocking=True)
        self._seen[1].copy_(self.backlog, non_blocking=True)


def _block_marks(cache: KVarNCache, blocks: list[int]) -> Tensor:
    """[num_blocks] bool on the device: `blocks` (host ids)."""
    ids = to_device(torch.tensor(blocks, dtype=torch.int64), cache.device)
    marks = torch.zeros(cache.num_blocks, dtype=torch.bool, device=cache.device)
    return marks.index_fill_(0, ids, True)


def _written_marks(cache: KVarNCache, slot_mapping: Tensor) -> Tensor:
    """[num_blocks] bool: the blocks `slot_mapping` writes (no host sync)."""
    n = cache.num_blocks
    marks = torch.zeros(n + 1, dtype=torch.bool, device=slot_mapping.device)
    marks[torch.where(slot_mapping >= 0, slot_mapping // cache.tile, n)] = True
    return marks[:n]


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without waiting for the GPU (pinned, asynchronous copy)."""
    if device.type != "cuda":
        return x
    return x.pin_memory().to(device, non_blocking=True)
