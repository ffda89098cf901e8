"""The vLLM bridge on the CPU against a real vLLM 0.26.0 install: registration and its
idempotency, the config / engine-args / CLI accepting kvarn dtypes, backend selection and
validation messages, page-size math, the request follower and the per-step pool rules."""

from __future__ import annotations

import json
import os
import types
import typing

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # the kernels must be defined under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvarn.format import HEAD_DIMS, PRESETS, layout
from kvarn_vllm import settings

vllm = pytest.importorskip("vllm", reason="the bridge tests need vLLM 0.26.0 (make test installs it)")


@pytest.fixture(scope="module")
def registered():
    from kvarn_vllm import plugin
    from vllm.platforms import current_platform

    # vLLM cannot infer a device type on a machine without a GPU (its CUDA wheel);
    # argparse and EngineArgs need one.
    if not current_platform.device_type:
        type(current_platform).device_type = "cpu"
    plugin.register()
    plugin.register()  # idempotent
    return plugin


# ---------------------------------------------------------------- settings (no vLLM needed)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_page_math(name, d):
    g = settings.tile(name)
    assert settings.slot_bytes(name, d) * g == layout(name, d).record_bytes


def test_pool_size_and_env(monkeypatch):
    assert settings.required_pool_slots(64, 8192, 128) == 2 * 64 + 64 + settings.POOL_SLACK
    assert settings.required_pool_slots(64, 8192, 128, speculative_tokens=3) == 3 * 64 + 72
    # prompt blocks straight to their records: room only for one chunked prefill's block
    direct = dict(prompt_blocks_pooled=False)
    assert settings.required_pool_slots(64, 8192, 128, **direct) == 2 * 64 + 1 + 8
    assert settings.required_pool_slots(64, 8192, 128, 3, **direct, partial_prefills=64) == (
        3 * 64 + 64 + 8)
    monkeypatch.setenv(settings.ENV_POOL_SLOTS, "100")
    assert settings.pool_slots(64, 8192, 128) == (100, 200)
    monkeypatch.setenv(settings.ENV_POOL_SLOTS, "lots")
    with pytest.raises(ValueError, match="KVARN_POOL_SLOTS must be a positive integer"):
        settings.pool_slots(64, 8192, 128)
    monkeypatch.setenv(settings.ENV_SINK_BLOCKS, "-1")
    with pytest.raises(ValueError, match="KVARN_SINK_BLOCKS"):
        settings.sink_blocks()


def test_prompt_blocks_skip_the_pool_only_where_flash_attention_serves_them_raw(
        registered, monkeypatch):
    """The pool is sized without room for a step's prompt blocks only where every block
    a step opens and fills is a prompt block that FlashAttention reads raw; the builder's
    rule picks exactly the fresh prompts and dense continuations of such steps."""
    from kvarn_vllm.backend import (
        DENSE_MAX_TOKENS,
        DENSE_MIN_QUERY,
        direct_prompts_only,
    )

    assert direct_prompts_only(True, 128, 16384, 0)
    assert direct_prompts_only(True, 128, DENSE_MAX_TOKENS, 3)
    assert not direct_prompts_only(False, 128, 16384, 0)  # the kernel serves prompts
    assert not direct_prompts_only(True, 64, 16384, 0)  # kernel chunks can fill a tile
    assert not direct_prompts_only(True, 128, DENSE_MAX_TOKENS + 1, 0)
    assert not direct_prompts_only(True, 128, 16384, 127)  # verify windows fill tiles
    monkeypatch.setenv(settings.ENV_CHUNK_INVARIANT, "1")  # every prompt row blockwise
    assert direct_prompts_only(True, 64, 16384, 0)
    assert not direct_prompts_only(True, 64, 16384, 63)

    builder = _builder(threshold=4, verify_len=4)
    assert builder.raw_prompt(0, 5) and not builder.raw_prompt(0, 4)  # a verify window
    assert builder.raw_prompt(1000, DENSE_MIN_QUERY)
    assert not builder.raw_prompt(1000, DENSE_MIN_QUERY - 1)  # the kernel's
    assert not builder.raw_prompt(DENSE_MAX_TOKENS - 100, 101)  # past the dense copy
    invariant = _builder(chunk_invariant=True, verify_len=4)
    assert invariant.raw_prompt(1000, 5) and not invariant.raw_prompt(1000, 4)
    assert not invariant.raw_prompt(DENSE_MAX_TOKENS - 100, 101)
    assert not _builder(flash_attention=False).raw_prompt(0, 500)
    # a decode, a fresh 300-token prompt (blocks 1 of 0..2) and a dense chunk at 1000 of
    # 300 tokens (blocks 8, 9 of 7..10): their first tokens and physical ids
    table = torch.arange(40, dtype=torch.int32).view(4, 10)
    md = _step_metadata([1, 300, 300, 5], [9, 300, 1300, 605], block_table=table)
    assert md.direct_starts.tolist() == [1 + 128, 301 + 8 * 128 - 1000, 301 + 9 * 128 - 1000]
    assert md.direct_blocks.tolist() == [11, 28, 29]
    dense = md.runs[1]
    assert dense.dense_blocks and dense.raw_from == 1000
    assert md.runs[2].dense_blocks == 0  # 5 rows: the kernel, nothing direct
    assert _step_metadata([1, 300], [9, 300], block_table=table,
                          direct=False).direct_starts is None


@pytest.mark.parametrize("flash, threshold, slots", [
    (False, 0, 2 * 16 + 2048 // 128 + 8),  # no FlashAttention: the kernel serves prompts
    (True, 0, 2 * 16 + 1 + 8),
    (True, 256, 2 * 16 + 16 + 8),  # every long prefill cut at 256 tokens a step
])
def test_the_impl_sizes_its_pool_from_vllms_config(registered, tmp_path, monkeypatch,
                                                   flash, threshold, slots):
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    from kvarn_vllm import backend

    monkeypatch.setattr(backend, "_flash_attention", lambda head_size: (
        (lambda *args, **kwargs: None) if flash else None))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_TINY))
    cfg = EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, max_model_len=1024,
                     max_num_batched_tokens=2048, max_num_seqs=16, dtype="float16",
                     kv_cache_dtype="kvarn_k4v2_g128", enforce_eager=True,
                     long_prefill_token_threshold=threshold).create_engine_config()
    with set_current_vllm_config(cfg):
        impl = backend.KVarNAttentionImpl(4, D, D ** -0.5, num_kv_heads=HK,
                                          kv_cache_dtype="kvarn_k4v2_g128")
    assert (impl.pool_slots, impl.pool_needed) == (slots, slots)
    assert impl.prompt_blocks_pooled == (not flash)


def test_layer_problems_name_the_fix():
    assert settings.layer_problems("kvarn_k4v2_g128", 128, 128) == []
    assert settings.layer_problems("kvarn_k4v2_g64", 64, None) == []
    [msg] = settings.layer_problems("kvarn_k4v2_g128", 80, None)
    assert "head_size 64, 128, 256" in msg and "--kv-cache-dtype auto" in msg
    [msg] = settings.layer_problems("kvarn_k4v2_g128", 128, 16)
    assert "--block-size 128" in msg
    assert "MLA" in settings.layer_problems("kvarn_k4v2_g128", 128, 128, use_mla=True)[0]
    assert "sliding-window" in settings.layer_problems("kvarn_k4v2_g128", 128, 128,
                                                       sliding_window=True)[0]
    assert "decoder self-attention" in settings.layer_problems(
        "kvarn_k4v2_g128", 128, 128, attn_type="encoder_decoder")[0]
    assert "one of" in settings.layer_problems("kvarn_k9v9_g128", 128, 128)[0]


# ---------------------------------------------------------------- registration


def test_dtypes_registered_once(registered):
    import vllm.config.cache as cache_cfg
    import vllm.v1.attention.selector as selector
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    names = typing.get_args(cache_cfg.CacheDType)
    for name in settings.DTYPES:
        assert names.count(name) == 1
        assert STR_DTYPE_TO_TORCH_DTYPE[name] is torch.uint8
    assert typing.get_args(selector.CacheDType) == names
    assert "fp8" in names and "auto" in names  # vLLM's own dtypes kept


def test_cache_config_engine_args_and_cli_accept_kvarn(registered):
    from pydantic import ValidationError
    from vllm.config import CacheConfig
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert CacheConfig(cache_dtype="kvarn_k4v2_g128", block_size=128).cache_dtype == \
        "kvarn_k4v2_g128"
    with pytest.raises(ValidationError):
        CacheConfig(cache_dtype="kvarn_nope", block_size=128)
    assert EngineArgs(model="m", kv_cache_dtype="kvarn_k2v2_g64").kv_cache_dtype == \
        "kvarn_k2v2_g64"
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    for name in settings.DTYPES:
        assert parser.parse_args(["--kv-cache-dtype", name]).kv_cache_dtype == name
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "kvarn_nope"])


def test_backend_registered_as_custom(registered):
    from kvarn_vllm.backend import KVarNAttentionBackend
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cls = AttentionBackendEnum.CUSTOM.get_class()
    assert cls is KVarNAttentionBackend and cls.get_name() == "CUSTOM"
    assert cls.forward_includes_kv_cache_update is False
    assert sorted(cls.get_supported_kernel_block_sizes()) == [64, 128]


def _validate(head_size=128, dtype=torch.float16, kv="kvarn_k4v2_g128", block=None, mla=False,
              sliding=False, attn_type="decoder", batch_invariant=False):
    from kvarn_vllm.backend import KVarNAttentionBackend
    from vllm.platforms.interface import DeviceCapability

    return KVarNAttentionBackend.validate_configuration(
        head_size, dtype, kv, block, mla, False, False, False, False, DeviceCapability(9, 0),
        attn_type, sliding, use_batch_invariant=batch_invariant)


def test_validation_messages(registered):
    assert _validate() == [] and _validate(block=128) == []
    assert _validate(64, torch.bfloat16, "kvarn_k4v4_g64", 64) == []
    reasons = _validate(head_size=96, dtype=torch.float32, block=64, mla=True, sliding=True)
    text = " | ".join(reasons)
    for fix in ("--kv-cache-dtype auto or fp8", "--block-size 128", "--dtype float16",
                "MLA", "sliding-window"):
        assert fix in text
    assert len(reasons) == 5  # vLLM's generic duplicates are dropped
    assert "decoder self-attention" in " ".join(_validate(attn_type="encoder"))


def test_auto_selection_wraps_the_platform(registered):
    from kvarn_vllm import vllm_0_26
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    seen = []

    class Platform:  # the shape of CudaPlatformBase.get_attn_backend_cls
        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            seen.append(selected_backend)
            return "path"

    vllm_0_26.select_backend_for_kvarn(Platform)
    vllm_0_26.select_backend_for_kvarn(Platform)  # idempotent: wrapped once
    cfg = lambda kv: types.SimpleNamespace(kv_cache_dtype=kv)  # noqa: E731
    Platform.get_attn_backend_cls(None, cfg("kvarn_k4v2_g128"))
    Platform.get_attn_backend_cls(None, cfg("auto"))
    Platform.get_attn_backend_cls(AttentionBackendEnum.FLASH_ATTN, cfg("kvarn_k4v2_g128"))
    assert seen == [AttentionBackendEnum.CUSTOM, None, AttentionBackendEnum.FLASH_ATTN]


@pytest.mark.parametrize("kv,d,hk", [("kvarn_k4v2_g128", 128, 8), ("kvarn_k2v2_g64", 64, 3)])
def test_pages_sized_as_one_record_per_block_and_head(registered, kv, d, hk):
    from kvarn_vllm.backend import KVarNAttentionBackend
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import TQFullAttentionSpec

    g = settings.tile(kv)
    vcfg = types.SimpleNamespace(cache_config=types.SimpleNamespace(block_size=g))
    layer = types.SimpleNamespace(kv_cache_dtype=kv, head_size=d, num_kv_heads=hk,
                                  sliding_window=None)
    spec = Attention.get_kv_cache_spec(layer, vcfg)
    assert isinstance(spec, TQFullAttentionSpec)
    record = layout(kv, d).record_bytes
    assert spec.page_size_bytes == hk * record
    shape = KVarNAttentionBackend.get_kv_cache_shape(10, g, hk, d, cache_dtype_str=kv)
    assert shape == (10, hk, record) and np.prod(shape) == 10 * spec.page_size_bytes
    bad = types.SimpleNamespace(cache_config=types.SimpleNamespace(block_size=16))
    with pytest.raises(ValueError, match=f"--block-size {g}"):
        Attention.get_kv_cache_spec(layer, bad)


# ---------------------------------------------------------------- request follower


def _output(new=(), cached=(), finished=(), preempted=(), scheduled=None, copies=None):
    cached = list(cached)
    return types.SimpleNamespace(
        scheduled_new_reqs=[types.SimpleNamespace(req_id=r, block_ids=(b,),
                                                  num_computed_tokens=c) for r, b, c in new],
        scheduled_cached_reqs=types.SimpleNamespace(
            req_ids=[r for r, *_ in cached], resumed_req_ids={r for r, _, _, res in cached if res},
            new_block_ids=[(b,) if b is not None else None for _, b, _, _ in cached],
            num_computed_tokens=[c for _, _, c, _ in cached]),
        num_scheduled_tokens=scheduled or {}, finished_req_ids=set(finished),
        preempted_req_ids=set(preempted), kv_cache_block_copies=copies)


def test_request_blocks_follow_the_scheduler():
    from kvarn_vllm.lifecycle import Finished, RequestBlocks, Scheduled

    rb = RequestBlocks()
    rb.observe(_output(new=[("a", [3, 4], 0), ("b", [7], 0)], scheduled={"a": 200, "b": 5}))
    assert rb.plan.scheduled == [Scheduled("a", [3, 4], 0, 200), Scheduled("b", [7], 0, 5)]
    rb.observe(_output(cached=[("a", [9], 200, False), ("b", None, 5, False)],
                       scheduled={"a": 60, "b": 1}))
    assert rb.blocks == {"a": [3, 4, 9], "b": [7]} and rb.tokens == {"a": 260, "b": 6}
    rb.observe(_output(cached=[("b", [2, 5], 0, True)], finished={"a"}, scheduled={"b": 130}))
    assert rb.plan.finished == [Finished("a", [3, 4, 9], 260)]
    assert rb.blocks == {"b": [2, 5]}  # resumed after preemption: the new list replaces
    rb.observe(_output(preempted={"b"}))
    assert rb.plan.finished == [Finished("b", [2, 5], 130)] and not rb.blocks
    assert rb.plan.scheduled == []
    with pytest.raises(NotImplementedError, match="--enable-prefix-caching"):
        rb.observe(_output(copies=[object()]))


# ---------------------------------------------------------------- per-step pool rules

G, HK, D = 64, 2, 64


def _layers(n_layers=2, num_blocks=24, slots=8, on_finish="quantize", direct=None):
    from kvarn_torch import cache as kvcache
    from kvarn_vllm import lifecycle

    tables = lifecycle.SlotTables(torch.full((num_blocks,), -1, dtype=torch.int32),
                                  torch.full((slots,), -1, dtype=torch.int32),
                                  torch.zeros((), dtype=torch.int32))
    caches = []
    for _ in range(n_layers):
        c = kvcache.init(num_blocks, HK, D, pool_slots=slots, preset="kvarn_k4v2_g64")
        c.block_to_slot, c.slot_to_block, c.dropped_tokens = (
            tables.block_to_slot, tables.slot_to_block, tables.dropped_tokens)
        caches.append(c)
    return caches, lifecycle.PoolGroup(caches, tables, on_finish, direct)


def _step_tables(rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(block table [len(rows), width] int32, -1 padded; slot mapping) of a step whose
    rows are (a request's blocks, its first position this step, its token count)."""
    width = max([len(blocks) for blocks, *_ in rows] + [1])
    table = torch.full((len(rows), width), -1, dtype=torch.int32)
    slots = []
    for i, (blocks, first, count) in enumerate(rows):
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        pos = torch.arange(first, first + count)
        slots.append(table[i, pos // G].long() * G + pos % G)
    return table, torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64)


def _run_step(caches, group, plan, rng, sync=False):
    """What the builder and the layers do in one step for `plan`: the attention metadata
    built from it, PoolGroup.step, then every layer's cache write."""
    from kvarn_torch import cache as kvcache

    rows = [s for s in plan.scheduled if s.new_tokens]
    table, sm = _step_tables([(s.blocks, s.computed, s.new_tokens) for s in rows])
    q = torch.tensor([s.new_tokens for s in rows], dtype=torch.int32)
    seq = torch.tensor([s.computed + s.new_tokens for s in rows], dtype=torch.int32)
    group.step(table, seq, q, sm, plan, sync=sync)
    for c in caches:
        k, v = (torch.randn(sm.numel(), HK, D, generator=rng).half() for _ in range(2))
        kvcache.write(c, k, v, sm)


def _schedule():
    """Scheduler outputs: two prompts, decodes, prefix hits on the first prompt's blocks
    (one while that prompt waits and its second block is still in the pool), a chunk that
    fills a block exactly, a finish and a preemption."""
    return [
        _output(new=[("a", [1, 2, 3], 0), ("b", [4, 5], 0)], scheduled={"a": 150, "b": 100}),
        _output(new=[("d", [1, 2, 8], 128)], cached=[("b", None, 100, False)],
                scheduled={"b": 1, "d": 10}),
        _output(cached=[("a", None, 150, False)], finished={"d"}, scheduled={"a": 1}),
        _output(cached=[("a", None, 151, False), ("b", None, 101, False)],
                scheduled={"a": 1, "b": 1}),
        _output(new=[("c", [1, 2, 6], 128)], cached=[("a", None, 152, False)],
                finished={"b"}, scheduled={"a": 1, "c": 30}),
        _output(cached=[("a", None, 153, False), ("c", None, 158, False)],
                scheduled={"a": 39, "c": 1}),
        _output(cached=[("a", [7], 192, False)], preempted={"c"}, scheduled={"a": 1}),
        _output(cached=[("a", None, 193, False)], scheduled={"a": 1}),
        _output(finished={"a"}),
    ]


@pytest.mark.parametrize("on_finish", ["quantize", "drop", "retire_sinks"])
def test_pool_group_mirror_counts_every_step_like_the_gpu(on_finish):
    """The host mirror's tile counts give the same records and slot tables as counting on
    the GPU, step by step, and the GPU finds nothing the mirror missed (finished requests'
    full blocks quantized, as prefix caching needs, dropped, or their sinks retired)."""
    from kvarn_vllm.lifecycle import RequestBlocks

    runs = []
    for sync in (True, False):
        caches, group = _layers(on_finish=on_finish)
        rb, rng, states = RequestBlocks(), torch.Generator().manual_seed(0), []
        for out in _schedule():
            rb.observe(out)
            _run_step(caches, group, rb.plan, rng, sync=sync)
            held = {int(b) for b in caches[0].slot_to_block if b >= 0}
            if not sync:
                assert held == group.mirror.held
            states.append((held, [c.pages.clone() for c in caches]))
        assert int(group.backlog) == 0 and int(caches[0].dropped_tokens) == 0
        # everything finished: every slot is free again, but for the retired sinks
        assert held == set(group.mirror.retired)
        assert held == ({1, 4} if on_finish == "retire_sinks" else set())
        runs.append(states)
    for (held_a, pages_a), (held_b, pages_b) in zip(*runs):
        assert held_a == held_b
        assert all(torch.equal(x, y) for x, y in zip(pages_a, pages_b))


def test_pool_group_step_matches_one_layer_at_a_time():
    from kvarn_torch import cache as kvcache
    from kvarn_vllm.lifecycle import Finished, Scheduled, StepPlan

    caches, group = _layers(num_blocks=12)
    rng = torch.Generator().manual_seed(0)
    table = torch.tensor([[2, 5, 7]], dtype=torch.int32)
    sm = torch.cat([b * G + torch.arange(G) for b in (2, 5)] + [7 * G + torch.arange(22)])
    group.step(table, torch.tensor([150]), torch.tensor([150]), sm,
               StepPlan([Scheduled("a", [2, 5, 7], 0, 150)]))
    kv = [tuple(torch.randn(150, HK, D, generator=rng).half() for _ in range(2)) for _ in caches]
    for c, (k, v) in zip(caches, kv):
        kvcache.write(c, k, v, sm)
    # one decode token: block 5 (accepted, not the sink) is committed in every layer
    group.step(table, torch.tensor([151]), torch.tensor([1]), torch.tensor([7 * G + 22]),
               StepPlan([Scheduled("a", [2, 5, 7], 150, 1)]))
    assert int(caches[0].block_to_slot[5]) == -1 and int(caches[0].block_to_slot[2]) >= 0
    for c, (k, v) in zip(caches, kv):
        single = kvcache.init(12, HK, D, pool_slots=8, preset="kvarn_k4v2_g64")
        kvcache.append(single, k, v, sm)
        kvcache.commit(single, table, torch.tensor([151]), torch.tensor([1]))
        assert torch.equal(c.pages[5], single.pages[5])  # the same bytes as layer by layer
    # the request finishes with 151 tokens: the sink is quantized, the partial block dropped
    group.step(table[:0], torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
               torch.zeros(0, dtype=torch.int64), StepPlan([], [Finished("a", [2, 5, 7], 151)]))
    assert (caches[0].slot_to_block == -1).all()
    assert all(c.pages[2].any() for c in caches)


def test_without_prefix_caching_finished_blocks_are_dropped_unquantized(monkeypatch):
    """keep_finished=False (vLLM without prefix caching): a finished request's blocks,
    full ones included, give their slots back and nothing is quantized for them; a commit
    in the same step still is."""
    from kvarn_torch import cache as kvcache
    from kvarn_vllm.lifecycle import Finished, Scheduled, StepPlan

    caches, group = _layers(on_finish="drop")
    rng = torch.Generator().manual_seed(0)
    _run_step(caches, group, StepPlan([Scheduled("a", [2, 5, 7], 0, 150),
                                       Scheduled("b", [3, 4, 6], 0, 130)]), rng)
    quantized = []
    real = kvcache._quantize_slots
    monkeypatch.setattr(kvcache, "_quantize_slots",
                        lambda layers, slots, blocks, impl: quantized.append(blocks.tolist())
                        or real(layers, slots, blocks, impl))
    # "a" (sink 2, full 5, partial 7) finishes; "b" decodes: its full block 4 is committed
    _run_step(caches, group, StepPlan([Scheduled("b", [3, 4, 6], 130, 1)],
                                      [Finished("a", [2, 5, 7], 150)]), rng)
    assert quantized == [[4]]
    held = {int(b) for b in caches[0].slot_to_block if b >= 0}
    assert held == group.mirror.held == {3, 6}
    assert all(not c.pages[b].any() for c in caches for b in (2, 5, 7))
    assert int(group.backlog) == 0


def test_retired_sinks_serve_prefix_hits_until_their_slots_are_needed():
    """on_finish="retire_sinks": a finished request's full sink keeps its slot (nothing
    quantized), a prefix hit reads it from the pool, and when a step needs the slot the
    oldest retired sink is quantized to the same bytes release would have written."""
    from kvarn_vllm.lifecycle import Finished, Scheduled, StepPlan

    def prompt_and_finish(on_finish):
        caches, group = _layers(slots=4, on_finish=on_finish)
        rng = torch.Generator().manual_seed(0)
        _run_step(caches, group, StepPlan([Scheduled("a", [2, 5], 0, 100)]), rng)
        _run_step(caches, group, StepPlan([], [Finished("a", [2, 5], 100)]), rng)
        return caches, group, rng

    released, _, _ = prompt_and_finish("quantize")
    caches, group, rng = prompt_and_finish("retire_sinks")
    assert group.mirror.retired == {2: None} and group.mirror.held == {2}
    assert int(caches[0].block_to_slot[2]) >= 0 and not caches[0].pages[2].any()
    sink = [c.pool_k[int(c.block_to_slot[2])].clone() for c in caches]
    # a prefix hit on the sink: read from the pool, live again, retired again at its end
    _run_step(caches, group, StepPlan([Scheduled("h", [2, 9], 64, 10)]), rng)
    assert not group.mirror.retired and int(caches[0].block_to_slot[2]) >= 0
    assert all(torch.equal(c.pool_k[int(c.block_to_slot[2])], k) for c, k in zip(caches, sink))
    _run_step(caches, group, StepPlan([], [Finished("h", [2, 9], 74)]), rng)
    assert group.mirror.retired == {2: None}
    # four new blocks and four slots: the retired sink makes room, quantized
    _run_step(caches, group, StepPlan([Scheduled("x", [10, 11, 12, 13], 0, 256)]), rng)
    assert not group.mirror.retired and int(caches[0].block_to_slot[2]) == -1
    assert all(torch.equal(c.pages[2], r.pages[2]) for c, r in zip(caches, released))
    held = {int(b) for b in caches[0].slot_to_block if b >= 0}
    assert held == group.mirror.held == {10, 11, 12, 13}
    assert int(group.backlog) == 0 and int(caches[0].dropped_tokens) == 0


def test_a_retired_sink_recycled_by_vllm_takes_new_tokens_in_its_slot():
    """vLLM may hand a retired sink's block id to a new request for other tokens (its
    prefix-cache entry evicted): the block keeps its slot, is written from offset 0 and,
    once full, committed to the same record bytes as a block that started in a fresh slot;
    a block allocated ahead of its writes stays retired (and evictable) until they come."""
    from kvarn_vllm.lifecycle import Finished, Scheduled, StepPlan

    def run(on_finish):
        caches, group = _layers(slots=4, on_finish=on_finish)
        rng = torch.Generator().manual_seed(1)
        n = [7, 9, 2, 11]  # tokens 0-63, 64-127, 128-191, 192-
        steps = [StepPlan([Scheduled("a", [2, 5], 0, 100)]),
                 StepPlan([], [Finished("a", [2, 5], 100)]),
                 StepPlan([Scheduled("n", n[:3], 0, 100)]),  # block 2 allocated ahead
                 StepPlan([Scheduled("n", n[:3], 100, 92)]),  # ... and written: full
                 StepPlan([Scheduled("n", n, 192, 1)])]  # blocks 9 and 2 committed
        for i, plan in enumerate(steps):
            _run_step(caches, group, plan, rng)
            if on_finish == "retire_sinks" and i == 2:
                assert group.mirror.retired == {2: None}  # not written yet: still retired
            held = {int(b) for b in caches[0].slot_to_block if b >= 0}
            assert held == group.mirror.held
        assert int(group.backlog) == 0 and int(caches[0].dropped_tokens) == 0
        return caches, group

    fresh, _ = run("quantize")
    reused, group = run("retire_sinks")
    assert not group.mirror.retired and group.mirror.held == {7, 11}
    for c, f in zip(reused, fresh):
        for b in (2, 9):
            assert c.pages[b].any() and torch.equal(c.pages[b], f.pages[b])


@pytest.mark.parametrize("sync", [False, True], ids=["mirror", "counted on the device"])
def test_a_retired_sink_recycled_as_a_block_written_straight_to_its_record(sync):
    """vLLM may hand a retired sink's block id to a new request as a block that its prompt
    rows open and fill in one step, written straight to its record (`write_blocks`): the
    slot, which holds the old sink, is freed unquantized; kept, it would shadow the new
    record (readers take the pool first) and be committed over it at the next step."""
    from kvarn_vllm.lifecycle import Finished, Scheduled, StepPlan

    caches, group = _layers(slots=4, on_finish="retire_sinks", direct=lambda c, n: True)
    rng = torch.Generator().manual_seed(1)
    _run_step(caches, group, StepPlan([Scheduled("a", [2, 5], 0, 100)]), rng)
    _run_step(caches, group, StepPlan([], [Finished("a", [2, 5], 100)]), rng)
    assert group.mirror.retired == {2: None} and int(caches[0].block_to_slot[2]) >= 0
    blocks = [7, 2, 9, 11]  # 2 and 9 filled by this step's rows, 7 the sink, 11 the tail
    table, sm = _step_tables([(blocks, 0, 200)])
    sm[G: 3 * G] = -1  # their tokens kept out of the pool writes (`keep_out_of_pool`)
    group.step(table, torch.tensor([200]), torch.tensor([200]), sm,
               StepPlan([Scheduled("n", blocks, 0, 200)]), sync=sync)
    held = {int(b) for b in caches[0].slot_to_block if b >= 0}
    assert held == group.mirror.held == {7, 11} and group.mirror.recycled == [2]
    assert int(caches[0].block_to_slot[2]) == -1
    assert all(not c.pages[2].any() for c in caches)  # not quantized: forward writes it
    group.step(table, torch.tensor([201]), torch.tensor([1]), torch.tensor([200]),
               StepPlan([Scheduled("n", blocks, 200, 1)]), sync=sync)
    assert all(not c.pages[2].any() for c in caches) and int(group.backlog) == 0


def test_finished_blocks_are_kept_for_prefix_caching_and_kv_connectors():
    from types import SimpleNamespace

    from vllm.config import CacheConfig
    from kvarn_vllm.backend import on_finish

    def cfg(prefix, transfer=None):
        return SimpleNamespace(cache_config=CacheConfig(enable_prefix_caching=prefix),
                               kv_transfer_config=transfer)

    assert on_finish(cfg(True)) == "retire_sinks"
    assert on_finish(cfg(False)) == "drop"
    assert on_finish(cfg(True, transfer=object())) == "quantize"
    assert on_finish(cfg(False, transfer=object())) == "quantize"


def test_a_step_with_nothing_to_do_launches_no_bookkeeping(monkeypatch):
    """A decode token inside a block the pool holds, nothing ready, nothing finished: the
    mirror knows it, and the step launches none of the cache's bookkeeping ops."""
    from kvarn_torch import cache as kvcache
    from kvarn_vllm.lifecycle import Scheduled, StepPlan

    caches, group = _layers()
    rng = torch.Generator().manual_seed(0)
    _run_step(caches, group, StepPlan([Scheduled("a", [1, 2], 0, G + 6)]), rng)
    for name in ("commit_marks", "release_marks", "flush", "allocate"):
        monkeypatch.setattr(kvcache, name,
                            lambda *a, name=name, **k: pytest.fail(f"{name} was launched"))
    _run_step(caches, group, StepPlan([Scheduled("a", [1, 2], G + 6, 1)]), rng)
    assert group.mirror.held == {1, 2}


def test_a_mirror_that_misses_tiles_stops_the_engine():
    """Step 1 has a ready tile the mirror forgot, and nothing else it knows to do: the
    GPU-side bookkeeping is skipped. Step 2 releases a request, so its flush counts the
    missed tiles on the GPU, and step 3 stops the engine."""
    from kvarn_vllm.lifecycle import RequestBlocks

    caches, group = _layers()
    rb, rng = RequestBlocks(), torch.Generator().manual_seed(0)
    outs = _schedule()
    rb.observe(outs[0])
    _run_step(caches, group, rb.plan, rng)
    group.mirror.held.clear()  # the mirror forgets the prompt's blocks: it counts 0 tiles
    for out in outs[1:3]:
        rb.observe(out)
        _run_step(caches, group, rb.plan, rng)
    rb.observe(outs[3])
    with pytest.raises(RuntimeError, match="not counted by the host-side pool mirror"):
        _run_step(caches, group, rb.plan, rng)


def test_pool_exhaustion_is_loud_before_tokens_are_lost():
    from kvarn_vllm.lifecycle import PoolExhausted, Scheduled, StepPlan

    caches, group = _layers(slots=2)
    table = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    sm = torch.arange(3 * G) + G  # three blocks, two slots
    with pytest.raises(PoolExhausted, match="KVARN_POOL_SLOTS"):
        group.step(table, torch.tensor([3 * G]), torch.tensor([3 * G]), sm,
                   StepPlan([Scheduled("a", [1, 2, 3], 0, 3 * G)]))


@pytest.mark.parametrize("sync", [True, False], ids=["counted on the device", "mirror"])
def test_tokens_lost_on_the_gpu_are_reported_a_step_later(sync):
    """Token writes that found no slot stop the engine two steps later (the count comes
    back asynchronously), naming the fix; the host mirror is suspected only where it
    allocated (here one that went wrong: it counts a slot too many)."""
    from kvarn_torch import cache as kvcache
    from kvarn_vllm.lifecycle import PoolExhausted, Scheduled, StepPlan

    caches, group = _layers(slots=2)
    if not sync:
        group.mirror.pool_slots = 3
    table = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    sm = torch.arange(3 * G) + G
    plan = StepPlan([Scheduled("a", [1, 2, 3], 0, 3 * G)])
    group.step(table, torch.tensor([3 * G]), torch.tensor([3 * G]), sm, plan, sync=sync)
    for c in caches:
        k = torch.zeros(3 * G, HK, D, dtype=torch.float16)
        kvcache.write(c, k, k, sm)
    plan = StepPlan([Scheduled("a", [1, 2, 3, 4], 3 * G, 1)])
    group.step(table, torch.tensor([3 * G + 1]), torch.tensor([1]), torch.tensor([4 * G]), plan,
               sync=sync)
    with pytest.raises(PoolExhausted, match="Raise KVARN_POOL_SLOTS above 2") as err:
        group.step(table, torch.tensor([3 * G + 2]), torch.tensor([1]),
                   torch.tensor([4 * G + 1]), plan, sync=sync)
    assert ("it missed a block" in str(err.value)) != sync


# ---------------------------------------------------------------- mixed batches


def test_mixed_runs_group_consecutive_fresh_prompts():
    from kvarn_vllm.backend import mixed_runs

    # 2 decodes, fresh a b, a continuation, an empty request, fresh c d, a verify row set
    starts = [0, 1, 2, 10, 15, 19, 19, 30, 32, 36]
    fresh = [False, False, True, True, False, False, True, True, False]
    runs = [(r.fresh, r.r0, r.r1, r.start, r.end, r.max_len)
            for r in mixed_runs(starts, fresh, first=2)]
    assert runs == [(True, 2, 4, 2, 15, 8), (False, 4, 5, 15, 19, 4),
                    (True, 6, 8, 19, 32, 11), (False, 8, 9, 32, 36, 4)]
    # every token after the decodes is served exactly once
    served = sorted(t for r in mixed_runs(starts, fresh, 2) for t in range(r.start, r.end))
    assert served == list(range(2, 36))


def _builder(threshold=1, flash_attention=True, tile=128, chunk_invariant=False,
             verify_len=1, direct=None):
    """A metadata builder without a vLLM config; `direct` defaults to its rule."""
    from kvarn_vllm.backend import KVarNMetadataBuilder

    builder = KVarNMetadataBuilder.__new__(KVarNMetadataBuilder)
    builder.reorder_batch_threshold, builder.flash_attention = threshold, flash_attention
    builder.tile = tile
    builder.chunk_invariant, builder.sink_blocks = chunk_invariant, 1
    builder.verify_len = verify_len
    builder.direct = flash_attention if direct is None else direct
    return builder


def _common_metadata(q_lens, seq_lens, block_table=None, device="cpu"):
    """What vLLM's CommonAttentionMetadata gives the builder of a step with these rows."""
    b = len(q_lens)
    qsl = torch.tensor([0, *np.cumsum(q_lens)], dtype=torch.int32)
    return types.SimpleNamespace(
        num_reqs=b, query_start_loc=qsl.to(device), query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32),
        block_table_tensor=(torch.zeros(b, 4, dtype=torch.int32) if block_table is None
                            else block_table),
        num_actual_tokens=int(qsl[-1]), max_query_len=max(q_lens))


def _step_metadata(q_lens, seq_lens, threshold=1, flash_attention=True, tile=128,
                   block_table=None, device="cpu", chunk_invariant=False, verify_len=1,
                   direct=None):
    return _builder(threshold, flash_attention, tile, chunk_invariant, verify_len,
                    direct)._metadata(_common_metadata(q_lens, seq_lens, block_table, device))


def test_equal_prompts_are_not_a_decode_batch(registered):
    md = _step_metadata([1, 1, 1], [40, 7, 300])
    assert md.uniform_query_len == 1 and md.num_decodes == 3 and md.runs == []
    verify = _step_metadata([3, 3], [40, 70], threshold=3)
    assert verify.uniform_query_len == 3
    # two fresh 8-token prompts: one FlashAttention run with device offsets [0, 8, 16]
    md = _step_metadata([8, 8], [8, 8])
    assert md.uniform_query_len == 0 and len(md.runs) == 1
    assert md.runs[0].cu.tolist() == [0, 8, 16] and md.runs[0].max_len == 8
    # a decode, a fresh prompt and a continuation; without FlashAttention all go to the cache
    md = _step_metadata([1, 5, 4], [9, 5, 20])
    assert [(r.fresh, r.r0) for r in md.runs] == [(True, 1), (False, 2)]
    assert md.runs[0].cu.tolist() == [0, 5]
    md = _step_metadata([1, 5, 4], [9, 5, 20], flash_attention=False)
    assert [(r.fresh, r.r0) for r in md.runs] == [(False, 1), (False, 2)]


def test_forward_writes_every_row_into_vllms_output(registered):
    """The impl's forward (no FlashAttention here, so every row goes through the cache
    kernel) writes each decode and continuation row straight into vLLM's output buffer,
    the values of direct kernel calls on the same rows."""
    from test_torch_attention import build_cache

    from kvarn_torch import triton_attention
    from kvarn_vllm.backend import KVarNAttentionImpl

    hk, hq, d, g = 2, 4, 64, 64
    lens = [150, 70, 10]
    cache, bt, sl = build_cache(preset="kvarn_k4v2_g64", d=d, hk=hk, lens=lens)
    assert cache.block_to_slot[bt[0, 1]] < 0  # a quantized block beside the pool ones
    dev = cache.device
    gen = torch.Generator().manual_seed(0)
    impl = KVarNAttentionImpl.__new__(KVarNAttentionImpl)  # no vLLM config needed
    impl.num_heads, impl.num_kv_heads, impl.head_size, impl.scale = hq, hk, d, d ** -0.5
    impl.cache, impl.pool_k, impl._fa = cache, cache.pool_k, None

    def run(q_lens):
        md = _step_metadata(q_lens, lens, flash_attention=False, tile=g, block_table=bt,
                            device=dev)
        query = torch.randn(sum(q_lens), hq * d, generator=gen).half().to(dev)
        output = torch.full_like(query, float("nan"))
        kv = torch.zeros(sum(q_lens), hk * d, dtype=torch.float16, device=dev)  # unread here
        assert impl.forward(None, query, kv, kv, cache.pages, md, output=output) is output
        return md, query.view(-1, hq, d), output.view(-1, hq, d)

    md, q, out = run([1, 1, 1])  # a decode batch (graph path)
    assert md.uniform_query_len == 1
    want = triton_attention.attention(q.view(3, 1, hq, d), cache, bt, sl)
    assert torch.equal(out, want.view(3, hq, d))
    md, q, out = run([1, 1, 4])  # two decodes, then the last 4 tokens of sequence 2
    assert md.num_decodes == 2 and len(md.runs) == 1
    decodes = triton_attention.attention(q[:2].view(2, 1, hq, d), cache, bt[:2], sl[:2])
    rows = triton_attention.attention(q[2:].view(1, 4, hq, d), cache, bt[2:], sl[2:])
    assert torch.equal(out[:2], decodes.view(2, hq, d))
    assert torch.equal(out[2:], rows.view(4, hq, d))


def test_long_continuations_run_dense_with_exact_key_offsets(registered):
    from kvarn_vllm.backend import DENSE_MAX_TOKENS, DENSE_MIN_QUERY

    # a decode, a verify-sized continuation (kernel), a long chunk over 1000 cached tokens
    md = _step_metadata([1, 3, DENSE_MIN_QUERY + 5], [9, 40, 1000 + DENSE_MIN_QUERY + 5])
    kernel, dense = md.runs
    assert kernel.dense_blocks == 0 and kernel.cu is None
    assert dense.dense_blocks == -(-(1000 + DENSE_MIN_QUERY + 5) // 128)
    assert dense.cu.tolist() == [0, DENSE_MIN_QUERY + 5]
    assert dense.cu_k.tolist() == [0, 1000 + DENSE_MIN_QUERY + 5]
    assert dense.cu_k.dtype == torch.int32
    no_fa = _step_metadata([1, 300], [9, 1300], flash_attention=False)
    assert no_fa.runs[0].dense_blocks == 0
    huge = _step_metadata([1, 300], [9, DENSE_MAX_TOKENS + 1])  # the kernel, no dense copy
    assert huge.runs[0].dense_blocks == 0


def _causal_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, out):
    """FlashAttention's varlen contract in float64: causal aligned at each sequence's end.
    Float64, so that a row's result, once rounded to the model dtype, does not depend on
    the other rows of its call (the matmuls' blocking), as the scheduler replays assume of
    FlashAttention (a row's keys, not its chunk, set its sums)."""
    group = q.shape[1] // k.shape[1]
    for i in range(cu_q.shape[0] - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        assert qe - qs <= max_q and ke - ks <= max_k
        qi = q[qs:qe].double()
        ki = k[ks:ke].double().repeat_interleave(group, 1)
        vi = v[ks:ke].double().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        pos_q = torch.arange(qe - qs, device=q.device)[:, None] + (ke - ks) - (qe - qs)
        s = s.masked_fill(torch.arange(ke - ks, device=q.device)[None, :] > pos_q,
                          float("-inf"))
        out[qs:qe] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vi).to(out.dtype)


@pytest.mark.parametrize("state", ["mixed", "pool"])
def test_dense_continuation_matches_exact_attention_over_the_cache(registered, state):
    from test_torch_attention import TOL, build_cache

    from kvarn_torch import attention_reference
    from kvarn_vllm.backend import KVarNAttentionImpl, Run

    d, hk, group, n, sq = 64, 2, 3, 300, 170
    cache, bt, sl = build_cache(preset="kvarn_k4v2_g64", d=d, hk=hk, lens=(n,), state=state)
    q = (2.0 * torch.randn(1, sq, hk * group, d, generator=torch.Generator().manual_seed(3))
         ).to(cache.dtype).to(cache.device)
    want = attention_reference.attention(q, cache, bt, sl,
                                         torch.tensor([sq], dtype=torch.int32, device=q.device))
    run = Run(False, 0, 1, 0, sq, sq, cu=torch.tensor([0, sq], dtype=torch.int32),
              dense_blocks=-(-n // 64) + 1, cu_k=torch.tensor([0, n], dtype=torch.int32))
    impl = types.SimpleNamespace(_fa=_causal_varlen_reference, scale=d ** -0.5)
    got = torch.empty_like(q[0])
    KVarNAttentionImpl._dense(impl, q[0], None, None, cache, bt[0], run, got)
    err = (got.float() - want[0]).abs().max() / want[0].abs().max()
    assert err < TOL[cache.dtype], f"relative error {err:.2e}"


# ---------------------------------------------------------------- KVARN_CHUNK_INVARIANT


def test_chunk_invariant_setting(monkeypatch):
    monkeypatch.delenv(settings.ENV_BATCH_INVARIANT, raising=False)
    assert not settings.chunk_invariant()
    monkeypatch.setenv(settings.ENV_CHUNK_INVARIANT, "1")
    assert settings.chunk_invariant()
    monkeypatch.setenv(settings.ENV_CHUNK_INVARIANT, "yes")
    with pytest.raises(ValueError, match="KVARN_CHUNK_INVARIANT must be 0 or 1"):
        settings.chunk_invariant()
    # unset, it follows vLLM's batch-invariant mode; set, it wins
    monkeypatch.delenv(settings.ENV_CHUNK_INVARIANT)
    monkeypatch.setenv(settings.ENV_BATCH_INVARIANT, "1")
    assert settings.chunk_invariant()
    monkeypatch.setenv(settings.ENV_CHUNK_INVARIANT, "0")
    assert not settings.chunk_invariant()
    monkeypatch.setenv(settings.ENV_BATCH_INVARIANT, "on")
    with pytest.raises(ValueError, match="VLLM_BATCH_INVARIANT must be an integer"):
        settings.batch_invariant()


def test_batch_invariant_vllm_selects_kvarn_with_chunk_invariant_reads(registered,
                                                                       monkeypatch):
    """VLLM_BATCH_INVARIANT=1 makes vLLM refuse backends without batch invariance: kvarn
    has it through the chunk-invariant reads, and says what to change when they are off."""
    from kvarn_vllm.backend import KVarNAttentionBackend

    monkeypatch.delenv(settings.ENV_CHUNK_INVARIANT, raising=False)
    monkeypatch.delenv(settings.ENV_BATCH_INVARIANT, raising=False)
    assert not KVarNAttentionBackend.supports_batch_invariance()
    monkeypatch.setenv(settings.ENV_BATCH_INVARIANT, "1")
    assert KVarNAttentionBackend.supports_batch_invariance()
    assert _validate(batch_invariant=True) == []
    monkeypatch.setenv(settings.ENV_CHUNK_INVARIANT, "0")
    reasons = _validate(batch_invariant=True)
    assert len(reasons) == 1  # vLLM's "batch invariance not supported" is dropped
    assert "unset KVARN_CHUNK_INVARIANT" in reasons[0]


def test_blockwise_tables_give_each_row_its_own_block_and_the_records_before():
    from kvarn_vllm.backend import blockwise_tables

    # rows at positions 100 .. 299 with 64-token blocks: blocks 1 .. 4, records of 0 .. 3
    cu, seen, pages = blockwise_tables(100, 200, 64)
    assert cu.tolist() == [0, 28, 92, 156, 200]  # rows 100-127, 128-191, 192-255, 256-299
    assert seen.tolist() == [128, 192, 256, 300]
    # each sequence reads its pages up to its own block; what follows is never read
    assert [row[: j + 2] for j, row in enumerate(pages.tolist())] == [
        [0, 4], [0, 1, 5], [0, 1, 2, 6], [0, 1, 2, 3, 7]]
    assert cu.dtype == seen.dtype == pages.dtype == torch.int32
    assert [x.tolist() for x in blockwise_tables(0, 10, 64)] == [[0, 10], [10], [[0]]]


def test_chunk_invariant_steps_snapshot_the_blocks_their_rows_fill(registered):
    bt = torch.arange(40, dtype=torch.int32).view(4, 10)
    # a decode; a prompt of 300 rows (fills blocks 0, 1; 0 is the sink); a continuation
    # of rows 250 .. 389 (fills block 1 at 255 and block 2 at 383); a verify window
    # 126 .. 129 (fills block 0: the sink)
    md = _step_metadata([1, 300, 140, 4], [9, 300, 390, 130], tile=128, block_table=bt,
                        chunk_invariant=True, flash_attention=False)
    assert md.chunk_invariant and md.uniform_query_len == 0
    # exactly these: the snapshot's quantize launch is sized by them
    assert md.snapshot_blocks.tolist() == [11, 21, 22]
    spec = _step_metadata([1, 300, 140, 4], [9, 300, 390, 130], tile=128, block_table=bt,
                          chunk_invariant=True, flash_attention=False, verify_len=4)
    assert spec.snapshot_blocks.tolist() == [11, 21, 22]  # counted on the device
    window = _step_metadata([4, 4], [130, 258], tile=128, block_table=bt[:2],
                            chunk_invariant=True, verify_len=4)
    assert window.snapshot_blocks.tolist() == [11]  # rows 254 .. 257 pass block 1's end
    # a chunk whose last row fills a block: written ahead too, for a prefix hit on it in
    # this step (test_chunk_invariant_prefix_hits_give_the_rows_of_the_request_alone)
    # (or straight to its record where FlashAttention serves the chunk)
    for verify_len in (1, 4):
        exact = _step_metadata([1, 128], [9, 256], tile=128, block_table=bt[:2],
                               chunk_invariant=True, verify_len=verify_len, direct=False)
        assert exact.snapshot_blocks.tolist() == [11]
        exact = _step_metadata([1, 128], [9, 256], tile=128, block_table=bt[:2],
                               chunk_invariant=True, verify_len=verify_len)
        assert exact.snapshot_blocks.tolist() == [] and exact.direct_blocks.tolist() == [11]
    # one request per launch, none through FlashAttention on raw K/V
    assert [(r.fresh, r.blockwise) for r in md.runs] == [(False, False)] * 3
    # where FlashAttention serves the prompt rows, the blocks they open and fill (11 and
    # 22) go straight to their records: the snapshot keeps block 1 of the continuation
    for verify_len in (1, 4):
        direct = _step_metadata([1, 300, 140, 4], [9, 300, 390, 130], tile=128,
                                block_table=bt, chunk_invariant=True, verify_len=verify_len)
        assert direct.direct_blocks.tolist() == [11, 22]
        assert direct.snapshot_blocks.tolist() == [21]
    decode = _step_metadata([1, 1], [9, 300], block_table=bt[:2], chunk_invariant=True)
    assert decode.snapshot_blocks is None
    off = _step_metadata([1, 300], [9, 300], block_table=bt[:2])
    assert off.snapshot_blocks is None and not off.chunk_invariant


def test_chunk_invariant_prompts_run_blockwise_and_verify_windows_the_kernel(registered):
    from kvarn_vllm.backend import DENSE_MAX_TOKENS

    # rows 228 .. 527 lie in blocks 1 .. 4
    bt = torch.arange(24, dtype=torch.int32).view(3, 8)
    md = _step_metadata([1, 4, 300], [9, 130, 528], chunk_invariant=True, verify_len=4,
                        block_table=bt)
    verify, prompt = md.runs
    assert not verify.blockwise and verify.cu is None
    assert prompt.blockwise and prompt.max_keys == 5 * 128
    assert prompt.cu.tolist() == [0, 28, 156, 284, 300]
    assert prompt.seqused_k.tolist() == [256, 384, 512, 528]
    # the pages' physical blocks: 1 .. 3 from their records, then the sink 0 and the
    # rows' own blocks 1 .. 4 as stored
    assert prompt.page_blocks.tolist() == [17, 18, 19, 16, 17, 18, 19, 20]
    assert prompt.page_records == 3
    assert prompt.page_table.shape == (4, 5)  # each row: earlier pages, then its own
    assert [row[: j + 2] for j, row in enumerate(prompt.page_table.tolist())] == [
        [3, 4], [3, 0, 5], [3, 0, 1, 6], [3, 0, 1, 2, 7]]
    assert prompt.max_len == 128
    huge = _step_metadata([1, 300], [9, DENSE_MAX_TOKENS + 1], chunk_invariant=True)
    assert not huge.runs[0].blockwise


def _paged_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, out, *, seqused_k,
                            block_table):
    """FlashAttention's paged varlen contract in float64: sequence i's keys are the first
    seqused_k[i] tokens of its pages, causal aligned at its end."""
    assert cu_k is None
    g = k.shape[1]
    for i in range(cu_q.shape[0] - 1):
        n = int(seqused_k[i])
        pages = block_table[i, : -(-n // g)].long()
        ki = k[pages].flatten(0, 1)[:n]
        vi = v[pages].flatten(0, 1)[:n]
        qs, qe = int(cu_q[i]), int(cu_q[i + 1])
        _causal_varlen_reference(q[qs:qe], ki, vi, torch.tensor([0, qe - qs]),
                                 torch.tensor([0, n]), max_q, max_k, scale, out[qs:qe])


@pytest.mark.parametrize("fa", ["contract", "vllm"])
@pytest.mark.parametrize("start,g", [(0, 64), (100, 64), (100, 128)])
def test_blockwise_prompt_rows_match_the_chunk_invariant_reference(registered, start, g, fa):
    """A prompt chunk (rows start .. 299 of a 300-token sequence, all in the pool, records
    of its full blocks written ahead) through the paged FlashAttention contract (in
    float64 here; vLLM's own FlashAttention on a GPU) equals the exact chunk-invariant
    attention over the cache."""
    from test_torch_attention import TOL, build_cache

    from kvarn_torch import attention_reference
    from kvarn_torch import cache as kc
    from kvarn_vllm.backend import KVarNAttentionImpl, _flash_attention

    flash = _paged_varlen_reference
    if fa == "vllm":
        flash = _flash_attention(64) if torch.cuda.is_available() else None
        if flash is None:
            pytest.skip("needs a GPU and vLLM's FlashAttention build")

    d, hk, group, n = 64, 2, 3, 300
    sq = n - start
    cache, bt, sl = build_cache(preset=f"kvarn_k4v2_g{g}", d=d, hk=hk, lens=(n,), state="pool")
    dev = cache.device
    md = _step_metadata([sq], [n], tile=g, block_table=bt, device=dev, chunk_invariant=True,
                        direct=False)  # every block in the pool
    kc.snapshot(cache, md.snapshot_blocks)
    assert sorted(b for b in md.snapshot_blocks.tolist() if b >= 0) == sorted(
        bt[0, max(1, start // g): n // g].tolist())
    q = (2.0 * torch.randn(1, sq, hk * group, d, generator=torch.Generator().manual_seed(3))
         ).to(cache.dtype).to(dev)
    ql = torch.tensor([sq], dtype=torch.int32, device=dev)
    want = attention_reference.attention(q, cache, bt, sl, ql, chunk_invariant=True)
    (run,) = md.runs
    assert run.blockwise
    impl = types.SimpleNamespace(_fa=flash, scale=d ** -0.5)
    got = torch.empty_like(q[0])
    KVarNAttentionImpl._blockwise(impl, q[0], None, None, cache, run, got)
    err = (got.float() - want[0]).abs().max() / want[0].abs().max()
    assert err < TOL[cache.dtype], f"relative error {err:.2e}"
    plain = attention_reference.attention(q, cache, bt, sl, ql)
    assert (plain - want).abs().max() / want.abs().max() > 3 * TOL[cache.dtype]


def test_blockwise_serves_consecutive_prompts_in_one_call(registered):
    """Two requests' prompt rows of one step (rows 100 .. 299 of a 300-token sequence,
    rows 0 .. 199 of a 200-token one) run as one gather and one FlashAttention call (its
    contract in float64) and give each the exact chunk-invariant attention."""
    from test_torch_attention import TOL, build_cache

    from kvarn_torch import attention_reference
    from kvarn_torch import cache as kc
    from kvarn_vllm.backend import KVarNAttentionImpl

    d, hk, group, g, sq = 64, 2, 3, 64, 200
    cache, bt, sl = build_cache(preset="kvarn_k4v2_g64", d=d, hk=hk, lens=(300, 200),
                                state="pool")
    md = _step_metadata([sq, sq], [300, 200], tile=g, block_table=bt, device=cache.device,
                        chunk_invariant=True, direct=False)  # every block in the pool
    kc.snapshot(cache, md.snapshot_blocks)
    (run,) = md.runs
    assert run.blockwise and (run.r0, run.r1, run.start, run.end) == (0, 2, 0, 2 * sq)
    assert run.cu.tolist() == [0, 28, 92, 156, 200, 264, 328, 392, 400]
    assert run.page_records == 3 + 2  # blocks 1 .. 3 and 1 .. 2
    q = (2.0 * torch.randn(2, sq, hk * group, d, generator=torch.Generator().manual_seed(4))
         ).to(cache.dtype).to(cache.device)
    ql = torch.tensor([sq, sq], dtype=torch.int32, device=cache.device)
    want = attention_reference.attention(q, cache, bt, sl, ql, chunk_invariant=True)
    impl = types.SimpleNamespace(_fa=_paged_varlen_reference, scale=d ** -0.5)
    got = torch.empty(2 * sq, hk * group, d, dtype=cache.dtype, device=cache.device)
    KVarNAttentionImpl._blockwise(impl, q.flatten(0, 1), None, None, cache, run, got)
    err = (got.view(2, sq, -1, d).float() - want).abs().max() / want.abs().max()
    assert err < TOL[cache.dtype], f"relative error {err:.2e}"


def test_blockwise_groups_keep_their_pages_bounded(registered, monkeypatch):
    from kvarn_vllm import backend

    monkeypatch.setattr(backend, "DENSE_MAX_TOKENS", 600)
    # a verify-length request between prompts splits the group; so do pages past the bound
    md = _step_metadata([200, 200, 1, 300, 300], [300, 200, 9, 300, 400], tile=64,
                        block_table=torch.arange(50, dtype=torch.int32).view(5, 10),
                        chunk_invariant=True, verify_len=4)
    assert [(r.r0, r.r1, r.blockwise) for r in md.runs] == [
        (0, 2, True), (2, 3, False), (3, 4, True), (4, 5, True)]
    # records of blocks 1 .. 3 and 1 .. 2; the sinks and own blocks 1 .. 4 and 0 .. 3
    assert md.runs[0].page_blocks.shape[0] == (3 + 2) + (1 + 4) + (1 + 4)


def test_chunk_invariant_forward_snapshots_then_reads_records(registered):
    """forward with chunk-invariant metadata (no FlashAttention here: the kernel) writes
    the records of the blocks the step fills, then gives the rows the kernel's
    chunk-invariant values."""
    from test_torch_attention import build_cache

    from kvarn_torch import triton_attention
    from kvarn_vllm.backend import KVarNAttentionImpl

    hk, hq, d, g = 2, 4, 64, 64
    lens = [200, 10]
    cache, bt, sl = build_cache(preset="kvarn_k4v2_g64", d=d, hk=hk, lens=lens, state="pool")
    dev = cache.device
    impl = KVarNAttentionImpl.__new__(KVarNAttentionImpl)
    impl.num_heads, impl.num_kv_heads, impl.head_size, impl.scale = hq, hk, d, d ** -0.5
    impl.cache, impl.pool_k, impl._fa = cache, cache.pool_k, None
    md = _step_metadata([1, 150], [10, 200], flash_attention=False, tile=g,
                        block_table=bt[[1, 0]], device=dev, chunk_invariant=True)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(151, hq * d, generator=gen).half().to(dev)
    output = torch.empty_like(query)
    kv = torch.zeros(151, hk * d, dtype=torch.float16, device=dev)
    assert cache.pages[bt[0, 1]].eq(0).all()  # no record yet
    impl.forward(None, query, kv, kv, cache.pages, md, output=output)
    assert not cache.pages[bt[0, 1]].eq(0).all() and not cache.pages[bt[0, 2]].eq(0).all()
    assert int(cache.block_to_slot[bt[0, 1]]) >= 0  # slot kept
    rows = triton_attention.attention(query[1:].view(1, 150, hq, d), cache, bt[:1], sl[:1],
                                      chunk_invariant=True)
    assert torch.equal(output[1:].view(150, hq, d), rows.view(150, hq, d))


# The scheduler replays' engine: KV blocks, sequences and tokens per step
REPLAY_BLOCKS, REPLAY_SEQS, REPLAY_TOKENS = 48, 8, 128


def _flash_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, out, *, seqused_k=None,
                     block_table=None):
    """FlashAttention's contract in float64, varlen or paged (`backend._flash_attention`)."""
    if block_table is None:
        _causal_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, out)
    else:
        _paged_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, out,
                                seqused_k=seqused_k, block_table=block_table)


def _replay(steps, features, hq: int = 4, *, prefix_caching: bool = True, spec: int = 0,
            chunk_invariant: bool = True, direct: bool = True, stats: dict | None = None):
    """Scheduler steps ((a SchedulerOutput, the rows (request, first position, count) in
    batch order)) through the request follower, the metadata builder, the pool rules, the
    cache write and the forward of one layer (FlashAttention's contract in float64), as a
    vLLM worker runs them with `spec` speculative tokens, with chunk-invariant or default
    reads, the prompt blocks a step opens and fills written straight to their records
    (`direct`, as where vLLM's FlashAttention is there) or through the pool. `features(request, first, count)` gives the rows' K, V
    [count, HK, D] and queries [count, hq * D]. Returns {(request, position): row}, a row
    recomputed after a rejected draft by its last value; `stats` gets the slots held in
    each step ("held") and the blocks written straight to their records ("direct")."""
    from kvarn_torch import cache as kvcache
    from kvarn_vllm import lifecycle
    from kvarn_vllm.backend import KVarNAttentionImpl, keep_out_of_pool, on_finish

    from test_torch_attention import DEVICE

    config = types.SimpleNamespace(kv_transfer_config=None, cache_config=types.SimpleNamespace(
        enable_prefix_caching=prefix_caching))
    builder = _builder(1 + spec, tile=G, chunk_invariant=chunk_invariant, verify_len=1 + spec,
                       direct=direct)
    slots = settings.required_pool_slots(REPLAY_SEQS, REPLAY_TOKENS, G, spec,
                                         prompt_blocks_pooled=not direct)
    cache = kvcache.init(REPLAY_BLOCKS, HK, D, pool_slots=slots, preset="kvarn_k4v2_g64",
                         device=DEVICE)
    group = lifecycle.PoolGroup([cache], lifecycle.SlotTables(
        cache.block_to_slot, cache.slot_to_block, cache.dropped_tokens),
        on_finish(config), direct=builder.raw_prompt if direct else None)
    follower = lifecycle.RequestBlocks()
    impl = KVarNAttentionImpl.__new__(KVarNAttentionImpl)
    impl.num_heads, impl.num_kv_heads, impl.head_size, impl.scale = hq, HK, D, D ** -0.5
    impl.cache, impl.pool_k, impl._fa = cache, cache.pool_k, _flash_reference
    rows_out = {}
    held, written = [], 0
    for out, rows in steps:
        follower.observe(out)
        if not rows:
            continue
        bt, sm = (t.to(DEVICE) for t in _step_tables(
            [(follower.blocks[r], s, n) for r, s, n in rows]))
        k, v, query = (torch.cat(x).to(DEVICE) for x in zip(*(features(*row) for row in rows)))
        md = builder._metadata(_common_metadata([n for *_, n in rows],
                                                [s + n for _, s, n in rows], bt, DEVICE))
        keep_out_of_pool(md, sm, G)
        group.step(md.block_table, md.seq_lens, md.query_lens(), sm, follower.plan,
                   sync=settings.sync_commit(spec))
        held.append(int((cache.slot_to_block >= 0).sum()))
        written += 0 if md.direct_blocks is None else md.direct_blocks.shape[0]
        kvcache.write(cache, k, v, sm)
        output = torch.full_like(query, float("nan"))
        impl.forward(None, query, k.flatten(1), v.flatten(1), cache.pages, md, output=output)
        at = 0
        for r, s, n in rows:
            rows_out.update({(r, s + i): output[at + i] for i in range(n)})
            at += n
    assert int(cache.dropped_tokens) == 0
    if stats is not None:
        stats.update(held=held, direct=written)
    return rows_out


@pytest.mark.parametrize("when", ["later step", "same step", "same step, partial block"])
def test_chunk_invariant_prefix_hits_give_the_rows_of_the_request_alone(registered, when):
    """Request b shares a's first 256 tokens (4 blocks) and hits them in the prefix cache:
    its prompt rows and its first decode row equal, bit for bit, those of b computed alone
    in other chunks. "same step": b hits a's blocks in the step whose rows fill them
    (vLLM caches a block's hash when it schedules the rows that fill it), block 3 at a's
    last row: b reads block 3 from its record, which that step must write ahead. "partial
    block": a's block 1 was half written the step before; b's hit must not commit it (it
    would be quantized half written and lose its slot under a's writes). The schedules
    are those vLLM 0.26's scheduler makes of such requests; the blocks a step opens and
    fills go straight to their records, while b alone writes them through the pool."""
    gen = torch.Generator().manual_seed(7)
    kv_b = 2 * torch.randn(2, 401, HK, D, generator=gen).half()
    kv = {"b": kv_b,
          "a": torch.cat([kv_b[:, :256], torch.randn(2, 145, HK, D, generator=gen).half()], 1)}
    q = torch.randn(401, 4 * D, generator=gen).half()

    def features(r, s, n):
        return kv[r][0, s: s + n], kv[r][1, s: s + n], q[s: s + n]

    def replay(steps, **kwargs):
        return _replay([(_output(**out), rows) for out, rows in steps], features, **kwargs)

    alone = replay([
        (dict(new=[("b", list(range(10, 17)), 0)], scheduled={"b": 100}), [("b", 0, 100)]),
        (dict(cached=[("b", None, 100, False)], scheduled={"b": 300}), [("b", 100, 300)]),
        (dict(cached=[("b", None, 400, False)], scheduled={"b": 1}), [("b", 400, 1)]),
    ], direct=False)  # through the pool: the blocks written straight give the same rows
    a, b = list(range(5)), list(range(4)) + [17, 18, 19]
    steps = [(dict(new=[("a", a, 0)], scheduled={"a": 128}), [("a", 0, 128)])]
    if when == "same step, partial block":
        steps = [
            (dict(new=[("a", a, 0)], scheduled={"a": 100}), [("a", 0, 100)]),
            (dict(cached=[("a", None, 100, False)], new=[("b", b, 256)],
                  scheduled={"a": 200, "b": 144}), [("a", 100, 200), ("b", 256, 144)]),
            (dict(cached=[("a", None, 300, False), ("b", None, 400, False)],
                  scheduled={"a": 1, "b": 1}), [("a", 300, 1), ("b", 400, 1)])]
    elif when == "same step":
        steps += [
            (dict(cached=[("a", None, 128, False)], new=[("b", b, 256)],
                  scheduled={"a": 128, "b": 144}), [("a", 128, 128), ("b", 256, 144)]),
            (dict(cached=[("a", None, 256, False), ("b", None, 400, False)],
                  scheduled={"a": 44, "b": 1}), [("b", 400, 1), ("a", 256, 44)])]
    else:
        steps += [
            (dict(cached=[("a", None, 128, False)], scheduled={"a": 128}), [("a", 128, 128)]),
            (dict(cached=[("a", None, 256, False)], new=[("b", b, 256)],
                  scheduled={"a": 44, "b": 144}), [("a", 256, 44), ("b", 256, 144)]),
            (dict(cached=[("a", None, 300, False), ("b", None, 400, False)],
                  scheduled={"a": 1, "b": 1}), [("a", 300, 1), ("b", 400, 1)])]
    hit = replay(steps)
    for p in range(256, 401):
        assert torch.equal(hit[("b", p)], alone[("b", p)]), f"row {p}"


def test_chunk_invariant_verify_batches_leave_full_cuda_graphs(registered, monkeypatch):
    from vllm.v1.attention.backend import AttentionCGSupport

    from kvarn_vllm.backend import KVarNMetadataBuilder

    spec = types.SimpleNamespace(speculative_config=types.SimpleNamespace())
    plain = types.SimpleNamespace(speculative_config=None)
    support = KVarNMetadataBuilder.get_cudagraph_support
    assert support(spec, None) == AttentionCGSupport.UNIFORM_BATCH
    monkeypatch.setenv(settings.ENV_CHUNK_INVARIANT, "1")
    assert support(spec, None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    assert support(plain, None) == AttentionCGSupport.UNIFORM_BATCH


@pytest.mark.parametrize("spec", [0, 3], ids=["host mirror", "counted on the device"])
def test_prompt_blocks_written_straight_to_records_give_the_rows_of_the_pool(registered,
                                                                              spec):
    """Default reads: the prompt blocks a step opens and fills, written straight to their
    records (`cache.write_blocks`, no pool slot), give every row bit for bit what writing
    them through the pool and committing them at the next step gives: a fresh prompt
    (FlashAttention over raw K/V), a dense continuation (its own blocks from its K/V, not
    their records), a kernel continuation that completes a block an earlier chunk began,
    and decodes reading them all; with fewer slots held, allocated from the host mirror or
    (with speculative decoding) on the device."""
    gen = torch.Generator().manual_seed(5)
    kv = {r: 2 * torch.randn(2, 320, HK, D, generator=gen).half() for r in "ab"}
    q = torch.randn(320, 4 * D, generator=gen).half()

    def features(r, s, n):
        return kv[r][0, s: s + n], kv[r][1, s: s + n], q[s: s + n]

    steps = [
        (dict(new=[("a", list(range(6)), 0)], scheduled={"a": 128}), [("a", 0, 128)]),
        (dict(cached=[("a", None, 128, False)], scheduled={"a": 128}), [("a", 128, 128)]),
        (dict(cached=[("a", None, 256, False)], new=[("b", list(range(6, 11)), 0)],
              scheduled={"a": 44, "b": 100}), [("a", 256, 44), ("b", 0, 100)]),
        (dict(cached=[("a", None, 300, False), ("b", None, 100, False)],
              scheduled={"a": 1, "b": 60}), [("a", 300, 1), ("b", 100, 60)]),
        (dict(cached=[("a", None, 301, False), ("b", None, 160, False)],
              scheduled={"a": 1, "b": 1}), [("a", 301, 1), ("b", 160, 1)]),
    ]
    runs = {}
    for direct in (False, True):
        stats = {}
        rows = _replay([(_output(**out), rows) for out, rows in steps], features,
                       prefix_caching=False, spec=spec, chunk_invariant=False, direct=direct,
                       stats=stats)
        runs[direct] = rows, stats
    (pooled, before), (direct, after) = runs[False], runs[True]
    assert after["direct"] == 3 and before["direct"] == 0  # a's blocks 1, 2 and 3
    assert all(x <= y for x, y in zip(after["held"], before["held"], strict=True))
    assert sum(after["held"]) < sum(before["held"])
    assert pooled.keys() == direct.keys() and len(pooled) == 302 + 161
    for key in pooled:
        assert torch.equal(direct[key], pooled[key]), f"request {key[0]}, position {key[1]}"


# ---------------------------------------------------------------- vLLM's scheduler, replayed

LLAMA_TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                  hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=HK, head_dim=D,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="float16")


def _next_token(request: str, position: int) -> int:
    """The scheduler replay's model: the token it samples for `position` of `request`."""
    return 1000 + (int(request) * 7919 + position * 104729) % 20000


def _draft(request: str, position: int) -> int:
    """The replay's drafter: right except at every fourth position, so verify windows end
    in acceptances and rejections of every length."""
    return _next_token(request, position) + (position % 4 == 0)


def _scheduled_rows(tmp_path, token_prompts, prefix_caching: bool, new_tokens: int,
                    spec: int = 0):
    """vLLM 0.26's scheduler (no model: each request's next token is a function of its id
    and position, `_next_token`) on `token_prompts` with G-token blocks and a 128-token
    budget per step, with `spec` ngram draft tokens (`_draft`) per decode step; yields each
    step's (scheduler output, rows (request, first position, count) with the decode and
    verify rows first as vLLM's model runner orders them, the rows' input tokens by
    request, drafts included)."""
    pytest.importorskip("xgrammar", reason="vllm.v1.request imports it (make test installs it)")
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_TINY))
    drafting = dict(method="ngram", num_speculative_tokens=spec, prompt_lookup_max=4,
                    prompt_lookup_min=2) if spec else None
    cfg = EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, max_model_len=1024,
                     max_num_batched_tokens=REPLAY_TOKENS, max_num_seqs=REPLAY_SEQS,
                     block_size=G,
                     enable_prefix_caching=prefix_caching, async_scheduling=False,
                     speculative_config=drafting, dtype="float16",
                     enforce_eager=True).create_engine_config()
    cfg.cache_config.num_gpu_blocks = REPLAY_BLOCKS
    layer = FullAttentionSpec(block_size=G, num_kv_heads=HK, head_size=D, dtype=torch.float16)
    init_none_hash(sha256)
    groups = [KVCacheGroupSpec(["layer"], layer)]
    sched = Scheduler(cfg, KVCacheConfig(REPLAY_BLOCKS, [], groups),
                      StructuredOutputManager(cfg), block_size=G)
    tokens = {}
    for i, p in enumerate(token_prompts):
        tokens[str(i)] = list(p)
        sched.add_request(Request(str(i), list(p), SamplingParams(
            max_tokens=new_tokens, ignore_eos=True, temperature=0.0), None,
            block_hasher=get_request_block_hasher(G, sha256)))
    while sched.get_num_unfinished_requests():
        out = sched.schedule()
        computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        n = out.num_scheduled_tokens
        rows = [(r, computed[r], n[r]) for r in sorted(n, key=lambda r: n[r] > 1 + spec)]
        drafts = {r: out.scheduled_spec_decode_tokens.get(r, []) for r in n}
        inputs = {r: tokens[r][s: s + k - len(drafts[r])] + drafts[r] for r, s, k in rows}
        assert all(len(inputs[r]) == k for r, _, k in rows)
        yield out, rows, inputs
        ids, sampled = [r for r, *_ in rows], []
        for r, s, k in rows:
            sampled.append([])
            first = s + k - len(drafts[r])  # the position sampled after the inputs
            if first < len(tokens[r]):
                continue  # a prompt chunk: nothing sampled
            for d in [*drafts[r], None]:
                sampled[-1].append(_next_token(r, first + len(sampled[-1])))
                if d != sampled[-1][-1]:
                    break  # the first rejected draft ends the accepted tokens
            tokens[r] += sampled[-1]
        sched.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled))
        if spec:
            proposing = [r for r, got in zip(ids, sampled) if got]
            sched.update_draft_token_ids(DraftTokenIds(proposing, [
                [_draft(r, len(tokens[r]) + j) for j in range(spec)] for r in proposing]))


def _replay_prompts(tmp_path, prefix_caching: bool, spec: int, **kwargs) -> dict:
    """Four prompts and two multi-turn extensions of the first (each scheduled while its
    prefix is still being written, as in benchmarks/vllm_e2e.py) through `_scheduled_rows`
    and `_replay` (`kwargs`: its own), with K/V and queries that are functions of (token,
    position)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 30000, (3000,), generator=gen).tolist()
    prompts = [ids[i * 500: i * 500 + 300 - (i % 3) * 50] for i in range(4)]
    prompts.append(prompts[0] + ids[2500:2600])
    prompts.append(prompts[-1] + ids[2700:2780])
    tables = [torch.randn(4096, *shape, generator=gen) for shape in ((HK, D),) * 2 + ((4 * D,),)]
    tables = [(t, torch.randn(1024, *t.shape[1:], generator=gen)) for t in tables]
    step_inputs = {}

    def steps():
        for out, rows, inputs in _scheduled_rows(tmp_path, prompts, prefix_caching,
                                                 new_tokens=8, spec=spec):
            step_inputs.update(inputs)
            yield out, rows

    def features(r, s, n):
        t, pos = torch.tensor(step_inputs[r]) % 4096, torch.arange(s, s + n)
        return [(tok[t] + at[pos]).half() for tok, at in tables]

    return _replay(steps(), features, prefix_caching=prefix_caching, spec=spec, **kwargs)


@pytest.fixture(scope="module")
def rows_alone(registered, tmp_path_factory):
    """The rows with neither, the prompt blocks through the pool (the runs compared with
    them write them straight to their records)."""
    return _replay_prompts(tmp_path_factory.mktemp("alone"), False, 0, direct=False)


@pytest.mark.xdist_group("scheduler_replay")  # one worker replays the baseline once
@pytest.mark.parametrize("prefix_caching, spec", [(True, 0), (False, 3), (True, 3)],
                         ids=["prefix caching", "ngram", "both"])
def test_prefix_caching_and_ngram_change_no_row_under_vllms_scheduler(
        registered, rows_alone, tmp_path, prefix_caching, spec):
    """Chunk-invariant reads, the steps vLLM 0.26's scheduler makes of prompts that share
    prefixes, with prefix caching and/or ngram drafts (rejected ones are written into the
    cache, read by the rows after them, then overwritten): every row equals, bit for bit,
    the row with both off. (These schedules cut no prompt chunk as short as a verify
    window: such a chunk goes to the kernel instead of FlashAttention, and its rows agree
    with FlashAttention's to rounding only.) With drafts, prefix hits read finished
    requests' sinks unquantized only because they retire (`backend.on_finish`). The
    baseline writes every block through the pool, these runs the blocks a step opens and
    fills straight to their records, in a pool without room for a step's prompt blocks."""
    stats = {}
    alone, rows = rows_alone, _replay_prompts(tmp_path, prefix_caching, spec, stats=stats)
    assert stats["direct"] > 0
    both = rows.keys() & alone.keys()
    if prefix_caching:
        assert len(both) < len(alone)  # prefix hits skipped rows
    else:
        assert both == alone.keys()
    for key in both:
        assert torch.equal(rows[key], alone[key]), f"request {key[0]}, position {key[1]}"


@pytest.mark.xdist_group("direct_replay")  # about 4 min on one worker
def test_prompt_blocks_written_straight_to_records_change_no_row(registered, tmp_path):
    """Default reads under vLLM 0.26's scheduler, with prefix caching and ngram drafts:
    the prompt blocks a step opens and fills written straight to their records
    (`cache.write_blocks`, no pool slot) rather than through the pool and the next step's
    commit give every row bit for bit, with fewer slots held, in a pool sized without
    room for a step's prompt blocks. (No request here hits a block in the step that fills
    it: such a hit reads the block's record, as hits in later steps do, where through the
    pool it read the block unquantized.)"""
    runs = {}
    for direct in (False, True):
        stats = {}
        (tmp_path / str(direct)).mkdir()
        rows = _replay_prompts(tmp_path / str(direct), True, 3, chunk_invariant=False,
                               direct=direct, stats=stats)
        runs[direct] = rows, stats
    (pooled, before), (direct, after) = runs[False], runs[True]
    assert after["direct"] > 0 and before["direct"] == 0
    assert sum(after["held"]) < sum(before["held"])
    assert pooled.keys() == direct.keys()
    for key in pooled:
        assert torch.equal(direct[key], pooled[key]), f"request {key[0]}, position {key[1]}"
