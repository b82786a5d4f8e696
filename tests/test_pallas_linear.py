"""Tests for the fused-linear Pallas kernels (``jfuse.pallas.linear``).

:class:`TestLinearKernels` runs the matmul-epilogue contract of ``tests/kernel_cases.py`` (numerics
in interpret mode against float64, refusals, lowering for "tpu" and "cuda") for linear's one
weight and its ``(y, z)`` outputs; the functions below test what is linear's own, and the
in-kernel erf that Triton's exact GELU uses. Tolerances are kernel_cases' matmul tolerances.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfuse.pallas import _common
from jfuse.pallas.linear import (
    LINEAR,
    linear_tpu,
    linear_triton,
    tpu_unsupported_reason,
    triton_unsupported_reason,
)

try:  # tests/ as a package or as a rootdir on sys.path
    from tests.kernel_cases import ACTIVATIONS_64, BACKENDS, SMALL_BLOCKS, assert_close
    from tests.kernel_cases import MatmulKernelTests
    from tests.lowering import lower_for
except ImportError:  # pragma: no cover
    from kernel_cases import ACTIVATIONS_64, BACKENDS, SMALL_BLOCKS, assert_close
    from kernel_cases import MatmulKernelTests
    from lowering import lower_for


class TestLinearKernels(MatmulKernelTests):
    KERNELS = {"tpu": linear_tpu, "triton": linear_triton}
    REASONS = {"tpu": tpu_unsupported_reason, "triton": triton_unsupported_reason}
    N_WEIGHTS = 1
    BIASES = {"all": (True,), "none": (False,)}
    TRANSPOSED = "rhs_transposed"
    EXTRAS = "return_preactivation"
    LOWERING_CASES = [
        # (id, M, K, N, dtype, kwargs)
        ("f32-aligned", 128, 256, 128, jnp.float32, dict(activation="gelu")),
        ("bf16-large-default", 1024, 4096, 1536, jnp.bfloat16, dict(activation="silu")),
        ("f32-k-padded", 600, 1000, 600, jnp.float32, dict(activation="relu", biases="none")),
        ("bf16-rhsT", 256, 512, 384, jnp.bfloat16, dict(activation="gelu", transposed=True)),
        ("f32-small-blocks", 37, 700, 150, jnp.float32, dict(activation="gelu_tanh", small=True)),
        ("f32-highest", 64, 128, 128, jnp.float32,
         dict(activation="tanh", precision=jax.lax.Precision.HIGHEST)),
        ("bf16-out-f32", 48, 96, 200, jnp.bfloat16,
         dict(activation="sigmoid", out_dtype=jnp.float32)),
    ]

    @staticmethod
    def epilogue64(zs, activation):
        (z,) = zs
        return ACTIVATIONS_64[activation](z), z

    @staticmethod
    def unfused(x, w):
        return jnp.tanh(x @ w)


CASE = TestLinearKernels()


# ----------------------------------------------------------------------------------------------
# Numerics (interpret mode)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", BACKENDS)
def test_bias_and_transposed_weights_with_small_blocks(kernel):
    CASE.run_and_check(kernel, 37, 300, 150, jnp.float32, activation="gelu", biases="all",
                       transposed=True, **SMALL_BLOCKS[kernel])


@pytest.mark.parametrize("kernel", BACKENDS)
def test_single_output_and_out_dtype(kernel):
    (x, w, b), args64 = CASE.operands(37, 45, 53, jnp.float32)
    fn = CASE.KERNELS[kernel]
    y = fn(x, w, b, activation="tanh", interpret=True)
    assert isinstance(y, jax.Array)
    y_want, _ = CASE.reference(args64, "tanh")
    assert_close(y, y_want, jnp.float32)
    y16 = fn(x, w, b, activation="tanh", out_dtype=jnp.bfloat16, interpret=True)
    assert y16.dtype == jnp.bfloat16
    assert_close(y16, y_want, jnp.bfloat16)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_under_jit(kernel):
    args, args64 = CASE.operands(37, 45, 53, jnp.bfloat16)
    fn = jax.jit(lambda x, w, b: CASE.KERNELS[kernel](x, w, b, activation="gelu", interpret=True))
    assert_close(fn(*args), CASE.reference(args64, "gelu")[0], jnp.bfloat16)


def test_erf_approximation_for_triton():
    x = np.linspace(-10.0, 10.0, 40001).astype(np.float32)
    got = np.asarray(jax.jit(_common.one_plus_erf_f32)(jnp.asarray(x)), np.float64)
    want = np.array([math.erfc(-float(v)) for v in x])  # = 1 + erf(v), no cancellation
    assert np.max(np.abs(got - want)) < 2e-7  # ~1 f32 ulp of values in [1, 2)
    tail = want > 1e-30  # the left tail keeps relative precision (erfc form, no 1 - 0.999..)
    assert np.max(np.abs(got - want)[tail] / want[tail]) < 1e-5
    z = np.linspace(-8.0, 8.0, 4001).astype(np.float32)
    gelu = np.asarray(jax.jit(_common.gelu_exact_without_erf)(jnp.asarray(z)), np.float64)
    np.testing.assert_allclose(gelu, ACTIVATIONS_64["gelu"](z.astype(np.float64)),
                               rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Block sizes and refusals
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", BACKENDS)
def test_wrappers_refuse_with_not_implemented(kernel):
    fn = CASE.KERNELS[kernel]
    x = jnp.ones((16, 32), jnp.int32)
    with pytest.raises(NotImplementedError, match="int32"):
        fn(x, jnp.ones((32, 16), jnp.int32), activation=None, interpret=True)
    with pytest.raises(NotImplementedError, match="mixed"):
        fn(x.astype(jnp.float32), jnp.ones((32, 16), jnp.bfloat16), activation=None,
           interpret=True)
    with pytest.raises(NotImplementedError, match="out_dtype"):
        fn(x.astype(jnp.float32), jnp.ones((32, 16), jnp.float32), activation=None,
           out_dtype=jnp.int32, interpret=True)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_bad_arguments_raise_value_error(kernel):
    fn = CASE.KERNELS[kernel]
    x, w = jnp.ones((64, 256), jnp.float32), jnp.ones((256, 256), jnp.float32)
    with pytest.raises(ValueError, match="disagree on K"):
        fn(x, jnp.ones((255, 256), jnp.float32), activation=None, interpret=True)
    with pytest.raises(ValueError, match="bias"):
        fn(x, w, jnp.ones((3,), jnp.float32), activation=None, interpret=True)
    with pytest.raises(ValueError, match="activation"):
        fn(x, w, activation="swishy", interpret=True)
    with pytest.raises(ValueError, match="block_m"):
        fn(x, w, activation=None, interpret=True, block_m=24 if kernel == "triton" else 20)
    with pytest.raises(ValueError, match="block_k"):
        fn(x, w, activation=None, interpret=True, block_k=100)


def test_tpu_default_block_k():
    from jfuse.pallas._tiling import tpu_default_block_k

    def _tpu_default_block_k(k):
        return tpu_default_block_k(k, LINEAR.tpu_max_blocks[2])

    # Whole K when it fits; else the largest multiple of 128 <= 512 dividing K rounded up to 128.
    assert _tpu_default_block_k(45) == 45
    assert _tpu_default_block_k(512) == 512
    assert _tpu_default_block_k(4096) == 512
    assert _tpu_default_block_k(11008) == 256  # 128 * 86
    assert _tpu_default_block_k(700) == 384  # padded to 768
    assert _tpu_default_block_k(1000) == 512  # padded to 1024


def test_tpu_raises_vmem_limit_only_for_oversized_blocks():
    # Defaults fit Mosaic's default scoped VMEM; 1024-blocks in f32 (~28 MiB) need it raised,
    # which shows up as a scoped memory config on the custom call.
    x = jax.ShapeDtypeStruct((2048, 2048), jnp.float32)
    default = lower_for(lambda x, w: linear_tpu(x, w, activation=None), x, x, platform="tpu")
    assert "scoped_memory_configs" not in default
    big = lower_for(
        lambda x, w: linear_tpu(x, w, activation=None, block_m=1024, block_n=1024, block_k=1024),
        x, x, platform="tpu",
    )
    assert "scoped_memory_configs" in big
