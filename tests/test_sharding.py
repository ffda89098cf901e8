"""KV heads sharded over 3 CPU host devices (SmolLM2 has 3 KV heads): the same greedy
tokens and the same cache bytes as on one device, and a clear error for 2 devices.

The device count is an XLA flag read when jax initializes, so the generation runs in a
subprocess (tests/sharded_generation_check.py) with its own XLA_FLAGS; the exact-CPU flag
stays in them."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("llama")  # loads the model: share the heavy worker

DEVICES = 3


@pytest.fixture(scope="session")  # the ~40 s subprocess runs once per worker
def sharded():
    pytest.importorskip("gguf")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_cpu_max_isa=AVX --xla_force_host_platform_device_count={DEVICES}")
    script = Path(__file__).with_name("sharded_generation_check.py")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), str(DEVICES)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    print(f"\nsharded generation subprocess: {time.perf_counter() - t:.1f} s")
    return json.loads(line.removeprefix("RESULT "))


def test_cache_is_split_by_kv_head(sharded):
    assert sharded["devices"] == DEVICES
    # One KV head's records per device (pages [blocks, heads, record bytes]).
    assert sharded["page_shard_devices"] == DEVICES
    assert [s[1] for s in sharded["page_shards"]] == [1]


def test_sharded_generation_matches_one_device(sharded):
    assert sharded["tokens_sharded"] == sharded["tokens_plain"]
    assert sharded["max_logit_diff"] == 0.0
    assert sharded["committed_records"] > 0  # the bytes compared include quantized tiles
    assert sharded["pages_equal"] and sharded["pools_equal"]


def test_indivisible_device_count_is_refused(sharded):
    msg = sharded["two_device_error"]
    assert msg is not None and "3 KV heads over 2 devices" in msg and "(1, 3)" in msg
