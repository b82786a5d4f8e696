"""Tests for the fused gated-linear-unit Pallas kernels (``jfuse.pallas.glu``).

Numerics run both kernels in interpret mode on CPU against a float64 numpy reference computed
from the same (dtype-rounded) inputs. Lowering tests lower the real kernels for "tpu" and
"cuda" from this CPU machine: interpret mode accepts primitives the backends reject, so every
numerics case has a lowering twin.

Tolerances: the kernels accumulate both branches in f32, do bias, activation and product in
f32, and round once to the output dtype. So the pre-activations are within ~1e-5 of their own
magnitude (f32) or half a bf16 ulp (2**-8 relative) plus that noise. The product y = act(g) * u
inherits the f32 noise of both factors: |dy| <= |act'(g)| |u| |dg| + |act(g)| |du|, with
|act'| <= 1.13 for every gate here and |act(g)| <= max(|g|, 1), so its absolute tolerance is
scaled by max|u| * max(1, max|g|) rather than by |y| alone; the one final rounding gives the
same relative term as the pre-activations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfuse.pallas._tiling import TPU_VMEM_BUDGET
from jfuse.pallas.matmul import tpu_blocks
from jfuse.pallas.glu import (
    GLU,
    GPU_MAX_PROFITABLE_K,
    glu_tpu,
    glu_triton,
    profitability_reason,
    tpu_unsupported_reason,
    triton_unsupported_reason,
)

try:  # tests/ as a package or as a rootdir on sys.path
    from tests.lowering import count_kernel_calls, lower_for
except ImportError:  # pragma: no cover
    from lowering import count_kernel_calls, lower_for

KERNELS = {"tpu": glu_tpu, "triton": glu_triton}
PLATFORM = {"tpu": "tpu", "triton": "cuda"}
# None is the bilinear GLU, (x Wg) * (x Wu).
ACTIVATIONS = [None, "relu", "relu_max", "gelu_tanh", "gelu", "silu", "sigmoid", "tanh"]
# (rtol, atol as a fraction of the output's scale; see the module docstring)
TOLERANCE = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2**-7, 1e-5)}

# Block sizes forced small enough that M and N have ragged edge blocks and K takes several
# steps with a remainder; each kernel's own legality rules (TPU: 8/16-row and 128-lane tiles;
# Triton: powers of two >= 16).
SMALL_BLOCKS = {
    "tpu": dict(block_m=16, block_n=128, block_k=128),
    "triton": dict(block_m=16, block_n=32, block_k=64),
}
BIASES = {"both": (True, True), "gate": (True, False), "up": (False, True), "none": (False, False)}


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


def _operands(m, k, n, dtype, *, biases="both", weights_transposed=False, seed=0):
    """Random operands in ``dtype`` (kernel layout) and their exact float64 values, with the
    weights always as (K, N) in the float64 copy."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w_gate = jnp.asarray(rng.standard_normal((k, n)) / math.sqrt(k), dtype)
    w_up = jnp.asarray(rng.standard_normal((k, n)) / math.sqrt(k), dtype)
    has_gate_bias, has_up_bias = BIASES[biases]
    b_gate = jnp.asarray(rng.standard_normal(n), dtype) if has_gate_bias else None
    b_up = jnp.asarray(rng.standard_normal(n), dtype) if has_up_bias else None
    as64 = lambda a: None if a is None else np.asarray(a.astype(jnp.float32), np.float64)
    if weights_transposed:
        kernel_args = (x, w_gate.T, w_up.T, b_gate, b_up)
    else:
        kernel_args = (x, w_gate, w_up, b_gate, b_up)
    return kernel_args, tuple(as64(a) for a in (x, w_gate, w_up, b_gate, b_up))


def _reference(x64, wg64, wu64, bg64, bu64, activation):
    """(y, gate_pre, up_pre) in float64."""
    gate = x64 @ wg64 + (0.0 if bg64 is None else bg64)
    up = x64 @ wu64 + (0.0 if bu64 is None else bu64)
    return ACTIVATIONS_64[activation](gate) * up, gate, up


def _assert_close(got, want, dtype, scale=None):
    rtol, atol_fraction = TOLERANCE[dtype]
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    atol = atol_fraction * max(np.max(np.abs(want)), 1.0 if scale is None else scale)
    err = np.abs(got - want)
    bound = atol + rtol * np.abs(want)
    assert np.all(np.isfinite(got)), "non-finite output"
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"max error {err.max():.3g}; worst at {worst}: got {got[worst]!r}, want {want[worst]!r}"
    )


def _assert_glu_close(y, want, dtype):
    y_want, gate_want, up_want = want
    scale = np.max(np.abs(up_want)) * max(1.0, np.max(np.abs(gate_want)))
    _assert_close(y, y_want, dtype, scale=max(scale, 1.0))


def _run_and_check(kernel, m, k, n, dtype, *, activation, biases="both",
                   weights_transposed=False, return_preactivations=True, **blocks):
    args, args64 = _operands(m, k, n, dtype, biases=biases,
                             weights_transposed=weights_transposed)
    out = KERNELS[kernel](
        *args, activation=activation, weights_transposed=weights_transposed,
        return_preactivations=return_preactivations, interpret=True, **blocks,
    )
    want = _reference(*args64, activation)
    if return_preactivations:
        assert isinstance(out, tuple) and len(out) == 3
        y, gate, up = out
        for got, expected in ((gate, want[1]), (up, want[2])):
            assert got.shape == (m, n) and got.dtype == dtype
            _assert_close(got, expected, dtype)
    else:
        y = out
    assert y.shape == (m, n) and y.dtype == dtype
    _assert_glu_close(y, want, dtype)


# ----------------------------------------------------------------------------------------------
# Numerics (interpret mode)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_every_activation_odd_shape(kernel, dtype, activation):
    _run_and_check(kernel, 37, 45, 53, dtype, activation=activation)


# (name, M, K, N, blocks): default blocks on odd and aligned shapes; K > 512 so the TPU default
# zero-pads K (1000 -> 1024) and Triton's K loop ends on a remainder; forced small blocks for
# ragged M/N edges and several K steps with a remainder (700 = 5 x 128 + 60 on TPU after
# padding to 768; 10 x 64 + 60 on Triton).
SHAPES = [
    ("odd", 37, 45, 53, None),
    ("aligned", 128, 256, 128, None),
    ("long_k_default_blocks", 24, 1000, 40, None),
    ("ragged_small_blocks", 37, 700, 150, "small"),
]


@pytest.mark.parametrize("biases,weights_transposed", [("both", False), ("none", True)],
                         ids=["biases", "nobias-wT"])
@pytest.mark.parametrize("name,m,k,n,blocks", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_shapes_and_layouts(kernel, dtype, name, m, k, n, blocks, biases, weights_transposed):
    blocks = SMALL_BLOCKS[kernel] if blocks == "small" else {}
    _run_and_check(kernel, m, k, n, dtype, activation="silu", biases=biases,
                   weights_transposed=weights_transposed, **blocks)


@pytest.mark.parametrize("biases", list(BIASES))
@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_each_bias_combination_with_ragged_blocks(kernel, biases):
    # A bias on one branch only must land on that branch, including in the ragged N edge block.
    _run_and_check(kernel, 37, 300, 150, jnp.float32, activation="gelu", biases=biases,
                   weights_transposed=biases in ("gate", "none"), **SMALL_BLOCKS[kernel])


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_several_default_blocks_on_every_axis(kernel):
    # TPU defaults: M=600 -> 2 x 304 rows, N=300 -> 256 + 44 lanes, K=1100 -> 3 x 384 (padded
    # to 1152). Triton: 5 x 128 rows, 5 x 64 columns, 35 K steps with a remainder.
    _run_and_check(kernel, 600, 1100, 300, jnp.bfloat16, activation="silu")


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_single_output_and_out_dtype(kernel):
    args, args64 = _operands(37, 45, 53, jnp.float32)
    fn = KERNELS[kernel]
    want = _reference(*args64, "tanh")
    y = fn(*args, activation="tanh", interpret=True)
    assert isinstance(y, jax.Array)
    _assert_glu_close(y, want, jnp.float32)
    y16, gate16, up16 = fn(*args, activation="tanh", out_dtype=jnp.bfloat16,
                           return_preactivations=True, interpret=True)
    assert y16.dtype == gate16.dtype == up16.dtype == jnp.bfloat16
    _assert_glu_close(y16, want, jnp.bfloat16)
    _assert_close(gate16, want[1], jnp.bfloat16)
    _assert_close(up16, want[2], jnp.bfloat16)


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_bf16_in_f32_out(kernel):
    args, args64 = _operands(37, 45, 53, jnp.bfloat16)
    y = KERNELS[kernel](*args, activation="sigmoid", out_dtype=jnp.float32, interpret=True)
    assert y.dtype == jnp.float32
    _assert_glu_close(y, _reference(*args64, "sigmoid"), jnp.float32)  # no bf16 rounding


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_under_jit(kernel):
    args, args64 = _operands(37, 45, 53, jnp.bfloat16, biases="up")
    fn = jax.jit(lambda *a: KERNELS[kernel](*a, activation="gelu", interpret=True))
    _assert_glu_close(fn(*args), _reference(*args64, "gelu"), jnp.bfloat16)


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
    assert reason(37, 45, 0, jnp.float32)
    f16 = reason(37, 45, 53, jnp.float16)
    assert (f16 is None) == (kernel == "triton"), f16
    huge = reason(2**16, 2**15, 64, jnp.bfloat16)
    assert (huge is None) == (kernel == "tpu"), huge  # Triton's int32 offsets


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_wrappers_refuse_with_not_implemented(kernel):
    fn = KERNELS[kernel]
    f32 = lambda shape: jnp.ones(shape, jnp.float32)
    x, w = f32((16, 32)), f32((32, 16))
    with pytest.raises(NotImplementedError, match="int32"):
        fn(x.astype(jnp.int32), w.astype(jnp.int32), w.astype(jnp.int32), activation=None,
           interpret=True)
    with pytest.raises(NotImplementedError, match="mixed"):
        fn(x, w.astype(jnp.bfloat16), w.astype(jnp.bfloat16), activation="silu", interpret=True)
    with pytest.raises(NotImplementedError, match="mixed.*w_up bfloat16"):
        fn(x, w, w.astype(jnp.bfloat16), activation="silu", interpret=True)
    with pytest.raises(NotImplementedError, match="b_up"):
        fn(x, w, w, None, jnp.ones((16,), jnp.int32), activation="silu", interpret=True)
    with pytest.raises(NotImplementedError, match="out_dtype"):
        fn(x, w, w, activation="silu", out_dtype=jnp.int32, interpret=True)
    with pytest.raises(NotImplementedError, match="empty"):
        fn(f32((0, 32)), w, w, activation="silu", interpret=True)


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_bad_arguments_raise_value_error(kernel):
    fn = KERNELS[kernel]
    f32 = lambda shape: jnp.ones(shape, jnp.float32)
    x, w = f32((64, 256)), f32((256, 256))
    with pytest.raises(ValueError, match="disagree on K"):
        fn(x, f32((255, 256)), f32((255, 256)), activation="silu", interpret=True)
    with pytest.raises(ValueError, match="disagree on K"):  # (K, N) passed as torch layout
        fn(x, f32((256, 128)), f32((256, 128)), activation="silu", weights_transposed=True,
           interpret=True)
    with pytest.raises(ValueError, match="same shape"):
        fn(x, w, f32((256, 128)), activation="silu", interpret=True)
    with pytest.raises(ValueError, match="2-D"):
        fn(f32((2, 64, 256)), w, w, activation="silu", interpret=True)
    with pytest.raises(ValueError, match="b_gate"):
        fn(x, w, w, f32((3,)), activation="silu", interpret=True)
    with pytest.raises(ValueError, match="b_up"):
        fn(x, w, w, None, f32((256, 1)), activation="silu", interpret=True)
    with pytest.raises(ValueError, match="activation"):
        fn(x, w, w, activation="swishy", interpret=True)
    with pytest.raises(ValueError, match="block_m"):
        fn(x, w, w, activation="silu", interpret=True, block_m=24 if kernel == "triton" else 20)
    with pytest.raises(ValueError, match="block_n"):
        fn(x, w, w, activation="silu", interpret=True, block_n=100)
    with pytest.raises(ValueError, match="block_k"):
        fn(x, w, w, activation="silu", interpret=True, block_k=100)


def test_tpu_refuses_precisions_mosaic_lacks():
    x = jnp.ones((16, 128), jnp.float32)
    for ok in (None, "highest", jax.lax.Precision.DEFAULT):
        glu_tpu(x, x.T, x.T, activation="silu", precision=ok, interpret=True)
    for bad in (jax.lax.Precision.HIGH, (jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT),
                jax.lax.DotAlgorithmPreset.BF16_BF16_F32):
        with pytest.raises(NotImplementedError, match="precision"):
            glu_tpu(x, x.T, x.T, activation="silu", precision=bad, interpret=True)


def test_tpu_bf16_rows_come_in_sixteens():
    x, w = jnp.ones((64, 256), jnp.bfloat16), jnp.ones((256, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 16"):
        glu_tpu(x, w, w, activation="silu", interpret=True, block_m=8)
    glu_tpu(x.astype(jnp.float32), w.astype(jnp.float32), w.astype(jnp.float32),
            activation="silu", interpret=True, block_m=8)  # 8-row tiles are fine in f32


def test_tpu_default_blocks_fit_the_vmem_budget():
    # Worst case for the defaults: f32 in and out, three outputs, both biases, every dim large.
    bm, bn, bk, vmem = tpu_blocks(GLU, 4096, 8192, 14336, jnp.float32, jnp.float32,
                                  n_outputs=3, n_biases=2)
    assert (bm, bn, bk) == (512, 256, 512)
    assert vmem <= TPU_VMEM_BUDGET, vmem / 2**20
    # Small dims are taken whole; bf16 M is balanced in 16-row multiples.
    assert tpu_blocks(GLU, 37, 45, 53, jnp.float32, jnp.float32, n_outputs=1,
                      n_biases=0)[:3] == (37, 53, 45)
    assert tpu_blocks(GLU, 600, 700, 300, jnp.bfloat16, jnp.bfloat16, n_outputs=1,
                      n_biases=0)[:3] == (304, 256, 384)


def test_tpu_raises_vmem_limit_only_for_oversized_blocks():
    # The defaults fit Mosaic's default scoped VMEM even in the worst case; 1024-blocks in f32
    # (~56 MiB with three outputs) need it raised, which shows up as a scoped memory config.
    x = jax.ShapeDtypeStruct((2048, 2048), jnp.float32)
    b = jax.ShapeDtypeStruct((2048,), jnp.float32)

    def glu(x, wg, wu, bg, bu, **blocks):
        return glu_tpu(x, wg, wu, bg, bu, activation="silu", return_preactivations=True,
                       **blocks)

    default = lower_for(glu, x, x, x, b, b, platform="tpu")
    assert "scoped_memory_configs" not in default
    big = lower_for(
        lambda *a: glu(*a, block_m=1024, block_n=1024, block_k=1024), x, x, x, b, b,
        platform="tpu",
    )
    assert "scoped_memory_configs" in big


# ----------------------------------------------------------------------------------------------
# Profitability rule
# ----------------------------------------------------------------------------------------------


def test_profitability_tpu_has_no_rule():
    for dtype in (jnp.float32, jnp.bfloat16):
        for k in (64, 4096, 65536):
            assert profitability_reason("tpu", 4096, k, 14336, dtype) is None


@pytest.mark.parametrize("backend", ["triton", "gpu", "cuda", "Triton"])
def test_profitability_gpu_thresholds(backend):
    # Small K: fusing saves the (M, 2N) round trip, which dominates; fuse.
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        assert profitability_reason(backend, 8192, 128, 256, dtype) is None
    # f32: 384 measured to win, 768 measured to lose.
    assert profitability_reason(backend, 8192, 384, 768, jnp.float32) is None
    text = profitability_reason(backend, 8192, 768, 1536, jnp.float32)
    assert text and "K=768 > 384" in text and "0.77x" in text
    # 16-bit: wins up to 512, declines an LLM-sized K.
    for dtype in (jnp.bfloat16, jnp.float16):
        assert profitability_reason(backend, 8192, 512, 1536, dtype) is None
        assert profitability_reason(backend, 8192, 513, 1536, dtype)
        text = profitability_reason(backend, 4096, 8192, 14336, dtype)
        assert text and text.startswith("K=8192 > 512: on GPU") and "XLA" in text
    # Dtypes no kernel runs are the unsupported_reason's business, not this rule's.
    assert profitability_reason(backend, 8192, 8192, 256, jnp.int32) is None


def test_profitability_rule_lives_in_one_table(monkeypatch):
    assert profitability_reason("triton", 64, 4096, 64, jnp.bfloat16)
    monkeypatch.setitem(GPU_MAX_PROFITABLE_K, "bfloat16", 8192)
    assert profitability_reason("triton", 64, 4096, 64, jnp.bfloat16) is None
    assert "K=8193 > 8192" in profitability_reason("triton", 64, 8193, 64, jnp.bfloat16)


def test_profitability_rejects_unknown_backends():
    with pytest.raises(ValueError, match="backend"):
        profitability_reason("rocm-mi300", 64, 64, 64, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Lowering for the real backends (from this CPU machine)
# ----------------------------------------------------------------------------------------------


def _lower_kernel(kernel, m, k, n, dtype, *, biases="both", weights_transposed=False,
                  **kwargs):
    x = jax.ShapeDtypeStruct((m, k), dtype)
    w = jax.ShapeDtypeStruct((n, k) if weights_transposed else (k, n), dtype)
    b = jax.ShapeDtypeStruct((n,), dtype)
    has_gate_bias, has_up_bias = BIASES[biases]

    def f(x, wg, wu, *bs):
        bs = list(bs)
        bg = bs.pop(0) if has_gate_bias else None
        bu = bs.pop(0) if has_up_bias else None
        return KERNELS[kernel](x, wg, wu, bg, bu, weights_transposed=weights_transposed,
                               **kwargs)

    args = (x, w, w) + (b,) * (has_gate_bias + has_up_bias)
    return lower_for(f, *args, platform=PLATFORM[kernel])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_lowers_every_activation(kernel, activation):
    # Exact gelu is the interesting one: erf on TPU, the in-kernel approximation on Triton.
    text = _lower_kernel(kernel, 37, 45, 53, jnp.bfloat16, activation=activation,
                         return_preactivations=True)
    assert count_kernel_calls(text, PLATFORM[kernel]) == 1


LOWERING_CASES = [
    # (id, M, K, N, dtype, kwargs)
    ("f32-aligned", 128, 256, 128, jnp.float32, dict(activation="gelu")),
    ("bf16-llm-default", 1024, 4096, 1536, jnp.bfloat16,
     dict(activation="silu", return_preactivations=True)),
    ("f32-k-padded", 600, 1000, 600, jnp.float32, dict(activation="relu", biases="none")),
    ("bf16-wT", 256, 512, 384, jnp.bfloat16, dict(activation="gelu", weights_transposed=True)),
    ("f32-small-blocks", 37, 700, 150, jnp.float32, dict(activation="gelu_tanh", small=True)),
    ("f32-highest", 64, 128, 128, jnp.float32,
     dict(activation="tanh", precision=jax.lax.Precision.HIGHEST, biases="gate")),
    ("bf16-out-f32", 48, 96, 200, jnp.bfloat16,
     dict(activation="sigmoid", out_dtype=jnp.float32, biases="up")),
    ("bf16-bilinear-wT-preacts", 200, 300, 520, jnp.bfloat16,
     dict(activation=None, weights_transposed=True, return_preactivations=True)),
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
def test_one_kernel_call_per_glu(platform):
    kernel = glu_tpu if platform == "tpu" else glu_triton
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((128, 128), jnp.float32)

    def two_glus(x, wg, wu):
        return kernel(kernel(x, wg, wu, activation="silu"), wg, wu, activation="gelu")

    assert count_kernel_calls(lower_for(two_glus, x, w, w, platform=platform), platform) == 2
    unfused = lower_for(lambda x, wg, wu: jax.nn.silu(x @ wg) * (x @ wu), x, w, w,
                        platform=platform)
    assert count_kernel_calls(unfused, platform) == 0
