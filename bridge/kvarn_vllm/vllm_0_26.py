"""Patches that plug kvarn into vLLM 0.26 (every hook is described, with its vLLM source
path, in the project's reference notes). Each is idempotent and touches no CUDA.

0.26 has no API for out-of-tree kv-cache dtypes or page sizes, so this module
* widens the `CacheDType` Literal (config, selector, CacheConfig's field + pydantic
  rebuild) and maps the names to torch.uint8;
* sizes kvarn layers' pages as one record per (block, KV head) (`Attention.get_kv_cache_spec`
  returns vLLM's `TQFullAttentionSpec`, whose slot size is record_bytes / block_size);
* makes the CUDA platform pick the CUSTOM backend for kvarn dtypes when the user named no
  backend;
* lets `lifecycle.REQUESTS` follow the scheduler outputs a worker executes.

vLLM >= 0.33 has `register_kv_cache_dtype` and 0.32 a backend `customize_spec` hook: a
module per version beside this one replaces these patches; the backend stays as it is.
"""

from __future__ import annotations

import functools
import typing

import torch

from kvarn_vllm import lifecycle, settings

BACKEND = "kvarn_vllm.backend.KVarNAttentionBackend"


def widen_cache_dtypes() -> None:
    import vllm.config.cache as cache_cfg
    import vllm.v1.attention.selector as selector
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.utils import torch_utils

    for name in settings.DTYPES:
        torch_utils.STR_DTYPE_TO_TORCH_DTYPE[name] = torch.uint8
    names = typing.get_args(cache_cfg.CacheDType)
    if all(n in names for n in settings.DTYPES):
        return
    widened = typing.Literal[tuple(dict.fromkeys(names + settings.DTYPES))]
    cache_cfg.CacheDType = widened
    selector.CacheDType = widened
    # pydantic validates against the dataclass field's type on rebuild; argparse reads it too
    cache_cfg.CacheConfig.__dataclass_fields__["cache_dtype"].type = widened
    cache_cfg.CacheConfig.__annotations__["cache_dtype"] = widened
    rebuild_dataclass(cache_cfg.CacheConfig, force=True)
    try:  # argparse choices may already be computed (and cached)
        from vllm.engine import arg_utils
        arg_utils._compute_kwargs.cache_clear()
    except (ImportError, AttributeError):
        pass


def register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.registry import register_backend as register

    register(AttentionBackendEnum.CUSTOM, BACKEND)


def select_backend_for_kvarn(platform: type) -> None:
    """On `platform` (the CUDA platform class), a kvarn dtype with no --attention-backend
    picks CUSTOM, which vLLM still validates, so a bad head size or block size fails with
    our message."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = platform.get_attn_backend_cls.__func__
    if getattr(original, "_kvarn", False):
        return

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is None and settings.is_kvarn(attn_selector_config.kv_cache_dtype):
            selected_backend = AttentionBackendEnum.CUSTOM
        return original(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._kvarn = True
    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def size_pages_as_records() -> None:
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import TQFullAttentionSpec

    original = Attention.get_kv_cache_spec
    if getattr(original, "_kvarn", False):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        dtype = self.kv_cache_dtype
        if not settings.is_kvarn(dtype):
            return original(self, vllm_config)
        problems = settings.layer_problems(
            dtype, self.head_size, vllm_config.cache_config.block_size,
            sliding_window=self.sliding_window is not None)
        if problems:
            raise ValueError("; ".join(problems))
        return TQFullAttentionSpec(
            block_size=vllm_config.cache_config.block_size, num_kv_heads=self.num_kv_heads,
            head_size=self.head_size, head_size_v=self.head_size, dtype=torch.uint8,
            tq_slot_size=settings.slot_bytes(dtype, self.head_size))

    get_kv_cache_spec._kvarn = True
    Attention.get_kv_cache_spec = get_kv_cache_spec


def follow_scheduler_outputs() -> None:
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except ImportError:  # no GPU worker in this build (CPU wheels): nothing to follow
        return
    original = Worker.execute_model
    if getattr(original, "_kvarn", False):
        return

    @functools.wraps(original)
    def execute_model(self, scheduler_output):
        requests = lifecycle.REQUESTS
        requests.observe(scheduler_output)
        requests.in_step = True
        try:
            return original(self, scheduler_output)
        finally:
            requests.in_step = False

    execute_model._kvarn = True
    Worker.execute_model = execute_model


def apply() -> None:
    from vllm.platforms import current_platform

    widen_cache_dtypes()
    register_backend()
    if current_platform.is_cuda():  # other platforms pick their own backends
        select_backend_for_kvarn(type(current_platform))
    size_pages_as_records()
    follow_scheduler_outputs()
