"""Tests for the fused gated-linear-unit Pallas kernels (``jfuse.pallas.glu``).

:class:`TestGluKernels` runs the matmul-epilogue contract of ``tests/kernel_cases.py`` (numerics
in interpret mode against float64, refusals, lowering for "tpu" and "cuda") for the GLU's two
weights and its ``(y, gate_pre, up_pre)`` outputs; the functions below test what is the GLU's
own: one bias per branch, its default tiles, and the GPU profitability rule.

Tolerances: the kernels accumulate both branches in f32, do bias, activation and product in
f32, and round once to the output dtype. So the pre-activations are within ~1e-5 of their own
magnitude (f32) or half a bf16 ulp (2**-8 relative) plus that noise. The product y = act(g) * u
inherits the f32 noise of both factors: |dy| <= |act'(g)| |u| |dg| + |act(g)| |du|, with
|act'| <= 1.13 for every gate here and |act(g)| <= max(|g|, 1), so its absolute tolerance is
scaled by max|u| * max(1, max|g|) rather than by |y| alone; the one final rounding gives the
same relative term as the pre-activations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfuse.pallas._tiling import TPU_VMEM_BUDGET
from jfuse.pallas.glu import (
    GLU,
    GPU_MAX_PROFITABLE_K,
    glu_tpu,
    glu_triton,
    profitability_reason,
    tpu_unsupported_reason,
    triton_unsupported_reason,
)
from jfuse.pallas.matmul import tpu_blocks

try:  # tests/ as a package or as a rootdir on sys.path
    from tests.kernel_cases import ACTIVATIONS_64, BACKENDS, SMALL_BLOCKS, assert_close
    from tests.kernel_cases import MatmulKernelTests
    from tests.lowering import lower_for
except ImportError:  # pragma: no cover
    from kernel_cases import ACTIVATIONS_64, BACKENDS, SMALL_BLOCKS, assert_close
    from kernel_cases import MatmulKernelTests
    from lowering import lower_for


class TestGluKernels(MatmulKernelTests):
    KERNELS = {"tpu": glu_tpu, "triton": glu_triton}
    REASONS = {"tpu": tpu_unsupported_reason, "triton": triton_unsupported_reason}
    N_WEIGHTS = 2
    BIASES = {"all": (True, True), "gate": (True, False), "up": (False, True),
              "none": (False, False)}
    TRANSPOSED = "weights_transposed"
    EXTRAS = "return_preactivations"
    LOWERING_CASES = [
        # (id, M, K, N, dtype, kwargs)
        ("f32-aligned", 128, 256, 128, jnp.float32, dict(activation="gelu")),
        ("bf16-llm-default", 1024, 4096, 1536, jnp.bfloat16,
         dict(activation="silu", extras=True)),
        ("f32-k-padded", 600, 1000, 600, jnp.float32, dict(activation="relu", biases="none")),
        ("bf16-wT", 256, 512, 384, jnp.bfloat16, dict(activation="gelu", transposed=True)),
        ("f32-small-blocks", 37, 700, 150, jnp.float32, dict(activation="gelu_tanh", small=True)),
        ("f32-highest", 64, 128, 128, jnp.float32,
         dict(activation="tanh", precision=jax.lax.Precision.HIGHEST, biases="gate")),
        ("bf16-out-f32", 48, 96, 200, jnp.bfloat16,
         dict(activation="sigmoid", out_dtype=jnp.float32, biases="up")),
        ("bf16-bilinear-wT-preacts", 200, 300, 520, jnp.bfloat16,
         dict(activation=None, transposed=True, extras=True)),
    ]

    @staticmethod
    def epilogue64(zs, activation):
        gate, up = zs
        return ACTIVATIONS_64[activation](gate) * up, gate, up

    @staticmethod
    def unfused(x, wg, wu):
        return jax.nn.silu(x @ wg) * (x @ wu)

    def assert_output_close(self, y, want, dtype):
        # The product's error scales with both factors (see the module docstring).
        _, gate_want, up_want = want
        scale = np.max(np.abs(up_want)) * max(1.0, np.max(np.abs(gate_want)))
        assert_close(y, want[0], dtype, scale=max(scale, 1.0))


CASE = TestGluKernels()


# ----------------------------------------------------------------------------------------------
# Numerics (interpret mode)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("biases", list(TestGluKernels.BIASES))
@pytest.mark.parametrize("kernel", BACKENDS)
def test_each_bias_combination_with_ragged_blocks(kernel, biases):
    # A bias on one branch only must land on that branch, including in the ragged N edge block.
    CASE.run_and_check(kernel, 37, 300, 150, jnp.float32, activation="gelu", biases=biases,
                       transposed=biases in ("gate", "none"), **SMALL_BLOCKS[kernel])


@pytest.mark.parametrize("kernel", BACKENDS)
def test_several_default_blocks_on_every_axis(kernel):
    # TPU defaults: M=600 -> 2 x 304 rows, N=300 -> 256 + 44 lanes, K=1100 -> 3 x 384 (padded
    # to 1152). Triton: 5 x 128 rows, 5 x 64 columns, 35 K steps with a remainder.
    CASE.run_and_check(kernel, 600, 1100, 300, jnp.bfloat16, activation="silu")


@pytest.mark.parametrize("kernel", BACKENDS)
def test_single_output_and_out_dtype(kernel):
    args, args64 = CASE.operands(37, 45, 53, jnp.float32)
    fn = CASE.KERNELS[kernel]
    want = CASE.reference(args64, "tanh")
    y = fn(*args, activation="tanh", interpret=True)
    assert isinstance(y, jax.Array)
    CASE.assert_output_close(y, want, jnp.float32)
    y16, gate16, up16 = fn(*args, activation="tanh", out_dtype=jnp.bfloat16,
                           return_preactivations=True, interpret=True)
    assert y16.dtype == gate16.dtype == up16.dtype == jnp.bfloat16
    CASE.assert_output_close(y16, want, jnp.bfloat16)
    assert_close(gate16, want[1], jnp.bfloat16)
    assert_close(up16, want[2], jnp.bfloat16)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_bf16_in_f32_out(kernel):
    args, args64 = CASE.operands(37, 45, 53, jnp.bfloat16)
    y = CASE.KERNELS[kernel](*args, activation="sigmoid", out_dtype=jnp.float32, interpret=True)
    assert y.dtype == jnp.float32
    CASE.assert_output_close(y, CASE.reference(args64, "sigmoid"), jnp.float32)  # no bf16 rounding


@pytest.mark.parametrize("kernel", BACKENDS)
def test_under_jit(kernel):
    args, args64 = CASE.operands(37, 45, 53, jnp.bfloat16, biases="up")
    fn = jax.jit(lambda *a: CASE.KERNELS[kernel](*a, activation="gelu", interpret=True))
    CASE.assert_output_close(fn(*args), CASE.reference(args64, "gelu"), jnp.bfloat16)


# ----------------------------------------------------------------------------------------------
# Block sizes and refusals
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", BACKENDS)
def test_wrappers_refuse_with_not_implemented(kernel):
    fn = CASE.KERNELS[kernel]
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


@pytest.mark.parametrize("kernel", BACKENDS)
def test_bad_arguments_raise_value_error(kernel):
    fn = CASE.KERNELS[kernel]
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
    # 16-bit, as measured on an H200: the kernel won at K=384 and K=1024, lost at K=4096.
    for dtype in (jnp.bfloat16, jnp.float16):
        for k in (128, 384, 1024):
            assert profitability_reason(backend, 8192, k, 1536, dtype) is None
        assert profitability_reason(backend, 8192, 1025, 1536, dtype)
        text = profitability_reason(backend, 8192, 4096, 11008, dtype)
        assert text and text.startswith("K=4096 > 1024: on GPU") and "XLA" in text
        assert "H200" in text
    # f32 lost at every K measured (XLA's GEMMs use TF32): XLA at any K, small ones included.
    for k in (64, 384, 4096):
        text = profitability_reason(backend, 8192, k, 1536, jnp.float32)
        assert text and text.startswith("float32 on GPU") and "TF32" in text
    # Dtypes no kernel runs are the unsupported_reason's business, not this rule's.
    assert profitability_reason(backend, 8192, 8192, 256, jnp.int32) is None


def test_linear_profitability_follows_the_dtype_rule():
    from jfuse.pallas.linear import profitability_reason as linear_reason

    assert linear_reason("tpu", 8192, 4096, 4096, jnp.float32) is None
    for backend in ("triton", "gpu", "cuda"):
        assert linear_reason(backend, 8192, 4096, 4096, jnp.bfloat16) is None
        assert linear_reason(backend, 8192, 4096, 4096, jnp.float16) is None
        assert "TF32" in linear_reason(backend, 64, 64, 64, jnp.float32)
    with pytest.raises(ValueError, match="backend"):
        linear_reason("rocm", 64, 64, 64, jnp.float32)


def test_profitability_rule_lives_in_one_table(monkeypatch):
    assert profitability_reason("triton", 64, 4096, 64, jnp.bfloat16)
    monkeypatch.setitem(GPU_MAX_PROFITABLE_K, "bfloat16", 8192)
    assert profitability_reason("triton", 64, 4096, 64, jnp.bfloat16) is None
    assert "K=8193 > 8192" in profitability_reason("triton", 64, 8193, 64, jnp.bfloat16)


def test_profitability_rejects_unknown_backends():
    with pytest.raises(ValueError, match="backend"):
        profitability_reason("rocm-mi300", 64, 64, 64, jnp.float32)
