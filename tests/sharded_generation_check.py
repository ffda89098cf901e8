"""Run by tests/test_sharding.py in its own process, where XLA_FLAGS gives the CPU several
host devices (the flag must be set before jax initializes). Prints one JSON line."""

import json
import os
import sys

import kvarn_jax  # noqa: F401  (exact CPU arithmetic: before jax)
import jax
import numpy as np

from kvarn import corpus
from kvarn_jax.models import generate as gen
from kvarn_jax.models import gguf, sharding, tokenizer
from kvarn_jax.models.llama import AttentionOptions

NEW_TOKENS = 6


def main() -> int:
    devices = jax.devices()
    n = int(sys.argv[1])
    model = gguf.load_model()
    ids = tokenizer.load().encode(corpus.read("prose.txt")[:3000])
    # As in test_llama: block 0 is the sink; one prompt's second tile fills during decoding,
    # the other's is full at prefill.
    prompts = [ids[:124], ids[:140]]
    spec = gen.CacheSpec(kind="kvarn", preset="kvarn_k4v2_g64")
    mesh = sharding.kv_mesh(devices[:n])
    plain = gen.generate(model, prompts, NEW_TOKENS, cache=spec, return_logits=True)
    split = gen.generate(model, prompts, NEW_TOKENS, cache=spec, return_logits=True,
                         opts=AttentionOptions(mesh=mesh))
    c0 = split.session.caches[0]
    out = {
        "devices": len(devices),
        "tokens_plain": plain.tokens.tolist(), "tokens_sharded": split.tokens.tolist(),
        "max_logit_diff": float(np.abs(plain.logits - split.logits).max()),
        "pages_equal": all(np.array_equal(np.asarray(a.pages), np.asarray(b.pages))
                           for a, b in zip(plain.session.caches, split.session.caches)),
        "pools_equal": all(np.array_equal(np.asarray(a.pool_k), np.asarray(b.pool_k))
                           and np.array_equal(np.asarray(a.pool_v), np.asarray(b.pool_v))
                           for a, b in zip(plain.session.caches, split.session.caches)),
        "committed_records": int(sum(np.asarray(c.pages).any(-1).sum() for c in plain.session.caches)),
        "page_shards": sorted({tuple(s.data.shape) for s in c0.pages.addressable_shards}),
        "page_shard_devices": len({s.device for s in c0.pages.addressable_shards}),
    }
    if len(devices) >= 2:
        try:
            gen.Session(model, 1, 16, opts=AttentionOptions(mesh=sharding.kv_mesh(devices[:2])))
            out["two_device_error"] = None
        except ValueError as e:
            out["two_device_error"] = str(e)
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    assert "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    sys.exit(main())
