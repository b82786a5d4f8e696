"""Pallas kernels for the fused norms: RMSNorm and LayerNorm, optionally with the residual add
fused in front (``h = x + residual``, then the norm of ``h``), in one pass over each row.

One entry point, :func:`norm` (``norm_tpu``/``norm_triton`` name its two backends), and two
kernels, one per accelerator family, with the same contract:

* :func:`norm_tpu` is a Mosaic kernel: a 1-D grid over blocks of whole rows (``(br, H)``
  blocks, ragged row counts handled by a partial edge block); ``br`` is the most rows whose
  double-buffered blocks and f32 temporaries fit a VMEM budget.
* :func:`norm_triton` is a Triton kernel: a 1-D grid over groups of rows, each program holding
  its rows whole in a power-of-two block over H, masked where H is not a power of two.

Both do all arithmetic in f32 and round once to the output dtype:

    mean = mean(h)                                  (LayerNorm only)
    var  = mean((h - mean)**2)  |  mean(h**2)       (LayerNorm | RMSNorm)
    rstd = rsqrt(var + eps)
    y    = (h - mean) * rstd [* (scale + scale_offset)] [+ bias]

``scale_offset=1.0`` gives Gemma's ``(1 + w)`` scale. With a residual, ``h`` is the sum rounded
to ``x.dtype`` (exactly what the unfused ``x + residual`` produces, and what the kernel writes
out), so the statistics describe the ``h`` a caller sees. The f32 statistics (``mean``, ``rstd``,
shape ``(R,)``) are returned for the backward pass. A row holding NaN or inf comes out exactly
as the plain ``jnp`` computation would make it (e.g. an inf in an RMSNorm row gives that lane
NaN and the others 0); other rows are untouched, and no padding lane enters any row's sums.

Absent operands and outputs (residual, scale, bias; ``h`` without a residual, ``mean`` for
RMSNorm) are ``None`` in the operands, the BlockSpecs and the kernel's refs alike, and the
arithmetic of a block (:func:`_norm_rows`) is shared: each kernel only loads and stores.
``interpret=True`` runs either kernel in Pallas' HLO interpreter, which is how their numerics
are tested on a CPU. ``*_unsupported_reason`` say, without tracing anything, whether a kernel
can serve a problem; the kernels raise ``NotImplementedError`` with that reason otherwise, so a
caller can fall back to XLA. Nothing here knows about jaxprs.
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

from jfuse.pallas._common import (
    TPU_DTYPES,
    TRITON_DTYPES,
    cdiv,
    dtype_reason,
    is_power_of_2,
    next_power_of_2,
    quiet_triton_deprecation,
    raise_if_unsupported,
    round_up,
)
from jfuse.pallas._tiling import (
    TPU_LANES,
    TPU_VMEM_BUDGET,
    edge_mask,
    masked_load,
    masked_store,
    outer_and,
    tpu_balanced_block,
    tpu_sublanes,
    tpu_vmem_limit_bytes,
)

Array = jax.Array

__all__ = [
    "norm",
    "norm_tpu",
    "norm_triton",
    "tpu_unsupported_reason",
    "triton_unsupported_reason",
]

# TPU. Every block is pipelined (double-buffered), and whole rows must fit: the row-block size is
# chosen so that one grid step stays within _tiling.TPU_VMEM_BUDGET (12 MiB), under Mosaic's
# default scoped limit on every chip (16 MiB on v4 and v5e), so the limit is never raised for
# default blocks. Past 1024 rows a block gains nothing (per-step overhead is already amortized)
# but latency.
_TPU_MAX_BLOCK_ROWS = 1024
# f32 temporaries per row element the estimate allows for: h, h - mean and y in f32.
_TPU_F32_TEMPS = 3

# Triton. A program holds its rows whole in registers; past 64Ki elements per row (the same
# ceiling as Liger-Kernel's and Unsloth's norms, MAX_FUSED_SIZE) the row no longer fits one
# program, and the kernel refuses rather than loop over H. Small rows are grouped so that one
# program has ~4096 elements to work on.
_TRITON_MAX_BLOCK_H = 65536
_TRITON_TILE_ELEMENTS = 4096
_TRITON_MAX_BLOCK_ROWS = 16


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _empty_rows_reason(rows: int, hidden: int) -> str | None:
    if min(rows, hidden) <= 0:
        return f"empty input (rows={rows}, hidden={hidden}) has nothing for a kernel to do"
    return None


def _check_operands(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    residual: Array | None,
    scale_offset: float,
) -> tuple[int, int]:
    """Validates ranks and shapes (a caller bug, so ValueError) and returns (R, H)."""
    if x.ndim != 2:
        raise ValueError(
            f"norm kernels take a 2-D x (rows, hidden); got x{x.shape}. Flatten the leading "
            "axes first: x.reshape(-1, x.shape[-1])."
        )
    rows, hidden = x.shape
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {x.shape}; got {residual.shape}.")
    for name, param in (("scale", scale), ("bias", bias)):
        if param is not None and param.shape != (hidden,):
            raise ValueError(f"{name} must have shape ({hidden},); got {param.shape}.")
    if scale is None and scale_offset != 0.0:
        raise ValueError(f"scale_offset={scale_offset} needs a scale (it multiplies by "
                         "scale + scale_offset); pass scale or drop scale_offset.")
    return rows, hidden


def _raise_if_unsupported(
    reason_fn: Callable[..., str | None],
    x: Array,
    scale: Array | None,
    bias: Array | None,
    residual: Array | None,
    out_dtype: Any,
) -> None:
    """NotImplementedError (the caller's cue to fall back to XLA) with the first reason found."""
    mixed = None
    if residual is not None and residual.dtype != x.dtype:
        mixed = (f"mixed x/residual dtypes (x {x.dtype.name}, residual "
                 f"{residual.dtype.name}) are not supported")
    others = (("scale", scale), ("bias", bias), ("out_dtype", out_dtype))
    raise_if_unsupported(reason_fn, x.shape, x.dtype, mixed,
                         ((what, getattr(d, "dtype", d)) for what, d in others))


def _norm_rows(x: Array, residual: Array | None, scale: Array | None, bias: Array | None, *,
               hidden: int, lane_mask: Array | None, subtract_mean: bool, eps: float,
               scale_offset: float) -> tuple[Array, Array | None, Array | None, Array]:
    """The norm of a block of whole rows, reduced over the last axis (``hidden`` real lanes):
    ``(y in f32, h in x.dtype or None, mean or None, rstd)``, statistics with keepdims.

    With a residual, ``h = x + residual`` is rounded to ``x.dtype`` as the unfused add rounds
    it, and normalized from there. ``lane_mask`` marks real lanes when the block is wider than
    ``hidden`` (Triton); padding lanes must hold 0 in ``x`` and ``residual``.
    """
    h = x.astype(jnp.float32)
    h_out = None
    if residual is not None:
        h_out = (h + residual.astype(jnp.float32)).astype(x.dtype)
        h = h_out.astype(jnp.float32)
    if subtract_mean:
        mean = jnp.sum(h, axis=-1, keepdims=True) / hidden
        centered = h - mean
        if lane_mask is not None:  # padding lanes hold -mean now; keep them out of the variance
            centered = jnp.where(lane_mask, centered, 0.0)
    else:
        mean, centered = None, h
    var = jnp.sum(centered * centered, axis=-1, keepdims=True) / hidden
    rstd = lax.rsqrt(var + eps)
    y = centered * rstd
    if scale is not None:
        y = y * (scale.astype(jnp.float32) + scale_offset)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y, h_out, mean, rstd


def _out_shapes(rows, hidden, dtype, out_dtype, *, has_residual, subtract_mean, stat_shape):
    """``(y, h | None, mean | None, rstd)`` as ShapeDtypeStructs; None for an output not made."""
    row_shape = lambda d: jax.ShapeDtypeStruct((rows, hidden), d)
    stat = jax.ShapeDtypeStruct(stat_shape, jnp.float32)
    return (row_shape(out_dtype), row_shape(dtype) if has_residual else None,
            stat if subtract_mean else None, stat)


def _kernel_name(subtract_mean: bool, has_residual: bool) -> str:
    base = "layer_norm" if subtract_mean else "rms_norm"
    return f"jfuse_{'add_' if has_residual else ''}{base}"


# ----------------------------------------------------------------------------------------------
# TPU (Mosaic)
# ----------------------------------------------------------------------------------------------


def _tpu_vmem_bytes(
    block_rows: int,
    hidden: int,
    dtype: Any,
    out_dtype: Any = None,
    *,
    has_residual: bool = True,
    n_params: int = 2,
    n_stats: int = 2,
) -> int:
    """VMEM one grid step of the Mosaic kernel holds, by its layout in (sublane, 128-lane) tiles.

    Every block is double-buffered by the pipeline: ``x`` (and ``residual``) in, ``y`` (and
    ``h``) out, each ``(block_rows, H)`` with H padded to 128 lanes; each ``(block_rows, 1)``
    f32 statistic pads to 128 lanes; each ``(1, H)`` scale/bias pads to a full sublane tile. On
    top, ``_TPU_F32_TEMPS`` f32 copies of the block for the in-kernel temporaries. The defaults
    are the worst case (residual, scale, bias, LayerNorm).
    """
    out_dtype = dtype if out_dtype is None else out_dtype
    in_size, out_size = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
    lanes = round_up(hidden, TPU_LANES)
    row_blocks = lanes * (in_size * (2 if has_residual else 1)          # x, residual
                          + out_size + (in_size if has_residual else 0))  # y, h
    stats = n_stats * TPU_LANES * 4
    per_row = 2 * (row_blocks + stats) + _TPU_F32_TEMPS * lanes * 4
    params = n_params * 2 * 32 * lanes  # (8 x 4 B or 16 x 2 B) per lane, double-buffered
    return block_rows * per_row + params


def _tpu_too_wide_reason(rows: int, hidden: int, dtype: Any, out_dtype: Any = None,
                         **layout: Any) -> str | None:
    """Whether the smallest legal row block is over the VMEM budget (default ``layout``: the
    widest case, with residual, scale, bias and both statistics)."""
    out_dtype = dtype if out_dtype is None else out_dtype
    min_rows = min(rows, max(tpu_sublanes(dtype), tpu_sublanes(out_dtype)))
    need = _tpu_vmem_bytes(min_rows, hidden, dtype, out_dtype, **layout)
    if need > TPU_VMEM_BUDGET:
        return (f"rows of {hidden} {jnp.dtype(dtype).name} elements are too wide for the TPU "
                f"kernel: a {min_rows}-row block needs ~{need / 2**20:.1f} MiB of VMEM "
                f"(budget {TPU_VMEM_BUDGET // 2**20} MiB)")
    return None


def tpu_unsupported_reason(rows: int, hidden: int, dtype: Any) -> str | None:
    """Why :func:`norm_tpu` cannot serve ``rows`` rows of width ``hidden``, or None if it can,
    with or without residual, scale and bias, for ``out_dtype=dtype``. (A wider ``out_dtype``
    on rows near the limit, about 26k f32 or 21k bf16 elements, can still be refused.)"""
    return (_empty_rows_reason(rows, hidden) or dtype_reason("TPU", dtype, TPU_DTYPES)
            or _tpu_too_wide_reason(rows, hidden, dtype))


def _tpu_block_rows(
    rows: int,
    hidden: int,
    dtype: Any,
    out_dtype: Any = None,
    *,
    has_residual: bool,
    n_params: int,
    n_stats: int,
    block_rows: int | None = None,
) -> int:
    """The row-block size of the Mosaic kernel: ``block_rows`` if given (checked, clipped to
    ``rows``), else the most rows (a multiple of 8, or 16 for 16-bit data; at most 1024) whose
    :func:`_tpu_vmem_bytes` fits the budget, balanced so the edge block is not mostly empty."""
    out_dtype = dtype if out_dtype is None else out_dtype
    sublanes = max(tpu_sublanes(dtype), tpu_sublanes(out_dtype))
    if block_rows is not None:
        if block_rows >= rows:
            return rows
        if block_rows <= 0 or block_rows % sublanes:
            raise ValueError(f"block_rows={block_rows} must be a multiple of {sublanes} or "
                             f"cover all {rows} rows.")
        return block_rows
    estimate = functools.partial(_tpu_vmem_bytes, hidden=hidden, dtype=dtype,
                                 out_dtype=out_dtype, has_residual=has_residual,
                                 n_params=n_params, n_stats=n_stats)
    fixed = estimate(0)
    per_row = estimate(1) - fixed
    fit = (TPU_VMEM_BUDGET - fixed) // per_row
    max_rows = max(sublanes, min(_TPU_MAX_BLOCK_ROWS, fit - fit % sublanes))
    return tpu_balanced_block(rows, max_rows, sublanes)


def _tpu_kernel(x_ref, res_ref, scale_ref, bias_ref, y_ref, h_ref, mean_ref, rstd_ref, *,
                hidden, subtract_mean, eps, scale_offset):
    """One (br, H) block of whole rows; each row's statistics are its own, so the garbage rows
    of a ragged edge block only produce garbage that Pallas never writes back. An absent
    operand or output is a None ref; scale and bias are (1, H) blocks that broadcast over rows."""
    load = lambda ref: None if ref is None else ref[...]
    outs = _norm_rows(load(x_ref), load(res_ref), load(scale_ref), load(bias_ref),
                      hidden=hidden, lane_mask=None, subtract_mean=subtract_mean, eps=eps,
                      scale_offset=scale_offset)
    for ref, value in zip((y_ref, h_ref, mean_ref, rstd_ref), outs):
        if ref is not None:
            ref[...] = value.astype(ref.dtype)


def _tpu_call(x, residual, scale, bias, *, rows, hidden, out_dtype, subtract_mean, eps,
              scale_offset, interpret, block_rows, name):
    layout = dict(has_residual=residual is not None,
                  n_params=(scale is not None) + (bias is not None),
                  n_stats=2 if subtract_mean else 1)
    if block_rows is None and (reason := _tpu_too_wide_reason(rows, hidden, x.dtype, out_dtype,
                                                              **layout)):
        raise NotImplementedError(reason)
    br = _tpu_block_rows(rows, hidden, x.dtype, out_dtype, block_rows=block_rows, **layout)
    vmem = _tpu_vmem_bytes(br, hidden, x.dtype, out_dtype, **layout)

    row_block = pl.BlockSpec((br, hidden), lambda i: (i, 0))  # H whole: always a legal block
    whole_row = pl.BlockSpec((1, hidden), lambda i: (0, 0))
    # Statistics as (R, 1) columns: a (br, 1) block is legal (its last dim is the array's), and
    # the keepdims reductions already have that shape, so no in-kernel relayout is needed.
    stat_block = pl.BlockSpec((br, 1), lambda i: (i, 0))
    # An absent operand or output is None in the operands, the shapes and the specs alike.
    given = lambda a, spec: None if a is None else spec
    as_row = lambda p: None if p is None else p.reshape(1, hidden)
    out_shape = _out_shapes(rows, hidden, x.dtype, out_dtype, has_residual=residual is not None,
                            subtract_mean=subtract_mean, stat_shape=(rows, 1))

    kernel = functools.partial(_tpu_kernel, hidden=hidden, subtract_mean=subtract_mean, eps=eps,
                               scale_offset=scale_offset)
    y, h, mean, rstd = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(cdiv(rows, br),),
        in_specs=(row_block, given(residual, row_block), given(scale, whole_row),
                  given(bias, whole_row)),
        out_specs=tuple(None if s is None else spec
                        for s, spec in zip(out_shape, (row_block, row_block) + (stat_block,) * 2)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL,),
            vmem_limit_bytes=tpu_vmem_limit_bytes(vmem),
        ),
        interpret=interpret,
        name=name,
    )(x, residual, as_row(scale), as_row(bias))
    return y, h, None if mean is None else mean.reshape(rows), rstd.reshape(rows)


# ----------------------------------------------------------------------------------------------
# GPU (Triton)
# ----------------------------------------------------------------------------------------------


def triton_unsupported_reason(rows: int, hidden: int, dtype: Any) -> str | None:
    """Why :func:`norm_triton` cannot serve ``rows`` rows of width ``hidden``, or None."""
    reason = _empty_rows_reason(rows, hidden) or dtype_reason("Triton", dtype, TRITON_DTYPES)
    if reason is not None:
        return reason
    if next_power_of_2(hidden) > _TRITON_MAX_BLOCK_H:
        return (f"rows of {hidden} elements are too wide for the Triton kernel, which holds a "
                f"row in one program (at most {_TRITON_MAX_BLOCK_H})")
    if rows * next_power_of_2(hidden) >= 2**31:
        return (f"{rows} x {hidden} elements (padded to a power of two per row) would overflow "
                "the kernel's int32 offsets")
    return None


def _triton_block_rows(rows: int, block_h: int, block_rows: int | None) -> int:
    if block_rows is not None:
        if not is_power_of_2(block_rows):
            raise ValueError(f"block_rows={block_rows} must be a power of two (Triton).")
        return block_rows
    fit = max(1, _TRITON_TILE_ELEMENTS // block_h)
    return min(fit, _TRITON_MAX_BLOCK_ROWS, next_power_of_2(rows))


def _triton_num_warps(tile_elements: int) -> int:
    # Liger-Kernel's calculate_settings: about 16-64 elements per thread.
    if tile_elements >= 32768:
        return 32
    if tile_elements >= 8192:
        return 16
    if tile_elements >= 2048:
        return 8
    return 4


def _triton_kernel(x_ref, res_ref, scale_ref, bias_ref, y_ref, h_ref, mean_ref, rstd_ref, *,
                   rows, hidden, block_rows, block_h, subtract_mean, eps, scale_offset):
    """``block_rows`` whole rows over whole-array refs, each row one ``block_h``-lane vector
    (a power of two >= H, masked past H). An absent operand or output is a None ref."""
    row0 = pl.program_id(0) * block_rows
    row_mask = edge_mask(row0, block_rows, rows)
    lane_mask = edge_mask(0, block_h, hidden)
    tile_mask = outer_and(row_mask, lane_mask)

    # Lanes are indexed by an index vector, not a slice: a static slice past H is rejected at
    # trace time, and a masked gather is how Pallas Triton spells a ragged block.
    lanes = jnp.arange(block_h)
    row_ids = row0 + jnp.arange(block_rows)

    def tile(ref):
        return ref.at[row_ids[:, None], lanes[None, :]]

    def load_tile(ref):
        return None if ref is None else masked_load(tile(ref), tile_mask)

    def load_param(ref):
        return None if ref is None else masked_load(ref.at[lanes], lane_mask)[None, :]

    y, h, mean, rstd = _norm_rows(
        load_tile(x_ref), load_tile(res_ref), load_param(scale_ref), load_param(bias_ref),
        hidden=hidden, lane_mask=None if lane_mask is None else lane_mask[None, :],
        subtract_mean=subtract_mean, eps=eps, scale_offset=scale_offset,
    )
    masked_store(tile(y_ref), y.astype(y_ref.dtype), tile_mask)
    if h_ref is not None:
        masked_store(tile(h_ref), h, tile_mask)
    for ref, stat in ((mean_ref, mean), (rstd_ref, rstd)):
        if ref is not None:
            masked_store(ref.at[pl.ds(row0, block_rows)], stat[:, 0], row_mask)


def _triton_call(x, residual, scale, bias, *, rows, hidden, out_dtype, subtract_mean, eps,
                 scale_offset, interpret, block_rows, name):
    block_h = next_power_of_2(hidden)
    br = _triton_block_rows(rows, block_h, block_rows)
    kernel = functools.partial(
        _triton_kernel, rows=rows, hidden=hidden, block_rows=br, block_h=block_h,
        subtract_mean=subtract_mean, eps=eps, scale_offset=scale_offset,
    )
    # No BlockSpecs: every program sees whole arrays and slices them itself, because BlockSpec
    # blocks are loaded unmasked by the Triton lowering (the lanes past H would be read).
    with quiet_triton_deprecation():
        return pl.pallas_call(
            kernel,
            out_shape=_out_shapes(rows, hidden, x.dtype, out_dtype,
                                  has_residual=residual is not None,
                                  subtract_mean=subtract_mean, stat_shape=(rows,)),
            grid=(cdiv(rows, br),),
            compiler_params=pltriton.CompilerParams(num_warps=_triton_num_warps(br * block_h)),
            interpret=interpret,
            name=name,
        )(x, residual, scale, bias)


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------

_BACKENDS = {
    "tpu": (tpu_unsupported_reason, _tpu_call),
    "triton": (triton_unsupported_reason, _triton_call),
}


def norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    residual: Array | None = None,
    *,
    backend: str,
    subtract_mean: bool,
    eps: float,
    scale_offset: float = 0.0,
    out_dtype: Any = None,
    interpret: bool = False,
    block_rows: int | None = None,
) -> tuple[Array, ...]:
    """RMSNorm (``subtract_mean=False``) or LayerNorm of the rows of ``x`` (or of
    ``x + residual``), as one Pallas kernel for ``backend`` (``"tpu"`` or ``"triton"``).

    Args:
      x: ``(R, H)``, normalized over H.
      scale, bias: ``(H,)`` or None; any supported float dtype (math is f32).
      residual: ``(R, H)`` in ``x.dtype``, or None. When given, the kernel normalizes
        ``h = x + residual`` (rounded to ``x.dtype``) and also returns ``h``.
      backend: ``"tpu"`` (Mosaic) or ``"triton"`` (GPU).
      subtract_mean: False for RMSNorm, True for LayerNorm.
      eps: added to the variance under the rsqrt.
      scale_offset: the norm multiplies by ``scale + scale_offset`` (1.0 for Gemma); needs a
        scale.
      out_dtype: dtype of ``y``; default ``x.dtype``.
      interpret: run in Pallas' HLO interpreter (any backend, e.g. CPU for tests).
      block_rows: rows per grid step (TPU) or program (Triton). TPU: None picks the most that
        fit the VMEM budget (see :func:`_tpu_block_rows`); a given one must be a multiple of 8
        (16 for 16-bit x or y) or cover all rows, and blocks over the budget raise Mosaic's
        scoped VMEM limit. Triton: a power of two; None groups rows until a program has ~4096
        elements (at most 16 rows). A Triton row is one power-of-two block (``next_pow2(H)``
        lanes, masked past H), so H is limited to 65536 there.

    Returns:
      ``(y, rstd)`` for RMSNorm, ``(y, mean, rstd)`` for LayerNorm; with a residual,
      ``(y, h, rstd)`` / ``(y, h, mean, rstd)``. Statistics are f32 of shape ``(R,)``.

    Raises:
      NotImplementedError: when :func:`tpu_unsupported_reason` /
        :func:`triton_unsupported_reason` (or a mixed x/residual dtype) rules the problem out,
        so the caller can fall back to XLA.
      ValueError: for inconsistent shapes, an unknown backend or an illegal block size.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {sorted(_BACKENDS)}.")
    unsupported_reason, call = _BACKENDS[backend]
    rows, hidden = _check_operands(x, scale, bias, residual, scale_offset)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    _raise_if_unsupported(unsupported_reason, x, scale, bias, residual, out_dtype)
    outs = call(x, residual, scale, bias, rows=rows, hidden=hidden, out_dtype=out_dtype,
                subtract_mean=subtract_mean, eps=float(eps), scale_offset=float(scale_offset),
                interpret=interpret, block_rows=block_rows,
                name=_kernel_name(subtract_mean, residual is not None))
    return tuple(a for a in outs if a is not None)


def norm_tpu(x: Array, scale: Array | None = None, bias: Array | None = None,
             residual: Array | None = None, **kwargs: Any) -> tuple[Array, ...]:
    """The norm as one Mosaic (TPU) kernel: :func:`norm` with ``backend="tpu"``."""
    return norm(x, scale, bias, residual, backend="tpu", **kwargs)


def norm_triton(x: Array, scale: Array | None = None, bias: Array | None = None,
                residual: Array | None = None, **kwargs: Any) -> tuple[Array, ...]:
    """The norm as one Triton (GPU) kernel: :func:`norm` with ``backend="triton"``."""
    return norm(x, scale, bias, residual, backend="triton", **kwargs)
