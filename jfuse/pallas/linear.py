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

from jfuse.ops.activations import get_activation
from jfuse.pallas._common import (
    cdiv,
    gelu_exact_without_erf,
    is_power_of_2,
    next_power_of_2,
    quiet_triton_deprecation,
    round_up,
)

Array = jax.Array

__all__ = [
    "linear_tpu",
    "linear_triton",
    "tpu_unsupported_reason",
    "triton_unsupported_reason",
]

_TPU_DTYPES = (jnp.float32, jnp.bfloat16)
_TRITON_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# TPU defaults. 512-wide tiles keep the MXU busy (block size is everything on TPU: 128-tiles run
# at a few % of peak); in f32 with two outputs and double buffering that is ~9 MiB of VMEM,
# which fits the smallest chips (16 MiB per core) without raising Mosaic's scoped VMEM limit.
# Only caller-forced blocks over the budget raise that limit.
_TPU_BLOCK_M = 512
_TPU_BLOCK_N = 512
_TPU_BLOCK_K = 512
_TPU_LANES = 128
_TPU_VMEM_BUDGET = 12 * 2**20

# Triton defaults: the usual 128x128 output tile; K slices sized so that 3 pipeline stages of
# both operand tiles fit in shared memory (96 KiB).
_TRITON_BLOCK_M = 128
_TRITON_BLOCK_N = 128
_TRITON_BLOCK_K_BY_ITEMSIZE = {4: 32, 2: 64}
_TRITON_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _dtype_reason(backend: str, dtype: Any, allowed: tuple[Any, ...]) -> str | None:
    dtype = jnp.dtype(dtype)
    if dtype not in [jnp.dtype(d) for d in allowed]:
        names = ", ".join(jnp.dtype(d).name for d in allowed)
        return f"dtype {dtype.name} is not supported by the {backend} kernel ({names} only)"
    return None


def _shape_reason(m: int, k: int, n: int) -> str | None:
    if min(m, k, n) <= 0:
        return f"empty matmul (M={m}, K={k}, N={n}) has nothing for a kernel to do"
    return None


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
    reason = reason_fn(*mkn, x.dtype)
    if reason is None and w.dtype != x.dtype:
        reason = f"mixed operand dtypes (x {x.dtype.name}, w {w.dtype.name}) are not supported"
    for what, dtype in (("bias", None if b is None else b.dtype), ("out_dtype", out_dtype)):
        if reason is None and dtype is not None and (other := reason_fn(*mkn, dtype)):
            reason = f"{what} {other}"
    if reason is not None:
        raise NotImplementedError(reason)


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


def _contract(x: Array, w: Array, rhs_transposed: bool, precision: Any) -> Array:
    """x @ w (or x @ w.T) into f32, contracting w's dim 1 directly when it is (N, K)."""
    dims = (((1,), (1,)), ((), ())) if rhs_transposed else (((1,), (0,)), ((), ()))
    return lax.dot_general(
        x, w, dims, precision=precision, preferred_element_type=jnp.float32
    )


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
    return _shape_reason(m, k, n) or _dtype_reason("TPU", dtype, _TPU_DTYPES)


def _tpu_precision_reason(precision: Any) -> str | None:
    """Mosaic's dot takes DEFAULT or HIGHEST, the same for both operands; refuse the rest
    here rather than fail at lowering."""
    parts = precision if isinstance(precision, (tuple, list)) else (precision,)
    try:
        kinds = {None if p is None else lax.Precision(p) for p in parts}
    except (TypeError, ValueError):  # e.g. a DotAlgorithmPreset
        kinds = {"unsupported"}
    if len(kinds) == 1 and kinds <= {None, lax.Precision.DEFAULT, lax.Precision.HIGHEST}:
        return None
    return f"precision={precision!r} is not supported by the TPU kernel (DEFAULT or HIGHEST only)"


def _tpu_linear_kernel(x_ref, w_ref, *refs, activation, rhs_transposed, has_bias,
                       return_preactivation, precision):
    """One (bm, bn) output tile; grid axis 2 walks K, accumulating into an f32 VMEM scratch."""
    b_ref = refs[0] if has_bias else None
    *out_refs, acc_ref = refs[1:] if has_bias else refs
    k_step = pl.program_id(2)

    @pl.when(k_step == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += _contract(x_ref[...], w_ref[...], rhs_transposed, precision)

    @pl.when(k_step == pl.num_programs(2) - 1)
    def _write():
        bias = None if b_ref is None else b_ref[...]  # (1, bn) broadcasts over rows
        outs = _epilogue(acc_ref[...], bias, activation, out_refs[0].dtype, return_preactivation)
        for ref, value in zip(out_refs, outs):
            ref[...] = value


def _tpu_sublanes(dtype: Any) -> int:
    # Packed 16-bit dtypes fill a (16, 128) tile; 32-bit ones an (8, 128) tile.
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def _tpu_balanced_block(dim: int, max_block: int, align: int) -> int:
    """The whole dim if it fits, else equal-ish blocks (multiples of ``align``) <= max_block.

    Balancing avoids a mostly-empty last block (M=600 gets 2 x 304, not 512 + 88).
    """
    if dim <= max_block:
        return dim
    return round_up(cdiv(dim, cdiv(dim, max_block)), align)


def _tpu_forced_block(name: str, dim: int, block: int, align: int) -> int:
    """A caller-chosen block: clipped to the dim, and checked against Mosaic's tiling rule."""
    if block >= dim:
        return dim
    if block <= 0 or block % align:
        raise ValueError(
            f"{name}={block} must be a multiple of {align} or cover the whole dimension ({dim})."
        )
    return block


def _tpu_default_block_k(k: int, max_block: int = _TPU_BLOCK_K) -> int:
    """bk = K when it fits; else the largest multiple of 128 <= max that divides K rounded up
    to 128, so K needs no more zero padding than lane alignment already forces."""
    if k <= max_block:
        return k
    k_aligned = round_up(k, _TPU_LANES)
    for bk in range(max_block - max_block % _TPU_LANES, 0, -_TPU_LANES):
        if k_aligned % bk == 0:
            return bk
    return _TPU_LANES  # unreachable: 128 divides k_aligned


def _tpu_vmem_bytes(bm, bn, bk, in_itemsize, out_itemsize, n_outs, has_bias) -> int:
    """VMEM held by one grid step: double-buffered in/out blocks plus the f32 accumulator."""
    inputs = (bm * bk + bk * bn + (bn if has_bias else 0)) * in_itemsize
    outputs = n_outs * bm * bn * out_itemsize
    return 2 * (inputs + outputs) + bm * bn * 4


def _tpu_blocks(m, k, n, dtype, out_dtype, n_outs, has_bias, block_m, block_n, block_k):
    sublanes = max(_tpu_sublanes(dtype), _tpu_sublanes(out_dtype))  # bm is a row count of both
    if block_m is None:
        bm = _tpu_balanced_block(m, _TPU_BLOCK_M, sublanes)
    else:
        bm = _tpu_forced_block("block_m", m, block_m, sublanes)
    if block_n is None:
        bn = _tpu_balanced_block(n, _TPU_BLOCK_N, _TPU_LANES)
    else:
        bn = _tpu_forced_block("block_n", n, block_n, _TPU_LANES)
    bk = _tpu_default_block_k(k) if block_k is None else _tpu_forced_block(
        "block_k", k, block_k, _TPU_LANES)
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
      activation: a name from ``jfuse.ops.activations`` or None (identity).
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
    if reason := _tpu_precision_reason(precision):
        raise NotImplementedError(reason)
    act = get_activation(activation)
    n_outs = 2 if return_preactivation else 1
    bm, bn, bk, vmem = _tpu_blocks(
        m, k, n, x.dtype, out_dtype, n_outs, b is not None, block_m, block_n, block_k
    )

    # The K axis is the one a partial edge block would corrupt (it is summed over), so pad it
    # with zeros to a whole number of blocks; M and N edges are simply dropped on write.
    k_padded = round_up(k, bk)
    if k_padded != k:
        x = jnp.pad(x, ((0, 0), (0, k_padded - k)))
        k_pad = (0, k_padded - k)
        w = jnp.pad(w, ((0, 0), k_pad) if rhs_transposed else (k_pad, (0, 0)))
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
            vmem_limit_bytes=None if vmem <= _TPU_VMEM_BUDGET else int(vmem * 1.25),
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
    reason = _shape_reason(m, k, n) or _dtype_reason("Triton", dtype, _TRITON_DTYPES)
    if reason is None and max(m * k, k * n, m * n) >= 2**31:
        return (f"operands with 2**31 or more elements (M={m}, K={k}, N={n}) would overflow "
                "the kernel's int32 offsets")
    return reason


def _triton_activation(name: str | None) -> Callable[[Array], Array] | None:
    if name == "gelu":
        return gelu_exact_without_erf  # Triton has no erf lowering
    act = get_activation(name)
    return None if act is None else act.forward


def _edge_mask(start: Array, size: int, dim: int) -> Array | None:
    """Which of indices ``start .. start+size-1`` lie inside ``dim``; None when ``size``
    divides ``dim`` (no block is ragged, so accesses need no mask)."""
    return None if dim % size == 0 else start + jnp.arange(size) < dim


def _outer_and(rows: Array | None, cols: Array | None) -> Array | None:
    """A 2-D mask from optional 1-D row and column masks (broadcast by the load/store)."""
    if rows is None and cols is None:
        return None
    if rows is None:
        return cols[None, :]
    if cols is None:
        return rows[:, None]
    return rows[:, None] & cols[None, :]


def _masked_load(ref, mask: Array | None) -> Array:
    # Masked-off elements read as 0: harmless in a dot, and never out of bounds.
    return pltriton.load(ref) if mask is None else pltriton.load(ref, mask=mask, other=0)


def _triton_linear_kernel(x_ref, w_ref, *refs, m, n, k, bm, bn, bk, activation,
                          rhs_transposed, has_bias, return_preactivation, precision):
    """One (bm, bn) output tile, over whole-array refs; a K loop of masked loads makes ragged
    M, N and K exact without padding."""
    b_ref = refs[0] if has_bias else None
    out_refs = refs[1:] if has_bias else refs
    row0, col0 = pl.program_id(0) * bm, pl.program_id(1) * bn
    rows, cols = _edge_mask(row0, bm, m), _edge_mask(col0, bn, n)

    def k_step(step, acc):
        k0 = step * bk
        ks = _edge_mask(k0, bk, k)
        x = _masked_load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], _outer_and(rows, ks))
        if rhs_transposed:
            w = _masked_load(w_ref.at[pl.ds(col0, bn), pl.ds(k0, bk)], _outer_and(cols, ks))
        else:
            w = _masked_load(w_ref.at[pl.ds(k0, bk), pl.ds(col0, bn)], _outer_and(ks, cols))
        return acc + _contract(x, w, rhs_transposed, precision)

    acc = lax.fori_loop(0, cdiv(k, bk), k_step, jnp.zeros((bm, bn), jnp.float32))
    bias = None if b_ref is None else _masked_load(b_ref.at[pl.ds(col0, bn)], cols)[None, :]
    outs = _epilogue(acc, bias, activation, out_refs[0].dtype, return_preactivation)
    out_mask = _outer_and(rows, cols)
    for ref, value in zip(out_refs, outs):
        tile = ref.at[pl.ds(row0, bm), pl.ds(col0, bn)]
        if out_mask is None:
            pltriton.store(tile, value)
        else:
            pltriton.store(tile, value, mask=out_mask)


def _triton_block(name: str, dim: int, block: int | None, max_block: int) -> int:
    if block is None:
        return max(_TRITON_MIN_BLOCK, min(max_block, next_power_of_2(dim)))
    if not is_power_of_2(block) or block < _TRITON_MIN_BLOCK:
        raise ValueError(f"{name}={block} must be a power of two >= {_TRITON_MIN_BLOCK} (Triton).")
    return block


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
    bm = _triton_block("block_m", m, block_m, _TRITON_BLOCK_M)
    bn = _triton_block("block_n", n, block_n, _TRITON_BLOCK_N)
    bk = _triton_block("block_k", k, block_k,
                       _TRITON_BLOCK_K_BY_ITEMSIZE[jnp.dtype(x.dtype).itemsize])

    kernel = functools.partial(
        _triton_linear_kernel,
        m=m, n=n, k=k, bm=bm, bn=bn, bk=bk,
        activation=_triton_activation(activation),
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
