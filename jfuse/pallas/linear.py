"""Pallas kernels for the fused ``linear`` op: ``act(x @ w + b)`` in one pass over the output.

Two kernels, one per accelerator family, with the same contract:

* :func:`linear_tpu` is a Mosaic kernel: a ``(M/bm, N/bn, K/bk)`` grid whose K axis accumulates
  into an f32 VMEM scratch; the last K step adds the bias, applies the activation and writes.
* :func:`linear_triton` is a Triton kernel: a ``(M/bm, N/bn)`` grid, each program looping over K
  with masked loads, so ragged M, N and K need no padding.

Both accumulate in f32, do the epilogue in f32 and cast once to ``out_dtype``; with
``return_preactivation=True`` they also write ``z = x @ w + b`` from the same epilogue (the
autodiff rule of ``jfuse.ops.linear`` needs it). ``interpret=True`` runs either kernel in
Pallas' HLO interpreter, which is how their numerics are tested on a CPU.

``*_unsupported_reason`` say, without tracing anything, whether a kernel can serve a problem;
the kernels raise ``NotImplementedError`` with that reason otherwise, so a caller can fall back
to XLA. Nothing here knows about jaxprs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from jfuse.core.activations import get_activation
from jfuse.pallas._common import (
    TPU_DTYPES,
    TRITON_DTYPES,
    cdiv,
    contract,
    dtype_reason,
    empty_matmul_reason,
    int32_offsets_reason,
    quiet_triton_deprecation,
    raise_if_unsupported,
    tpu_precision_reason,
    triton_activation,
)
from jfuse.pallas._tiling import (
    edge_mask,
    masked_load,
    masked_store,
    outer_and,
    tpu_matmul_blocks,
    tpu_pad_k,
    tpu_vmem_limit_bytes,
    triton_matmul_blocks,
)

Array = jax.Array

__all__ = [
    "linear_tpu",
    "linear_triton",
    "tpu_unsupported_reason",
    "triton_unsupported_reason",
]

# TPU defaults. 512-wide tiles keep the MXU busy (block size is everything on TPU: 128-tiles run
# at a few % of peak); in f32 with two outputs and double buffering that is ~9 MiB of VMEM,
# which fits the smallest chips (16 MiB per core) within _tiling.TPU_VMEM_BUDGET, so Mosaic's
# scoped VMEM limit is not raised. Only caller-forced blocks over the budget raise that limit.
_TPU_BLOCK_M = 512
_TPU_BLOCK_N = 512
_TPU_BLOCK_K = 512

# Triton defaults: the usual 128x128 output tile; K slices (_tiling.TRITON_BLOCK_K_BY_ITEMSIZE)
# sized so that 3 pipeline stages of both operand tiles fit in shared memory (96 KiB).
_TRITON_BLOCK_M = 128
_TRITON_BLOCK_N = 128


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _check_operands(
    x: Array, w: Array, b: Array | None, rhs_transposed: bool
) -> tuple[int, int, int]:
    """Validates ranks and shapes (a caller bug, so ValueError) and returns (M, K, N)."""
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"linear kernels take 2-D x and w; got x{x.shape} and w{w.shape}.")
    m, k = x.shape
    n, k_w = w.shape if rhs_transposed else w.shape[::-1]
    if k_w != k:
        layout = "(N, K)" if rhs_transposed else "(K, N)"
        raise ValueError(f"x{x.shape} and w{w.shape} {layout} disagree on K.")
    if b is not None and b.shape != (n,):
        raise ValueError(f"bias must have shape ({n},); got {b.shape}.")
    return m, k, n


def _raise_if_unsupported(
    reason_fn: Callable[..., str | None],
    x: Array,
    w: Array,
    b: Array | None,
    out_dtype: Any,
    mkn: tuple[int, int, int],
) -> None:
    """NotImplementedError (the caller's cue to fall back to XLA) with the first reason found."""
    mixed = None
    if w.dtype != x.dtype:
        mixed = f"mixed operand dtypes (x {x.dtype.name}, w {w.dtype.name}) are not supported"
    others = (("bias", None if b is None else b.dtype), ("out_dtype", out_dtype))
    raise_if_unsupported(reason_fn, mkn, x.dtype, mixed, others)


def _epilogue(
    acc: Array,
    bias: Array | None,
    activation: Callable[[Array], Array] | None,
    out_dtype: Any,
    return_preactivation: bool,
) -> tuple[Array, ...]:
    """f32 bias add and activation on an accumulator tile; one cast per output."""
    z = acc if bias is None else acc + bias.astype(jnp.float32)
    y = z if activation is None else activation(z)
    if return_preactivation:
        return y.astype(out_dtype), z.astype(out_dtype)
    return (y.astype(out_dtype),)


def _out_shapes(m: int, n: int, out_dtype: Any, return_preactivation: bool):
    shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    return (shape, shape) if return_preactivation else (shape,)


def _finish(outs: tuple[Array, ...], return_preactivation: bool):
    return tuple(outs) if return_preactivation else outs[0]


# ----------------------------------------------------------------------------------------------
# TPU (Mosaic)
# ----------------------------------------------------------------------------------------------


def tpu_unsupported_reason(m: int, k: int, n: int, dtype: Any) -> str | None:
    """Why :func:`linear_tpu` cannot serve an ``(M, K) @ (K, N)`` problem, or None if it can."""
    return empty_matmul_reason(m, k, n) or dtype_reason("TPU", dtype, TPU_DTYPES)


def _tpu_linear_kernel(x_ref, w_ref, *refs, activation, rhs_transposed, has_bias,
                       return_preactivation, precision):
    """One (bm, bn) output tile; grid axis 2 walks K, accumulating into an f32 VMEM scratch."""
    b_ref = refs[0] if has_bias else None
    *out_refs, acc_ref = refs[1:] if has_bias else refs
    k_step = pl.program_id(2)

    @pl.when(k_step == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += contract(x_ref[...], w_ref[...], rhs_transposed, precision)

    @pl.when(k_step == pl.num_programs(2) - 1)
    def _write():
        bias = None if b_ref is None else b_ref[...]  # (1, bn) broadcasts over rows
        outs = _epilogue(acc_ref[...], bias, activation, out_refs[0].dtype, return_preactivation)
        for ref, value in zip(out_refs, outs):
            ref[...] = value


def _tpu_vmem_bytes(bm, bn, bk, in_itemsize, out_itemsize, n_outs, has_bias) -> int:
    """VMEM held by one grid step: double-buffered in/out blocks plus the f32 accumulator."""
    inputs = (bm * bk + bk * bn + (bn if has_bias else 0)) * in_itemsize
    outputs = n_outs * bm * bn * out_itemsize
    return 2 * (inputs + outputs) + bm * bn * 4


def _tpu_blocks(m, k, n, dtype, out_dtype, n_outs, has_bias, block_m, block_n, block_k):
    bm, bn, bk = tpu_matmul_blocks(m, k, n, dtype, out_dtype, block_m, block_n, block_k,
                                   max_m=_TPU_BLOCK_M, max_n=_TPU_BLOCK_N, max_k=_TPU_BLOCK_K)
    in_size, out_size = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
    vmem = _tpu_vmem_bytes(bm, bn, bk, in_size, out_size, n_outs, has_bias)
    return bm, bn, bk, vmem


def linear_tpu(
    x: Array,
    w: Array,
    b: Array | None = None,
    *,
    activation: str | None,
    rhs_transposed: bool = False,
    out_dtype: Any = None,
    return_preactivation: bool = False,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    precision: Any = None,
) -> Array | tuple[Array, Array]:
    """``act(x @ w + b)`` as one Mosaic (TPU) kernel.

    Args:
      x: ``(M, K)``.
      w: ``(K, N)``, or ``(N, K)`` with ``rhs_transposed=True`` (contracted in place, never
        transposed in memory).
      b: ``(N,)`` or None.
      activation: a name from ``jfuse.core.activations`` or None (identity).
      out_dtype: dtype of the outputs; default ``x.dtype``.
      return_preactivation: also return ``z = x @ w + b`` (in ``out_dtype``).
      interpret: run in Pallas' HLO interpreter (any backend, e.g. CPU for tests).
      block_m, block_n, block_k: tile sizes; None picks defaults (512 each, shrunk to the
        array, balanced across blocks). Each must be a multiple of the TPU tile (8 or 16 rows
        for 32/16-bit M, 128 for N and K) or cover its whole dimension.
      precision: ``lax.dot_general`` precision for the in-kernel dot: None/DEFAULT (Mosaic
        feeds f32 operands to the MXU as bf16) or HIGHEST (full f32); others raise
        NotImplementedError. Accumulation is f32 regardless.

    Returns:
      ``y`` of shape ``(M, N)``, or ``(y, z)`` with ``return_preactivation=True``.

    Raises:
      NotImplementedError: when :func:`tpu_unsupported_reason` (or mixed x/w dtypes) rules the
        problem out, so the caller can fall back to XLA.
    """
    m, k, n = _check_operands(x, w, b, rhs_transposed)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    _raise_if_unsupported(tpu_unsupported_reason, x, w, b, out_dtype, (m, k, n))
    if reason := tpu_precision_reason(precision):
        raise NotImplementedError(reason)
    act = get_activation(activation)
    n_outs = 2 if return_preactivation else 1
    bm, bn, bk, vmem = _tpu_blocks(
        m, k, n, x.dtype, out_dtype, n_outs, b is not None, block_m, block_n, block_k
    )

    # The K axis is the one a partial edge block would corrupt (it is summed over), so pad it
    # with zeros to a whole number of blocks; M and N edges are simply dropped on write.
    x, (w,), k_padded = tpu_pad_k(x, (w,), bk, rhs_transposed)
    grid = (cdiv(m, bm), cdiv(n, bn), k_padded // bk)

    in_specs = [
        pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
        pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk))
        if rhs_transposed
        else pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
    ]
    operands = [x, w]
    if b is not None:
        in_specs.append(pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)))
        operands.append(b.reshape(1, n))
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))

    kernel = functools.partial(
        _tpu_linear_kernel,
        activation=None if act is None else act.forward,
        rhs_transposed=rhs_transposed,
        has_bias=b is not None,
        return_preactivation=return_preactivation,
        precision=precision,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=_out_shapes(m, n, out_dtype, return_preactivation),
        grid=grid,
        in_specs=in_specs,
        out_specs=(out_spec,) * n_outs,
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
            vmem_limit_bytes=tpu_vmem_limit_bytes(vmem),
        ),
        interpret=interpret,
        name=f"jfuse_linear_{activation or 'identity'}",
    )(*operands)
    return _finish(outs, return_preactivation)


# ----------------------------------------------------------------------------------------------
# GPU (Triton)
# ----------------------------------------------------------------------------------------------


def triton_unsupported_reason(m: int, k: int, n: int, dtype: Any) -> str | None:
    """Why :func:`linear_triton` cannot serve an ``(M, K) @ (K, N)`` problem, or None."""
    return (empty_matmul_reason(m, k, n) or dtype_reason("Triton", dtype, TRITON_DTYPES)
            or int32_offsets_reason(m, k, n))


def _triton_linear_kernel(x_ref, w_ref, *refs, m, n, k, bm, bn, bk, activation,
                          rhs_transposed, has_bias, return_preactivation, precision):
    """One (bm, bn) output tile, over whole-array refs; a K loop of masked loads makes ragged
    M, N and K exact without padding."""
    b_ref = refs[0] if has_bias else None
    out_refs = refs[1:] if has_bias else refs
    row0, col0 = pl.program_id(0) * bm, pl.program_id(1) * bn
    rows, cols = edge_mask(row0, bm, m), edge_mask(col0, bn, n)

    def k_step(step, acc):
        k0 = step * bk
        ks = edge_mask(k0, bk, k)
        x = masked_load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], outer_and(rows, ks))
        if rhs_transposed:
            w = masked_load(w_ref.at[pl.ds(col0, bn), pl.ds(k0, bk)], outer_and(cols, ks))
        else:
            w = masked_load(w_ref.at[pl.ds(k0, bk), pl.ds(col0, bn)], outer_and(ks, cols))
        return acc + contract(x, w, rhs_transposed, precision)

    acc = lax.fori_loop(0, cdiv(k, bk), k_step, jnp.zeros((bm, bn), jnp.float32))
    bias = None if b_ref is None else masked_load(b_ref.at[pl.ds(col0, bn)], cols)[None, :]
    outs = _epilogue(acc, bias, activation, out_refs[0].dtype, return_preactivation)
    out_mask = outer_and(rows, cols)
    for ref, value in zip(out_refs, outs):
        masked_store(ref.at[pl.ds(row0, bm), pl.ds(col0, bn)], value, out_mask)


def linear_triton(
    x: Array,
    w: Array,
    b: Array | None = None,
    *,
    activation: str | None,
    rhs_transposed: bool = False,
    out_dtype: Any = None,
    return_preactivation: bool = False,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    precision: Any = None,
) -> Array | tuple[Array, Array]:
    """``act(x @ w + b)`` as one Triton (GPU) kernel.

    Same arguments and results as :func:`linear_tpu`. Blocks must be powers of two >= 16;
    defaults are 128 x 128 output tiles (shrunk to the array) and K slices of 32 (f32) or 64
    (16-bit). Exact GELU uses an in-kernel erf approximation (abs error ~1.5e-7), since Triton
    has no erf. With f32 operands and default precision Triton multiplies in IEEE f32 (no TF32).

    Raises:
      NotImplementedError: when :func:`triton_unsupported_reason` (or mixed x/w dtypes) rules
        the problem out, so the caller can fall back to XLA.
    """
    m, k, n = _check_operands(x, w, b, rhs_transposed)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    _raise_if_unsupported(triton_unsupported_reason, x, w, b, out_dtype, (m, k, n))
    get_activation(activation)  # validates the name
    bm, bn, bk = triton_matmul_blocks(m, k, n, x.dtype, block_m, block_n, block_k,
                                      max_m=_TRITON_BLOCK_M, max_n=_TRITON_BLOCK_N)

    kernel = functools.partial(
        _triton_linear_kernel,
        m=m, n=n, k=k, bm=bm, bn=bn, bk=bk,
        activation=triton_activation(activation),
        rhs_transposed=rhs_transposed,
        has_bias=b is not None,
        return_preactivation=return_preactivation,
        precision=precision,
    )
    # No BlockSpecs: every program sees whole arrays and slices them itself, because BlockSpec
    # blocks are loaded unmasked by the Triton lowering (ragged edges would read out of bounds).
    with quiet_triton_deprecation():
        outs = pl.pallas_call(
            kernel,
            out_shape=_out_shapes(m, n, out_dtype, return_preactivation),
            grid=(cdiv(m, bm), cdiv(n, bn)),
            compiler_params=pltriton.CompilerParams(
                # Stages left to the lowering: 3 on CUDA, 1 on ROCm.
                num_warps=8 if bm * bn >= 128 * 128 else 4
            ),
            interpret=interpret,
            name=f"jfuse_linear_{activation or 'identity'}",
        )(x, w, *([] if b is None else [b]))
    return _finish(outs, return_preactivation)
