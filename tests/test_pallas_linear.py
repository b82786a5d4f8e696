"""Tests for the fused-linear Pallas kernels (``jfuse.pallas.linear``).

Numerics run both kernels in interpret mode on CPU against a float64 numpy reference computed
from the same (dtype-rounded) inputs. Lowering tests lower the real kernels for "tpu" and
"cuda" from this CPU machine: interpret mode accepts primitives the backends reject, so every
numerics case has a lowering twin.

Tolerances: the kernels accumulate in f32 and round once to the output dtype, so an f32 output
is within ~1e-5 of the output's magnitude, and a bf16 output within half a bf16 ulp
(2**-8 relative) of the exact value, plus the same f32 noise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfuse.pallas import _common
from jfuse.pallas.linear import (
    linear_tpu,
    linear_triton,
    tpu_unsupported_reason,
    triton_unsupported_reason,
)

try:  # tests/ as a package or as a rootdir on sys.path
    from tests.lowering import count_kernel_calls, lower_for
except ImportError:  # pragma: no cover
    from lowering import count_kernel_calls, lower_for

KERNELS = {"tpu": linear_tpu, "triton": linear_triton}
PLATFORM = {"tpu": "tpu", "triton": "cuda"}
ACTIVATIONS = [None, "relu", "relu_max", "gelu_tanh", "gelu", "silu", "sigmoid", "tanh"]
# (rtol, atol as a fraction of the output's largest magnitude)
TOLERANCE = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2**-7, 1e-5)}

# Block sizes forced small enough that M and N have ragged edge blocks and K takes several
# steps with a remainder; each kernel's own legality rules (TPU: 8/16-row and 128-lane tiles;
# Triton: powers of two >= 16).
SMALL_BLOCKS = {
    "tpu": dict(block_m=16, block_n=128, block_k=128),
    "triton": dict(block_m=16, block_n=32, block_k=64),
}


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

_erf64 = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid64(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form


ACTIVATIONS_64 = {
    None: lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "relu_max": lambda z: np.maximum(z, 0.0),
    "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "gelu": lambda z: 0.5 * z * (1 + _erf64(z / math.sqrt(2))),
    "silu": lambda z: z * _sigmoid64(z),
    "sigmoid": _sigmoid64,
    "tanh": np.tanh,
}


def _operands(m, k, n, dtype, *, bias=True, rhs_transposed=False, seed=0):
    """Random operands in ``dtype`` and their exact float64 values (w always as (K, N))."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / math.sqrt(k), dtype)
    b = jnp.asarray(rng.standard_normal(n), dtype) if bias else None
    as64 = lambda a: None if a is None else np.asarray(a.astype(jnp.float32), np.float64)
    w_kernel = w.T if rhs_transposed else w
    return (x, w_kernel, b), (as64(x), as64(w), as64(b))


def _reference(x64, w64, b64, activation):
    z = x64 @ w64 + (0.0 if b64 is None else b64)
    return ACTIVATIONS_64[activation](z), z


def _assert_close(got, want, dtype):
    rtol, atol_fraction = TOLERANCE[dtype]
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    atol = atol_fraction * max(np.max(np.abs(want)), 1.0)
    err = np.abs(got - want)
    bound = atol + rtol * np.abs(want)
    assert np.all(np.isfinite(got)), "non-finite output"
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"max error {err.max():.3g}; worst at {worst}: got {got[worst]!r}, want {want[worst]!r}"
    )


def _run_and_check(kernel, m, k, n, dtype, *, activation, bias, rhs_transposed,
                   return_preactivation=True, **blocks):
    (x, w, b), (x64, w64, b64) = _operands(
        m, k, n, dtype, bias=bias, rhs_transposed=rhs_transposed
    )
    out = KERNELS[kernel](
        x, w, b, activation=activation, rhs_transposed=rhs_transposed,
        return_preactivation=return_preactivation, interpret=True, **blocks,
    )
    y_want, z_want = _reference(x64, w64, b64, activation)
    if return_preactivation:
        y, z = out
        assert z.shape == (m, n) and z.dtype == dtype
        _assert_close(z, z_want, dtype)
    else:
        y = out
    assert y.shape == (m, n) and y.dtype == dtype
    _assert_close(y, y_want, dtype)


# ----------------------------------------------------------------------------------------------
# Numerics (interpret mode)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_every_activation_odd_shape(kernel, dtype, activation):
    _run_and_check(kernel, 37, 45, 53, dtype, activation=activation, bias=True,
                   rhs_transposed=False)


# (name, M, K, N, blocks): default blocks on odd and aligned shapes; K > 512 so the TPU default
# zero-pads K (1000 -> 1024); forced small blocks for ragged M/N edges and a K remainder.
SHAPES = [
    ("odd", 37, 45, 53, None),
    ("aligned", 128, 256, 128, None),
    ("long_k_default_blocks", 24, 1000, 40, None),
    ("ragged_small_blocks", 37, 700, 150, "small"),
]


@pytest.mark.parametrize("bias,rhs_transposed", [(True, False), (False, True)],
                         ids=["bias", "nobias-rhsT"])
@pytest.mark.parametrize("name,m,k,n,blocks", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_shapes_and_layouts(kernel, dtype, name, m, k, n, blocks, bias, rhs_transposed):
    blocks = SMALL_BLOCKS[kernel] if blocks == "small" else {}
    _run_and_check(kernel, m, k, n, dtype, activation="silu", bias=bias,
                   rhs_transposed=rhs_transposed, **blocks)


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_bias_and_transposed_weights_with_small_blocks(kernel):
    _run_and_check(kernel, 37, 300, 150, jnp.float32, activation="gelu", bias=True,
                   rhs_transposed=True, **SMALL_BLOCKS[kernel])


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_single_output_and_out_dtype(kernel):
    (x, w, b), (x64, w64, b64) = _operands(37, 45, 53, jnp.float32)
    fn = KERNELS[kernel]
    y = fn(x, w, b, activation="tanh", interpret=True)
    assert isinstance(y, jax.Array)
    y_want, _ = _reference(x64, w64, b64, "tanh")
    _assert_close(y, y_want, jnp.float32)
    y16 = fn(x, w, b, activation="tanh", out_dtype=jnp.bfloat16, interpret=True)
    assert y16.dtype == jnp.bfloat16
    _assert_close(y16, y_want, jnp.bfloat16)


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_under_jit(kernel):
    (x, w, b), (x64, w64, b64) = _operands(37, 45, 53, jnp.bfloat16)
    fn = jax.jit(lambda x, w, b: KERNELS[kernel](x, w, b, activation="gelu", interpret=True))
    _assert_close(fn(x, w, b), _reference(x64, w64, b64, "gelu")[0], jnp.bfloat16)


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


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_unsupported_reasons(kernel):
    reason = {"tpu": tpu_unsupported_reason, "triton": triton_unsupported_reason}[kernel]
    assert reason(37, 45, 53, jnp.float32) is None
    assert reason(37, 45, 53, jnp.bfloat16) is None
    for bad in (jnp.int32, np.float64):
        text = reason(37, 45, 53, bad)
        assert text and jnp.dtype(bad).name in text
    assert reason(0, 45, 53, jnp.float32)
    f16 = reason(37, 45, 53, jnp.float16)
    assert (f16 is None) == (kernel == "triton"), f16


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_wrappers_refuse_with_not_implemented(kernel):
    fn = KERNELS[kernel]
    x = jnp.ones((16, 32), jnp.int32)
    with pytest.raises(NotImplementedError, match="int32"):
        fn(x, jnp.ones((32, 16), jnp.int32), activation=None, interpret=True)
    with pytest.raises(NotImplementedError, match="mixed"):
        fn(x.astype(jnp.float32), jnp.ones((32, 16), jnp.bfloat16), activation=None,
           interpret=True)
    with pytest.raises(NotImplementedError, match="out_dtype"):
        fn(x.astype(jnp.float32), jnp.ones((32, 16), jnp.float32), activation=None,
           out_dtype=jnp.int32, interpret=True)


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_bad_arguments_raise_value_error(kernel):
    fn = KERNELS[kernel]
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


def test_tpu_refuses_precisions_mosaic_lacks():
    x = jnp.ones((16, 128), jnp.float32)
    for ok in (None, "highest", jax.lax.Precision.DEFAULT):
        linear_tpu(x, x.T, activation=None, precision=ok, interpret=True)
    for bad in (jax.lax.Precision.HIGH, (jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT),
                jax.lax.DotAlgorithmPreset.BF16_BF16_F32):
        with pytest.raises(NotImplementedError, match="precision"):
            linear_tpu(x, x.T, activation=None, precision=bad, interpret=True)


def test_tpu_bf16_rows_come_in_sixteens():
    x, w = jnp.ones((64, 256), jnp.bfloat16), jnp.ones((256, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 16"):
        linear_tpu(x, w, activation=None, interpret=True, block_m=8)


def test_tpu_default_block_k():
    from jfuse.pallas._tiling import tpu_default_block_k
    from jfuse.pallas.linear import LINEAR

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


# ----------------------------------------------------------------------------------------------
# Lowering for the real backends (from this CPU machine)
# ----------------------------------------------------------------------------------------------


def _lower_kernel(kernel, m, k, n, dtype, *, bias=True, rhs_transposed=False, **kwargs):
    x = jax.ShapeDtypeStruct((m, k), dtype)
    w = jax.ShapeDtypeStruct((n, k) if rhs_transposed else (k, n), dtype)
    args = (x, w) + ((jax.ShapeDtypeStruct((n,), dtype),) if bias else ())

    def f(x, w, b=None):
        return KERNELS[kernel](x, w, b, rhs_transposed=rhs_transposed, **kwargs)

    return lower_for(f, *args, platform=PLATFORM[kernel])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_lowers_every_activation(kernel, activation):
    # Exact gelu is the interesting one: erf on TPU, the in-kernel approximation on Triton.
    text = _lower_kernel(kernel, 37, 45, 53, jnp.bfloat16, activation=activation,
                         return_preactivation=True)
    assert count_kernel_calls(text, PLATFORM[kernel]) == 1


LOWERING_CASES = [
    # (id, M, K, N, dtype, kwargs)
    ("f32-aligned", 128, 256, 128, jnp.float32, dict(activation="gelu")),
    ("bf16-large-default", 1024, 4096, 1536, jnp.bfloat16, dict(activation="silu")),
    ("f32-k-padded", 600, 1000, 600, jnp.float32, dict(activation="relu", bias=False)),
    ("bf16-rhsT", 256, 512, 384, jnp.bfloat16, dict(activation="gelu", rhs_transposed=True)),
    ("f32-small-blocks", 37, 700, 150, jnp.float32, dict(activation="gelu_tanh", small=True)),
    ("f32-highest", 64, 128, 128, jnp.float32,
     dict(activation="tanh", precision=jax.lax.Precision.HIGHEST)),
    ("bf16-out-f32", 48, 96, 200, jnp.bfloat16, dict(activation="sigmoid", out_dtype=jnp.float32)),
]


@pytest.mark.parametrize("case", LOWERING_CASES, ids=[c[0] for c in LOWERING_CASES])
@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_lowers_shapes_and_options(kernel, case):
    _, m, k, n, dtype, kwargs = case
    kwargs = dict(kwargs)
    if kwargs.pop("small", False):
        kwargs.update(SMALL_BLOCKS[kernel])
    text = _lower_kernel(kernel, m, k, n, dtype, **kwargs)
    assert count_kernel_calls(text, PLATFORM[kernel]) == 1


def test_triton_f16_lowers():
    text = _lower_kernel("triton", 100, 200, 300, jnp.float16, activation="gelu")
    assert count_kernel_calls(text, "cuda") == 1


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_count_kernel_calls(platform):
    kernel = linear_tpu if platform == "tpu" else linear_triton
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((128, 128), jnp.float32)

    def two_layers(x, w):
        return kernel(kernel(x, w, activation="relu"), w, activation=None)

    assert count_kernel_calls(lower_for(two_layers, x, w, platform=platform), platform) == 2
    plain = lower_for(lambda x, w: jnp.tanh(x @ w), x, w, platform=platform)
    assert count_kernel_calls(plain, platform) == 0
