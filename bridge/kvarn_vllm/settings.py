"""What the bridge derives from vLLM's configuration: the preset of a kv-cache dtype, page
geometry, the tail-pool size, startup checks with messages that name the fix, and the
KVARN_* environment knobs (vLLM warns about unknown VLLM_* variables).

Pure Python over `kvarn.format`: importable without vLLM, torch or a GPU.
"""

from __future__ import annotations

import math
import os

from kvarn.format import HEAD_DIMS, PRESETS, layout

PREFIX = "kvarn_"
DTYPES = tuple(PRESETS)  # every preset is a kv-cache dtype of the same name
ENV_POOL_SLOTS = "KVARN_POOL_SLOTS"
ENV_SINK_BLOCKS = "KVARN_SINK_BLOCKS"
ENV_SYNC_COMMIT = "KVARN_SYNC_COMMIT"
ENV_CHUNK_INVARIANT = "KVARN_CHUNK_INVARIANT"
ENV_BATCH_INVARIANT = "VLLM_BATCH_INVARIANT"  # vLLM's own: batch-invariant model kernels
POOL_SLACK = 8  # slots beyond the bound below: cheap insurance against off-by-ones


def is_kvarn(kv_cache_dtype: object) -> bool:
    return isinstance(kv_cache_dtype, str) and kv_cache_dtype.startswith(PREFIX)


def preset(kv_cache_dtype: str) -> str:
    if kv_cache_dtype not in PRESETS:
        raise ValueError(f"unknown kvarn kv-cache dtype {kv_cache_dtype!r}; "
                         f"choose one of {', '.join(DTYPES)}")
    return kv_cache_dtype


def tile(kv_cache_dtype: str) -> int:
    """Tokens per tile, which is the block size the backend runs with."""
    return PRESETS[preset(kv_cache_dtype)].tile


def record_bytes(kv_cache_dtype: str, head_size: int) -> int:
    """Bytes of one page per KV head: one record holds a block's K and V tiles."""
    return layout(preset(kv_cache_dtype), head_size).record_bytes


def slot_bytes(kv_cache_dtype: str, head_size: int) -> int:
    """Bytes per token per KV head (vLLM sizes pages as block_size x heads x this)."""
    g = tile(kv_cache_dtype)
    n = record_bytes(kv_cache_dtype, head_size)
    assert n % g == 0, (kv_cache_dtype, head_size)  # true for every preset and head size
    return n // g


def sync_commit(speculative_tokens: int) -> bool:
    """Count each step's tiles on the GPU (one host sync a step) rather than from the host
    mirror of the pool: with speculative decoding (the scheduler's token counts are then
    optimistic) or when KVARN_SYNC_COMMIT=1."""
    value = os.environ.get(ENV_SYNC_COMMIT, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_SYNC_COMMIT} must be 0 or 1; got {value!r}")
    return value == "1" or speculative_tokens > 0


def chunk_invariant() -> bool:
    """KVARN_CHUNK_INVARIANT=1: every query row reads the blocks before its own from their
    records (sinks excepted) and its own block unquantized, prompt rows included, so a
    token's result does not depend on how the scheduler split its sequence into steps:
    outputs agree with prefix caching and speculative decoding on or off. Prompts then
    attend over quantized K/V, and prefill quantizes each full block once more.

    Unset, it follows vLLM's VLLM_BATCH_INVARIANT=1, whose promise (a request's output
    does not depend on the batch around it) needs these reads: the model's other kernels
    then round alike in every schedule, so the records, whose codes would otherwise move
    with those roundings, come out byte for byte the same too."""
    value = os.environ.get(ENV_CHUNK_INVARIANT)
    if value is None:
        return batch_invariant()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_CHUNK_INVARIANT} must be 0 or 1; got {value!r}")
    return value == "1"


def batch_invariant() -> bool:
    """vLLM's VLLM_BATCH_INVARIANT, parsed as vLLM parses it (an integer, nonzero on)."""
    value = os.environ.get(ENV_BATCH_INVARIANT, "0")
    try:
        return bool(int(value))
    except ValueError:
        raise ValueError(f"{ENV_BATCH_INVARIANT} must be an integer (vLLM reads it as "
                         f"one); got {value!r}") from None


def sink_blocks() -> int:
    value = os.environ.get(ENV_SINK_BLOCKS, "1")
    if not value.isdigit():
        raise ValueError(f"{ENV_SINK_BLOCKS} must be a non-negative integer; got {value!r}")
    return int(value)


def required_pool_slots(max_num_seqs: int, max_num_batched_tokens: int, tile: int,
                        speculative_tokens: int = 0, *, prompt_blocks_pooled: bool = True,
                        partial_prefills: int = 1) -> int:
    """Slots that can never run out: a sink and a tail per running sequence (one more
    when speculative tokens may spill into the next block), plus the prompt blocks a step
    fills before they are committed at the next step: every one of them
    (`prompt_blocks_pooled`), or, where the blocks a step opens and fills go straight to
    their records, those a chunk completes after an earlier chunk began them, one per
    prefill cut into chunks (`partial_prefills`; vLLM cuts one at a time unless
    long_prefill_token_threshold is set)."""
    per_seq = 2 + (1 if speculative_tokens else 0)
    prompt = math.ceil(max_num_batched_tokens / tile) if prompt_blocks_pooled else partial_prefills
    return per_seq * max_num_seqs + prompt + POOL_SLACK


def pool_slots(max_num_seqs: int, max_num_batched_tokens: int, tile: int,
               speculative_tokens: int = 0, **kwargs) -> tuple[int, int]:
    """(slots to allocate, slots required): KVARN_POOL_SLOTS overrides the first. kwargs:
    those of `required_pool_slots`."""
    need = required_pool_slots(max_num_seqs, max_num_batched_tokens, tile, speculative_tokens,
                               **kwargs)
    value = os.environ.get(ENV_POOL_SLOTS)
    if value is None:
        return need, need
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV_POOL_SLOTS} must be a positive integer; got {value!r}")
    return int(value), need


def pool_bytes_per_slot(num_kv_heads: int, head_size: int, tile: int, itemsize: int) -> int:
    """One slot of one layer: a block's K and V in the model dtype."""
    return 2 * tile * num_kv_heads * head_size * itemsize


def layer_problems(kv_cache_dtype: str | None, head_size: int, block_size: int | None,
                   *, model_dtype_ok: bool = True, use_mla: bool = False,
                   sliding_window: bool = False, attn_type: str = "decoder",
                   batch_invariant: bool = False) -> list[str]:
    """Why a layer cannot run on the kvarn backend, each reason with its fix.
    batch_invariant: vLLM runs with VLLM_BATCH_INVARIANT=1."""
    if not is_kvarn(kv_cache_dtype):
        return [f"the kvarn backend serves only kvarn kv-cache dtypes ({', '.join(DTYPES)}); "
                f"got {kv_cache_dtype!r}"]
    if kv_cache_dtype not in PRESETS:
        return [f"unknown kvarn kv-cache dtype {kv_cache_dtype!r}: use one of "
                f"{', '.join(DTYPES)}"]
    g = tile(kv_cache_dtype)
    out = []
    if head_size not in HEAD_DIMS:
        out.append(f"{kv_cache_dtype} supports head_size {', '.join(map(str, HEAD_DIMS))}; "
                   f"this model has {head_size}: use --kv-cache-dtype auto or fp8 for it")
    if block_size is not None and block_size != g:
        out.append(f"{kv_cache_dtype} stores one tile of {g} tokens per block: use "
                   f"--block-size {g} (or leave --block-size unset); got {block_size}")
    if not model_dtype_ok:
        out.append("kvarn caches need a float16 or bfloat16 model: use --dtype float16 or "
                   "--dtype bfloat16")
    if use_mla:
        out.append("kvarn does not quantize MLA (latent) caches: use --kv-cache-dtype auto "
                   "for MLA models such as DeepSeek")
    if sliding_window:
        out.append("kvarn does not handle sliding-window layers: use --kv-cache-dtype auto "
                   "(or fp8) for models with sliding-window attention")
    if attn_type != "decoder":
        out.append(f"kvarn serves decoder self-attention only; this layer is {attn_type} "
                   "attention (encoder / cross-attention models): use --kv-cache-dtype auto")
    if batch_invariant and not chunk_invariant():
        out.append(f"{ENV_BATCH_INVARIANT}=1 needs kvarn's chunk-invariant reads, which "
                   f"{ENV_CHUNK_INVARIANT}=0 turns off: unset {ENV_CHUNK_INVARIANT} (it "
                   f"follows {ENV_BATCH_INVARIANT}) or set it to 1")
    return out
