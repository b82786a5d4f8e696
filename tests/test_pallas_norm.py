"""Tests for the fused-norm Pallas kernels (``jfuse.pallas.norm``): RMSNorm and LayerNorm, with
and without the residual add in front.

Numerics run both kernels in interpret mode on CPU against a float64 numpy reference computed
from the same (dtype-rounded) inputs; with a residual, the reference normalizes ``x + residual``
as jnp computes it in ``x.dtype``, which the kernel must reproduce bit for bit. Lowering tests
lower the real kernels for "tpu" and "cuda" from this CPU machine: interpret mode accepts
programs the backends reject, so every numerics case has a lowering twin.

Tolerances (after tokamax's norm tests, atol = 5e-7 * sqrt(H) in f32): the kernels reduce H f32
terms, whose rounding errors add up like a random walk to ~eps_f32 * sqrt(H) relative in the
variance and the mean, hence in rstd and in every normalized value; the scale multiplies that
error. A bf16 output is additionally rounded once, so it may be one bf16 ulp (2**-8 relative)
from the exact value (half an ulp of rounding, plus the f32 error near a rounding boundary).
Non-finite values are compared exactly: NaN where the reference has NaN, the same infinities.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfuse.pallas import norm as norm_module
from jfuse.pallas._tiling import TPU_VMEM_BUDGET
from jfuse.pallas.norm import (
    norm_tpu,
    norm_triton,
    tpu_unsupported_reason,
    triton_unsupported_reason,
)

try:  # tests/ as a package or as a rootdir on sys.path
    from tests.kernel_cases import (
        BACKENDS,
        DTYPE_IDS,
        DTYPES,
        PLATFORM,
        as64,
        assert_refuses_dtypes,
    )
    from tests.lowering import count_kernel_calls, lower_for
except ImportError:  # pragma: no cover
    from kernel_cases import BACKENDS, DTYPE_IDS, DTYPES, PLATFORM, as64, assert_refuses_dtypes
    from lowering import count_kernel_calls, lower_for

KERNELS = {"tpu": norm_tpu, "triton": norm_triton}
NORMS = {"rms": False, "layer": True}  # -> subtract_mean
EPS = 1e-6

# Forced block sizes small enough that 37 rows end in a ragged edge block (TPU: a multiple of
# the 8- or 16-row tile; Triton: a power of two).
SMALL_BLOCK = {"tpu": {jnp.float32: 8, jnp.bfloat16: 16}, "triton": {jnp.float32: 4,
                                                                     jnp.bfloat16: 4}}


# ----------------------------------------------------------------------------------------------
# Reference and comparison
# ----------------------------------------------------------------------------------------------


def _inputs(rows, hidden, dtype, *, residual, scale, bias, seed=0):
    """Random operands in ``dtype``: x off-centre (so LayerNorm's mean matters), N(0, 1) rest."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((rows, hidden)) + 0.5, dtype)
    r = jnp.asarray(rng.standard_normal((rows, hidden)), dtype) if residual else None
    s = jnp.asarray(rng.standard_normal(hidden), dtype) if scale else None
    b = jnp.asarray(rng.standard_normal(hidden), dtype) if bias else None
    return x, r, s, b


def _reference(x, residual, scale, bias, *, subtract_mean, scale_offset=0.0, eps=EPS):
    """float64 (y, h, mean, rstd); h is the sum as the unfused jnp add rounds it (or None)."""
    h = None if residual is None else x + residual
    h64 = as64(x if h is None else h)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mean = h64.mean(-1, keepdims=True) if subtract_mean else None
        centered = h64 if mean is None else h64 - mean
        rstd = 1.0 / np.sqrt((centered * centered).mean(-1, keepdims=True) + eps)
        y = centered * rstd
        if scale is not None:
            y = y * (as64(scale) + scale_offset)
        if bias is not None:
            y = y + as64(bias)
    return y, h, None if mean is None else mean[:, 0], rstd[:, 0]


def _assert_close(got, want, *, rtol, atol, what):
    got = as64(got)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions differ")
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf | np.isinf(got)], want[inf | np.isinf(got)],
                                  err_msg=f"{what}: infinities differ")
    ok = ~(nan | inf)
    err = np.abs(got[ok] - want[ok])
    bound = atol + rtol * np.abs(want[ok])
    if err.size:
        worst = np.argmax(err - bound)
        assert np.all(err <= bound), (
            f"{what}: error {err[worst]:.3g} > bound {bound[worst]:.3g} "
            f"(got {got[ok][worst]!r}, want {want[ok][worst]!r})"
        )


def _f32_atol(hidden):
    return 5e-7 * math.sqrt(hidden)


def _check(out, x, residual, scale, bias, *, subtract_mean, scale_offset=0.0, out_dtype=None):
    """Checks every output of a kernel call against the float64 reference."""
    rows, hidden = x.shape
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    y_want, h_want, mean_want, rstd_want = _reference(
        x, residual, scale, bias, subtract_mean=subtract_mean, scale_offset=scale_offset
    )
    assert isinstance(out, tuple) and len(out) == 2 + subtract_mean + (residual is not None)
    y, *rest = out
    if residual is not None:
        h = rest.pop(0)
        assert h.dtype == x.dtype and h.shape == x.shape
        np.testing.assert_array_equal(as64(h), as64(h_want))  # the unfused add, bit for bit
    for stat in rest:
        assert stat.dtype == jnp.float32 and stat.shape == (rows,)
    mean, rstd = rest if subtract_mean else (None, rest[0])
    assert y.dtype == out_dtype and y.shape == (rows, hidden)

    atol = _f32_atol(hidden)
    finite = np.isfinite(y_want)
    gain = 1.0 if scale is None else max(1.0, float(np.max(np.abs(as64(scale) + scale_offset))))
    y_rtol = 2.0**-8 if out_dtype.itemsize == 2 else 2.0**-22
    _assert_close(y, y_want, rtol=y_rtol, atol=atol * gain, what="y")
    _assert_close(rstd, rstd_want, rtol=atol, atol=0.0, what="rstd")
    if subtract_mean:
        h64 = as64(x if residual is None else h_want)
        scale_h = float(np.max(np.abs(h64[np.isfinite(h64)]), initial=1.0))
        _assert_close(mean, mean_want, rtol=0.0, atol=atol * scale_h, what="mean")
    return finite


def _run(kernel, rows, hidden, dtype, *, norm, residual, scale, bias, scale_offset=0.0,
         block_rows=None, out_dtype=None, seed=0):
    x, r, s, b = _inputs(rows, hidden, dtype, residual=residual, scale=scale, bias=bias,
                         seed=seed)
    out = KERNELS[kernel](x, s, b, r, subtract_mean=NORMS[norm], eps=EPS,
                          scale_offset=scale_offset, out_dtype=out_dtype, interpret=True,
                          block_rows=block_rows)
    _check(out, x, r, s, b, subtract_mean=NORMS[norm], scale_offset=scale_offset,
           out_dtype=out_dtype)


# ----------------------------------------------------------------------------------------------
# Numerics (interpret mode)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [64, 100, 384])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("kernel", BACKENDS)
def test_norm_matches_reference(kernel, norm, dtype, residual, hidden):
    # LayerNorm with scale and bias, RMSNorm with a scale only: the usual model layouts.
    _run(kernel, 24, hidden, dtype, norm=norm, residual=residual, scale=True,
         bias=norm == "layer")


# (id, scale, bias, scale_offset)
PARAMS = [
    ("bare", False, False, 0.0),
    ("scale", True, False, 0.0),
    ("bias", False, True, 0.0),
    ("scale-bias", True, True, 0.0),
    ("gemma-1+w", True, False, 1.0),
]


@pytest.mark.parametrize("params", PARAMS, ids=[p[0] for p in PARAMS])
@pytest.mark.parametrize("kernel", BACKENDS)
def test_scale_bias_and_offset(kernel, params):
    _, scale, bias, offset = params
    for norm, dtype in (("rms", jnp.bfloat16), ("layer", jnp.float32)):
        _run(kernel, 16, 100, dtype, norm=norm, residual=True, scale=scale, bias=bias,
             scale_offset=offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("kernel", BACKENDS)
def test_ragged_rows_with_small_blocks(kernel, norm, dtype):
    # 37 rows in blocks of 8/16 (TPU) or 4 (Triton): the last block is mostly past the array.
    # Interpret mode fills out-of-bounds reads with NaN; none may reach a real row.
    _run(kernel, 37, 100, dtype, norm=norm, residual=True, scale=True, bias=True,
         block_rows=SMALL_BLOCK[kernel][dtype])


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("kernel", BACKENDS)
def test_wide_rows(kernel, norm):
    # 16384 lanes: the width both kernels promise to hold whole (the TPU in a budgeted VMEM
    # block, Triton in one program).
    dtype = jnp.bfloat16 if norm == "rms" else jnp.float32
    _run(kernel, 20, 16384, dtype, norm=norm, residual=True, scale=True, bias=norm == "layer",
         scale_offset=1.0 if norm == "rms" else 0.0)


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16], ids=["to-f32", "to-bf16"])
@pytest.mark.parametrize("kernel", BACKENDS)
def test_out_dtype(kernel, out_dtype):
    x_dtype = jnp.bfloat16 if out_dtype == jnp.float32 else jnp.float32
    _run(kernel, 37, 100, x_dtype, norm="layer", residual=True, scale=True, bias=True,
         out_dtype=out_dtype)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_under_jit_with_f32_params_on_bf16_rows(kernel):
    # Mixed-precision models keep parameters in f32 while activations are bf16.
    x, r, _, _ = _inputs(37, 100, jnp.bfloat16, residual=True, scale=False, bias=False)
    s = jnp.linspace(0.5, 1.5, 100, dtype=jnp.float32)
    fn = jax.jit(lambda x, r, s: KERNELS[kernel](x, s, None, r, subtract_mean=False, eps=EPS,
                                                 interpret=True))
    _check(fn(x, r, s), x, r, s, None, subtract_mean=False)


def _with_nonfinite_rows(x, residual):
    """Rows with a NaN, +inf, -inf, both infinities, and an inf arriving via the residual."""
    x = np.array(x.astype(jnp.float32))
    x[3, 7] = np.nan
    x[10, 0] = np.inf
    x[17, 99] = -np.inf
    x[20, 5], x[20, 50] = np.inf, -np.inf
    if residual is not None:
        residual = np.array(residual.astype(jnp.float32))
        residual[30, 42] = np.inf
        residual = jnp.asarray(residual)
    return jnp.asarray(x), residual


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("kernel", BACKENDS)
def test_nonfinite_rows_propagate_like_jnp(kernel, norm, residual):
    # H = 100: Triton masks lanes 100..127 of its 128-lane block, and those must neither clean
    # a NaN row nor poison a finite one; small blocks put finite rows beside non-finite ones.
    x, r, s, b = _inputs(37, 100, jnp.float32, residual=residual, scale=True, bias=True)
    x, r = _with_nonfinite_rows(x, r)
    out = KERNELS[kernel](x, s, b, r, subtract_mean=NORMS[norm], eps=EPS, interpret=True,
                          block_rows=SMALL_BLOCK[kernel][jnp.float32])
    finite = _check(out, x, r, s, b, subtract_mean=NORMS[norm])
    bad_rows = {3, 10, 17, 20} | ({30} if residual else set())
    assert {i for i in range(37) if not finite[i].all()} == bad_rows
    # The plain-jnp semantics, spelled out for one case each: an inf in an RMSNorm row zeroes
    # the row's other lanes (rstd = 0) and makes its own lane NaN; LayerNorm turns it all NaN.
    y, rstd = np.asarray(out[0]), np.asarray(out[-1])
    if norm == "rms":
        assert rstd[10] == 0 and np.isnan(y[10, 0]) and np.array_equal(y[10, 1:], np.asarray(b)[1:])
    else:
        assert np.isnan(y[10]).all() and np.isnan(rstd[10]) and np.asarray(out[-2])[10] == np.inf


# ----------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------


def _tpu_rows(rows, hidden, dtype, *, residual=True, n_params=2, n_stats=2, **kw):
    return norm_module._tpu_block_rows(rows, hidden, dtype, has_residual=residual,
                                       n_params=n_params, n_stats=n_stats, **kw)


def test_tpu_default_block_rows_fit_the_budget():
    budget = TPU_VMEM_BUDGET
    assert _tpu_rows(37, 4096, jnp.float32) == 37  # few rows: one block, whole array
    assert _tpu_rows(5, 100, jnp.bfloat16) == 5
    for hidden in (64, 100, 384, 4096, 8192, 16384):
        for dtype, tile in ((jnp.float32, 8), (jnp.bfloat16, 16)):
            br = _tpu_rows(100_000, hidden, dtype)
            assert br % tile == 0 and 0 < br <= 1024, (hidden, dtype, br)
            layout = dict(has_residual=True, n_params=2, n_stats=2)
            assert norm_module._tpu_vmem_bytes(br, hidden, dtype, **layout) <= budget
            # ... and it is the most rows that fit (up to the 1024 cap).
            more = norm_module._tpu_vmem_bytes(br + tile, hidden, dtype, **layout)
            assert br == 1024 or more > budget, (hidden, dtype, br)
    # Balanced edge blocks: 1000 rows of 4096 f32 (at most 64 rows fit) -> 16 blocks of 64 or
    # less, never one nearly empty block.
    br = _tpu_rows(1000, 4096, jnp.float32)
    assert br % 8 == 0 and 1000 - (math.ceil(1000 / br) - 1) * br > br // 2
    # A 16-bit output makes the row block a multiple of 16 even for f32 input.
    assert _tpu_rows(100_000, 100, jnp.float32, out_dtype=jnp.bfloat16) % 16 == 0


def test_tpu_forced_block_rows_must_tile():
    assert _tpu_rows(37, 100, jnp.float32, block_rows=8) == 8
    assert _tpu_rows(37, 100, jnp.float32, block_rows=64) == 37  # clipped to the array
    with pytest.raises(ValueError, match="multiple of 8"):
        _tpu_rows(37, 100, jnp.float32, block_rows=12)
    with pytest.raises(ValueError, match="multiple of 16"):
        norm_tpu(jnp.ones((64, 128), jnp.bfloat16), subtract_mean=False, eps=EPS,
                 interpret=True, block_rows=8)


def test_triton_default_block_rows():
    rows = norm_module._triton_block_rows
    assert rows(1000, 64, None) == 16  # small rows are grouped (capped at 16 per program)
    assert rows(1000, 512, None) == 8  # ~4096 elements per program
    assert rows(1000, 4096, None) == 1
    assert rows(1000, 16384, None) == 1
    assert rows(3, 64, None) == 4  # never more than the rows, rounded up to a power of two
    assert rows(1000, 64, 2) == 2
    with pytest.raises(ValueError, match="power of two"):
        norm_triton(jnp.ones((8, 64)), subtract_mean=False, eps=EPS, interpret=True,
                    block_rows=3)


def test_tpu_raises_vmem_limit_only_for_oversized_blocks():
    x = jax.ShapeDtypeStruct((4096, 16384), jnp.float32)

    def lower(block_rows):
        fn = lambda x: norm_tpu(x, subtract_mean=True, eps=EPS, block_rows=block_rows)
        return lower_for(fn, x, platform="tpu")

    assert "scoped_memory_configs" not in lower(None)
    assert "scoped_memory_configs" in lower(256)  # ~82 MiB: the caller asked for it


# ----------------------------------------------------------------------------------------------
# Refusals and caller mistakes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", BACKENDS)
def test_unsupported_reasons(kernel):
    reason = {"tpu": tpu_unsupported_reason, "triton": triton_unsupported_reason}[kernel]
    for dtype in (jnp.float32, jnp.bfloat16):
        for hidden in (1, 64, 100, 4096, 16384):
            assert reason(4096, hidden, dtype) is None, (hidden, dtype)
    assert_refuses_dtypes(reason, kernel, 37, 100)
    assert "empty" in reason(0, 100, jnp.float32)
    assert "empty" in reason(37, 0, jnp.float32)


def test_widest_rows():
    # TPU: whole rows in VMEM, judged for the widest layout (residual, scale, bias, LayerNorm).
    assert tpu_unsupported_reason(64, 26_000, jnp.float32) is None
    assert "VMEM" in tpu_unsupported_reason(64, 27_000, jnp.float32)
    assert tpu_unsupported_reason(64, 21_500, jnp.bfloat16) is None
    assert "VMEM" in tpu_unsupported_reason(64, 22_000, jnp.bfloat16)
    # Triton: one row per program, up to 64Ki lanes.
    assert triton_unsupported_reason(64, 65_536, jnp.float32) is None
    assert "too wide" in triton_unsupported_reason(64, 65_537, jnp.float32)
    assert "int32" in triton_unsupported_reason(2**17, 2**14, jnp.bfloat16)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_wrappers_refuse_with_not_implemented(kernel):
    fn = KERNELS[kernel]
    x = jnp.ones((16, 64), jnp.float32)
    kw = dict(subtract_mean=True, eps=EPS, interpret=True)
    with pytest.raises(NotImplementedError, match="int32"):
        fn(x.astype(jnp.int32), **kw)
    with pytest.raises(NotImplementedError, match="mixed"):
        fn(x, residual=x.astype(jnp.bfloat16), **kw)
    with pytest.raises(NotImplementedError, match="out_dtype"):
        fn(x, out_dtype=jnp.int32, **kw)
    with pytest.raises(NotImplementedError, match="scale"):
        fn(x, jnp.ones((64,), jnp.int32), **kw)
    with pytest.raises(NotImplementedError, match="empty"):
        fn(jnp.ones((0, 64), jnp.float32), **kw)
    too_wide = jax.ShapeDtypeStruct((16, 2**17), jnp.float32)  # traced only, never allocated
    with pytest.raises(NotImplementedError, match="too wide"):
        jax.eval_shape(lambda x: fn(x, **kw), too_wide)


def test_tpu_refuses_wider_out_dtype_near_the_limit():
    # f32 rows of 20k fit an 8-row block; a bf16 y needs 16-row blocks, which do not fit.
    x = jax.ShapeDtypeStruct((64, 20_000), jnp.float32)
    assert tpu_unsupported_reason(64, 20_000, jnp.float32) is None
    jax.eval_shape(lambda x: norm_tpu(x, x[0], x[0], x, subtract_mean=True, eps=EPS), x)
    with pytest.raises(NotImplementedError, match="too wide"):
        jax.eval_shape(lambda x: norm_tpu(x, x[0], x[0], x, subtract_mean=True, eps=EPS,
                                          out_dtype=jnp.bfloat16), x)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_bad_arguments_raise_value_error(kernel):
    fn = KERNELS[kernel]
    x = jnp.ones((16, 64), jnp.float32)
    kw = dict(subtract_mean=False, eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="2-D"):
        fn(jnp.ones((2, 8, 64)), **kw)
    with pytest.raises(ValueError, match="residual"):
        fn(x, residual=jnp.ones((16, 32)), **kw)
    with pytest.raises(ValueError, match="scale"):
        fn(x, jnp.ones((1, 64)), **kw)
    with pytest.raises(ValueError, match="bias"):
        fn(x, None, jnp.ones((63,)), **kw)
    with pytest.raises(ValueError, match="scale_offset"):
        fn(x, scale_offset=1.0, **kw)


# ----------------------------------------------------------------------------------------------
# Lowering for the real backends (from this CPU machine)
# ----------------------------------------------------------------------------------------------


def _lower(kernel, rows, hidden, dtype, *, norm, residual, scale=True, bias=True, **kwargs):
    x = jax.ShapeDtypeStruct((rows, hidden), dtype)
    p = jax.ShapeDtypeStruct((hidden,), dtype)

    def f(x, r, s, b):
        return KERNELS[kernel](x, s, b, r, subtract_mean=NORMS[norm], eps=EPS, **kwargs)

    args = (x, x if residual else None, p if scale else None, p if bias else None)
    return lower_for(f, *args, platform=PLATFORM[kernel])


LOWERING_SHAPES = [
    # (rows, hidden, dtype): tiny, ragged lanes, aligned, LLM-sized, the widest promised.
    (37, 64, jnp.float32),
    (37, 100, jnp.bfloat16),
    (256, 384, jnp.float32),
    (4096, 4096, jnp.bfloat16),
    (1000, 16384, jnp.bfloat16),
]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("shape", LOWERING_SHAPES,
                         ids=[f"{r}x{h}-{jnp.dtype(d).name}" for r, h, d in LOWERING_SHAPES])
@pytest.mark.parametrize("kernel", BACKENDS)
def test_lowers_one_kernel_per_norm(kernel, shape, norm, residual):
    text = _lower(kernel, *shape, norm=norm, residual=residual)
    assert count_kernel_calls(text, PLATFORM[kernel]) == 1


# (id, dtype, kwargs): optional inputs absent, Gemma offset, other output dtypes, forced blocks.
LOWERING_OPTIONS = [
    ("bare", jnp.float32, dict(scale=False, bias=False)),
    ("gemma", jnp.bfloat16, dict(bias=False, scale_offset=1.0)),
    ("bf16-to-f32", jnp.bfloat16, dict(out_dtype=jnp.float32)),
    ("f32-to-bf16", jnp.float32, dict(out_dtype=jnp.bfloat16)),
    ("small-blocks", jnp.float32, dict(block_rows="small")),
]


@pytest.mark.parametrize("case", LOWERING_OPTIONS, ids=[c[0] for c in LOWERING_OPTIONS])
@pytest.mark.parametrize("kernel", BACKENDS)
def test_lowers_options(kernel, case):
    _, dtype, kwargs = case
    kwargs = dict(kwargs)
    if kwargs.get("block_rows") == "small":
        kwargs["block_rows"] = SMALL_BLOCK[kernel][dtype]
    for norm in NORMS:
        text = _lower(kernel, 37, 100, dtype, norm=norm, residual=True, **kwargs)
        assert count_kernel_calls(text, PLATFORM[kernel]) == 1


def test_triton_f16_lowers():
    for norm in NORMS:
        text = _lower("triton", 37, 100, jnp.float16, norm=norm, residual=True)
        assert count_kernel_calls(text, "cuda") == 1


@pytest.mark.parametrize("kernel", BACKENDS)
def test_two_norms_lower_to_two_kernels(kernel):
    fn = KERNELS[kernel]
    x = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((256,), jnp.bfloat16)

    def block(x, s):
        y, h, _ = fn(x, s, None, x, subtract_mean=False, eps=EPS)
        return fn(y, s, s, h, subtract_mean=True, eps=EPS)

    assert count_kernel_calls(lower_for(block, x, s, platform=PLATFORM[kernel]),
                              PLATFORM[kernel]) == 2
