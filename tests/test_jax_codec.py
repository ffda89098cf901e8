"""kvarn_jax API: errors, dispatch, and the CUDA lowering of each Pallas kernel on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvarn_jax
from kvarn import oracle
from kvarn_jax import pallas_quantize, pallas_rotate

H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu",
                                   num_cores=132)


def lower_for_cuda(fn, *shapes):
    """Lower `fn` for CUDA with an abstract H100: rejects ops the GPU lowering lacks."""
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("preset,d", [("kvarn_k4v2_g128", 128), ("kvarn_k2v2_g64", 64),
                                      ("kvarn_k4v4_g128", 256)])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_quantize_kernel_lowers_for_cuda(preset, d, dtype):
    g = int(preset.rsplit("g", 1)[1])
    tiles = jax.ShapeDtypeStruct((4, g, d), dtype)
    hlo = lower_for_cuda(lambda k, v: pallas_quantize.quantize(k, v, preset, interpret=False),
                         tiles, tiles)
    assert "__gpu$xla.gpu.triton" in hlo
    assert "div.rn.f32" in hlo and "sqrt.rn.f32" in hlo  # correctly rounded on the GPU


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_rotate_kernel_lowers_for_cuda(d, dtype):
    x = jax.ShapeDtypeStruct((3, 50, d), dtype)
    assert "__gpu$xla.gpu.triton" in lower_for_cuda(
        lambda a: pallas_rotate.rotate(a, interpret=False), x)


def test_rotate_pads_ragged_row_counts():
    x = np.random.default_rng(0).standard_normal((3, 7, 128)).astype(np.float16)
    got = np.asarray(pallas_rotate.rotate(jnp.asarray(x)))
    np.testing.assert_array_equal(got.view(np.uint16), oracle.rotate(x).view(np.uint16))


def test_unrotate_inverts_rotate():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 64)), jnp.float32)
    np.testing.assert_allclose(kvarn_jax.unrotate(kvarn_jax.rotate(x)), x, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_errors_name_the_fix(impl):
    x = jnp.zeros((2, 128, 128), jnp.float16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        kvarn_jax.quantize(x.astype(jnp.float32), x.astype(jnp.float32), "kvarn_k4v2_g128",
                           impl=impl)
    with pytest.raises(ValueError, match="tiles of 64 tokens"):
        kvarn_jax.quantize(x, x, "kvarn_k4v2_g64", impl=impl)
    with pytest.raises(ValueError, match="unknown KVarN preset"):
        kvarn_jax.quantize(x, x, "kvarn_k8v8_g128", impl=impl)
    with pytest.raises(ValueError, match="head_dim of 64, 128 or 256"):
        kvarn_jax.rotate(jnp.zeros((4, 100), jnp.float16), impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        kvarn_jax.rotate(x, impl="cuda")
    with pytest.raises(ValueError, match=r"\[N, 13824\]"):
        kvarn_jax.dequantize(jnp.zeros((2, 13823), jnp.uint8), "kvarn_k4v2_g128", 128)
