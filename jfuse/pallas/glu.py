"""Pallas kernels for the fused ``glu`` op: ``act(x @ Wg + bg) * (x @ Wu + bu)`` in one pass.

A gated linear unit (SwiGLU with ``silu``, GeGLU with ``gelu``/``gelu_tanh``, ReGLU with
``relu``, the original GLU with ``sigmoid``) is two matmuls that share their left operand and
meet in an elementwise product. XLA runs it as two GEMMs (or one against the concatenated
weights) and writes and re-reads the ``(M, 2N)`` intermediate; cuBLASLt cannot fuse the product.
These kernels make one pass over K that loads each ``x`` tile once, feeds it to both weight
tiles and keeps two f32 accumulators (gate and up); the epilogue adds the biases, applies the
gate activation and multiplies, all in f32, and casts once to ``out_dtype``.

* :func:`glu_tpu` is a Mosaic kernel: a ``(M/bm, N/bn, K/bk)`` grid whose K axis accumulates
  into two f32 VMEM scratches; the last K step runs the epilogue and writes.
* :func:`glu_triton` is a Triton kernel: a ``(M/bm, N/bn)`` grid, each program looping over K
  with masked loads of one ``x`` tile and two weight tiles, so ragged M, N and K need no padding.

With ``return_preactivations=True`` both also write ``gate_pre = x @ Wg + bg`` and
``up_pre = x @ Wu + bu`` from the same epilogue (the autodiff rule of ``jfuse.ops.glu`` needs
them). ``interpret=True`` runs either kernel in Pallas' HLO interpreter, which is how their
numerics are tested on a CPU.

``*_unsupported_reason`` say, without tracing anything, whether a kernel *can* serve a problem
(the kernels raise ``NotImplementedError`` with that reason otherwise, so a caller can fall back
to XLA). :func:`profitability_reason` says whether it *should*: the one place that encodes where
the fused kernel is expected to lose to XLA, so a measurement on hardware changes one table.
The kernels never consult it themselves. Nothing here knows about jaxprs.
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
    "glu_tpu",
    "glu_triton",
    "tpu_unsupported_reason",
    "triton_unsupported_reason",
    "profitability_reason",
    "GPU_MAX_PROFITABLE_K",
]

# TPU defaults. Same bm and bk as the linear kernel (512: block size is everything on TPU), but
# bn halved to 256 because every K step holds two weight tiles and two accumulators (tokamax
# halves block_n for the same reason). The two weight tiles form a 512-wide right-hand side, so
# each x tile does as many flops per byte loaded as in the linear kernel's 512 x 512 tile.
# Worst case, f32 in and out with all three outputs and both biases: 2 x (x 1 MiB + weights
# 1 MiB + outputs 1.5 MiB) + accumulators 1 MiB ~= 8 MiB (4.5 MiB in bf16), inside the 12 MiB
# _tiling.TPU_VMEM_BUDGET, so the defaults never raise Mosaic's scoped VMEM limit.
_TPU_BLOCK_M = 512
_TPU_BLOCK_N = 256
_TPU_BLOCK_K = 512

# Triton defaults: a 128 x 64 output tile, so the two f32 accumulators hold as many registers as
# the linear kernel's one 128 x 128 tile; the K slice as in the linear kernel (32 f32, 64
# 16-bit: _tiling.TRITON_BLOCK_K_BY_ITEMSIZE), so a pipeline stage (one x tile + two weight
# tiles) is 32 KiB and 3 stages fit in 96 KiB of shared memory. tokamax's Pallas-Triton GLU
# uses the same shape budget.
_TRITON_BLOCK_M = 128
_TRITON_BLOCK_N = 64


# ----------------------------------------------------------------------------------------------
# When fusing pays: the one place to change after measuring on hardware
# ----------------------------------------------------------------------------------------------

# Largest K (per branch, the contraction dim) at which the fused *Triton* GLU is expected to beat
# XLA's two cuBLAS GEMMs plus the elementwise product, by operand dtype. The fused kernel saves
# one write and one read of the (M, 2N) intermediate, a saving that shrinks like 1/K against the
# GEMM, while a Pallas-Triton GEMM is slower than cuBLAS at the same K. tokamax's H100 autotuning
# caches (forward, XLA vs Pallas-Triton; see reference/pallas_tokamax_xla.md §1.7):
#   f32  K=128 -> N=256: 2.30x;  K=384 -> 768: 1.08x;  K=768 -> 1536: 0.77x (Triton slower).
#   bf16 K=64: 2.1-2.3x;  K=128: 1.74-1.86x;  K=384 -> 1536: 1.13x (1.02-1.26).
# A crude two-parameter model, speedup = e * (1 + c/K) (e: the Triton GEMM's efficiency against
# cuBLAS; c/K: the saved traffic relative to the GEMM), fitted to the f32 K=128 and K=384 points
# predicts the measured K=768 point (0.78x vs 0.77x) and puts the f32 break-even near K=440.
# Fitted to the bf16 K=128 and K=384 points it puts the bf16 break-even near K=600-670 and
# predicts 0.80-0.88x at K=2048-4096. (The points mix different M and N; treat it as a trend.)
# Hence, conservatively:
#   f32: fuse up to K=384, the largest K measured to win (K=512 is predicted ~0.93x).
#   bf16/f16: fuse up to K=512, past the largest measured win (384) and short of the predicted
#     break-even (~1.04-1.05x predicted at 512). Nothing above K=384 was measured in 16-bit; an
#     LLM MLP (K >= 2048) is predicted to lose 10-20%, so it stays on XLA until hardware says
#     otherwise. f16 has no data and follows bf16 (same tensor-core path).
# TPU has no entry: tokamax ships no TPU GLU kernel and there are no TPU GLU timings at all, so
# there is nothing to base a rule on; profitability_reason always allows the TPU kernel until a
# measurement says where it loses.
GPU_MAX_PROFITABLE_K: dict[str, int] = {"float32": 384, "bfloat16": 512, "float16": 512}

_GPU_EVIDENCE = {
    "float32": "tokamax measured 0.77x for f32 768→1536 already",
    "bfloat16": "tokamax's bf16 gain fell from ~2x at K=64 to 1.13x at K=384, and its trend "
    "crosses 1x near K=600-670",
    "float16": "no f16 data; it follows bf16, whose gain fell to 1.13x at K=384 and whose trend "
    "crosses 1x near K=600-670",
}
_BACKENDS = {"tpu": "tpu", "triton": "gpu", "gpu": "gpu", "cuda": "gpu"}


def profitability_reason(backend: str, m: int, k: int, n: int, dtype: Any) -> str | None:
    """Why fusing an ``(M, K) -> 2 x (K, N)`` GLU on ``backend`` is expected to be *slower* than
    XLA, or None when the kernel is expected to win (or there is no data to say otherwise).

    ``backend`` is ``"tpu"`` or ``"triton"`` (``"gpu"``/``"cuda"`` are accepted too). Pure
    Python, nothing is traced. Whether a kernel can run at all is a separate question, answered
    by :func:`tpu_unsupported_reason` / :func:`triton_unsupported_reason`; this one only reports
    thresholds from :data:`GPU_MAX_PROFITABLE_K` (see the comment above it for the evidence).
    M and N are accepted for a future rule; the current one depends on K and dtype only.
    """
    del m, n  # the measured trend is in K; see GPU_MAX_PROFITABLE_K
    kind = _BACKENDS.get(str(backend).lower())
    if kind is None:
        raise ValueError(f"backend={backend!r}; expected one of {sorted(_BACKENDS)}.")
    if kind == "tpu":
        return None  # no TPU measurements exist (see GPU_MAX_PROFITABLE_K's comment)
    name = jnp.dtype(dtype).name
    limit = GPU_MAX_PROFITABLE_K.get(name)
    if limit is None or k <= limit:
        return None
    return (
        f"K={k} > {limit}: on GPU the fused Triton GLU is expected to lose to XLA's two cuBLAS "
        f"GEMMs at this K in {name} ({_GPU_EVIDENCE[name]})"
    )


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _check_operands(
    x: Array,
    w_gate: Array,
    w_up: Array,
    b_gate: Array | None,
    b_up: Array | None,
    weights_transposed: bool,
) -> tuple[int, int, int]:
    """Validates ranks and shapes (a caller bug, so ValueError) and returns (M, K, N)."""
    if x.ndim != 2 or w_gate.ndim != 2 or w_up.ndim != 2:
        raise ValueError(
            f"glu kernels take 2-D x, w_gate and w_up; got x{x.shape}, w_gate{w_gate.shape} "
            f"and w_up{w_up.shape}."
        )
    if w_gate.shape != w_up.shape:
        raise ValueError(
            f"w_gate{w_gate.shape} and w_up{w_up.shape} must have the same shape."
        )
    m, k = x.shape
    n, k_w = w_gate.shape if weights_transposed else w_gate.shape[::-1]
    if k_w != k:
        layout = "(N, K)" if weights_transposed else "(K, N)"
        raise ValueError(f"x{x.shape} and the weights {w_gate.shape} {layout} disagree on K.")
    for name, b in (("b_gate", b_gate), ("b_up", b_up)):
        if b is not None and b.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},); got {b.shape}.")
    return m, k, n


def _raise_if_unsupported(
    reason_fn: Callable[..., str | None],
    x: Array,
    w_gate: Array,
    w_up: Array,
    b_gate: Array | None,
    b_up: Array | None,
    out_dtype: Any,
    mkn: tuple[int, int, int],
) -> None:
    """NotImplementedError (the caller's cue to fall back to XLA) with the first reason found."""
    mixed = None
    if not w_gate.dtype == w_up.dtype == x.dtype:
        mixed = (
            f"mixed operand dtypes (x {x.dtype.name}, w_gate {w_gate.dtype.name}, "
            f"w_up {w_up.dtype.name}) are not supported"
        )
    others = (
        ("b_gate", None if b_gate is None else b_gate.dtype),
        ("b_up", None if b_up is None else b_up.dtype),
        ("out_dtype", out_dtype),
    )
    raise_if_unsupported(reason_fn, mkn, x.dtype, mixed, others)


def _epilogue(
    acc_gate: Array,
    acc_up: Array,
    b_gate: Array | None,
    b_up: Array | None,
    activation: Callable[[Array], Array] | None,
    out_dtype: Any,
    return_preactivations: bool,
) -> tuple[Array, ...]:
    """f32 biases, gate activation and product on two accumulator tiles; one cast per output."""
    gate = acc_gate if b_gate is None else acc_gate + b_gate.astype(jnp.float32)
    up = acc_up if b_up is None else acc_up + b_up.astype(jnp.float32)
    y = (gate if activation is None else activation(gate)) * up
    if return_preactivations:
        return y.astype(out_dtype), gate.astype(out_dtype), up.astype(out_dtype)
    return (y.astype(out_dtype),)


def _out_shapes(m: int, n: int, out_dtype: Any, return_preactivations: bool):
    shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    return (shape,) * (3 if return_preactivations else 1)


def _finish(outs: tuple[Array, ...], return_preactivations: bool):
    return tuple(outs) if return_preactivations else outs[0]


def _kernel_name(activation: str | None) -> str:
    return f"jfuse_glu_{activation or 'bilinear'}"


# ----------------------------------------------------------------------------------------------
# TPU (Mosaic)
# ----------------------------------------------------------------------------------------------


def tpu_unsupported_reason(m: int, k: int, n: int, dtype: Any) -> str | None:
    """Why :func:`glu_tpu` cannot serve ``x (M, K)`` against two ``(K, N)`` weights, or None."""
    return empty_matmul_reason(m, k, n) or dtype_reason("TPU", dtype, TPU_DTYPES)


def _tpu_glu_kernel(x_ref, wg_ref, wu_ref, *refs, activation, weights_transposed,
                    has_gate_bias, has_up_bias, return_preactivations, precision):
    """One (bm, bn) output tile; grid axis 2 walks K, the x tile feeding both weight tiles and
    two f32 VMEM accumulators."""
    n_bias = int(has_gate_bias) + int(has_up_bias)
    bias_refs = list(refs[:n_bias])
    bg_ref = bias_refs.pop(0) if has_gate_bias else None
    bu_ref = bias_refs.pop(0) if has_up_bias else None
    *out_refs, acc_gate_ref, acc_up_ref = refs[n_bias:]
    k_step = pl.program_id(2)

    @pl.when(k_step == 0)
    def _zero():
        acc_gate_ref[...] = jnp.zeros_like(acc_gate_ref)
        acc_up_ref[...] = jnp.zeros_like(acc_up_ref)

    x = x_ref[...]
    acc_gate_ref[...] += contract(x, wg_ref[...], weights_transposed, precision)
    acc_up_ref[...] += contract(x, wu_ref[...], weights_transposed, precision)

    @pl.when(k_step == pl.num_programs(2) - 1)
    def _write():
        outs = _epilogue(
            acc_gate_ref[...],
            acc_up_ref[...],
            None if bg_ref is None else bg_ref[...],  # (1, bn) broadcasts over rows
            None if bu_ref is None else bu_ref[...],
            activation,
            out_refs[0].dtype,
            return_preactivations,
        )
        for ref, value in zip(out_refs, outs):
            ref[...] = value


def _tpu_vmem_bytes(bm, bn, bk, in_itemsize, out_itemsize, n_outs, n_biases) -> int:
    """VMEM held by one grid step: double-buffered x, two weight, bias and output blocks, plus
    the two f32 accumulators."""
    inputs = (bm * bk + 2 * bk * bn + n_biases * bn) * in_itemsize
    outputs = n_outs * bm * bn * out_itemsize
    return 2 * (inputs + outputs) + 2 * bm * bn * 4


def _tpu_blocks(m, k, n, dtype, out_dtype, n_outs, n_biases, block_m, block_n, block_k):
    bm, bn, bk = tpu_matmul_blocks(m, k, n, dtype, out_dtype, block_m, block_n, block_k,
                                   max_m=_TPU_BLOCK_M, max_n=_TPU_BLOCK_N, max_k=_TPU_BLOCK_K)
    in_size, out_size = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
    vmem = _tpu_vmem_bytes(bm, bn, bk, in_size, out_size, n_outs, n_biases)
    return bm, bn, bk, vmem


def glu_tpu(
    x: Array,
    w_gate: Array,
    w_up: Array,
    b_gate: Array | None = None,
    b_up: Array | None = None,
    *,
    activation: str | None,
    weights_transposed: bool = False,
    out_dtype: Any = None,
    return_preactivations: bool = False,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    precision: Any = None,
) -> Array | tuple[Array, Array, Array]:
    """``act(x @ w_gate + b_gate) * (x @ w_up + b_up)`` as one Mosaic (TPU) kernel.

    Args:
      x: ``(M, K)``.
      w_gate, w_up: ``(K, N)`` each, or ``(N, K)`` each with ``weights_transposed=True``
        (torch layout; contracted in place, never transposed in memory).
      b_gate, b_up: ``(N,)`` or None, independently.
      activation: the gate activation, a name from ``jfuse.core.activations`` (``"silu"`` for
        SwiGLU, ``"gelu"``/``"gelu_tanh"`` for GeGLU, ``"relu"`` for ReGLU, ``"sigmoid"`` for
        GLU), or None for the bilinear variant ``(x @ w_gate) * (x @ w_up)``.
      out_dtype: dtype of the outputs; default ``x.dtype``.
      return_preactivations: also return ``gate_pre = x @ w_gate + b_gate`` and
        ``up_pre = x @ w_up + b_up`` (in ``out_dtype``).
      interpret: run in Pallas' HLO interpreter (any backend, e.g. CPU for tests).
      block_m, block_n, block_k: tile sizes; None picks defaults (512, 256, 512, shrunk to the
        array, balanced across blocks; K in whole blocks, zero-padded only to lane alignment).
        Each must be a multiple of the TPU tile (8 or 16 rows for 32/16-bit M, 128 for N and
        K) or cover its whole dimension.
      precision: ``lax.dot_general`` precision for both in-kernel dots: None/DEFAULT (Mosaic
        feeds f32 operands to the MXU as bf16) or HIGHEST (full f32); others raise
        NotImplementedError. Accumulation is f32 regardless.

    Returns:
      ``y`` of shape ``(M, N)``, or ``(y, gate_pre, up_pre)`` with
      ``return_preactivations=True``.

    Raises:
      NotImplementedError: when :func:`tpu_unsupported_reason` (or mixed x/weight dtypes, or
        the precision) rules the problem out, so the caller can fall back to XLA.
      ValueError: for inconsistent shapes, an unknown activation or an illegal block size.
    """
    m, k, n = _check_operands(x, w_gate, w_up, b_gate, b_up, weights_transposed)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    _raise_if_unsupported(tpu_unsupported_reason, x, w_gate, w_up, b_gate, b_up, out_dtype,
                          (m, k, n))
    if reason := tpu_precision_reason(precision):
        raise NotImplementedError(reason)
    act = get_activation(activation)
    n_outs = 3 if return_preactivations else 1
    biases = [b for b in (b_gate, b_up) if b is not None]
    bm, bn, bk, vmem = _tpu_blocks(
        m, k, n, x.dtype, out_dtype, n_outs, len(biases), block_m, block_n, block_k
    )

    # K is summed over, so a partial edge block there would add garbage: pad it with zeros to a
    # whole number of blocks. M and N edge blocks only hold rows/columns that are never written.
    x, (w_gate, w_up), k_padded = tpu_pad_k(x, (w_gate, w_up), bk, weights_transposed)
    grid = (cdiv(m, bm), cdiv(n, bn), k_padded // bk)

    if weights_transposed:
        w_spec = pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk))
    else:
        w_spec = pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))
    bias_spec = pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)), w_spec, w_spec]
    in_specs += [bias_spec] * len(biases)
    operands = [x, w_gate, w_up] + [b.reshape(1, n) for b in biases]
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))

    kernel = functools.partial(
        _tpu_glu_kernel,
        activation=None if act is None else act.forward,
        weights_transposed=weights_transposed,
        has_gate_bias=b_gate is not None,
        has_up_bias=b_up is not None,
        return_preactivations=return_preactivations,
        precision=precision,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=_out_shapes(m, n, out_dtype, return_preactivations),
        grid=grid,
        in_specs=in_specs,
        out_specs=(out_spec,) * n_outs,
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32), pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
            vmem_limit_bytes=tpu_vmem_limit_bytes(vmem),
        ),
        interpret=interpret,
        name=_kernel_name(activation),
    )(*operands)
    return _finish(outs, return_preactivations)


# ----------------------------------------------------------------------------------------------
# GPU (Triton)
# ----------------------------------------------------------------------------------------------


def triton_unsupported_reason(m: int, k: int, n: int, dtype: Any) -> str | None:
    """Why :func:`glu_triton` cannot serve ``x (M, K)`` against two ``(K, N)`` weights, or None."""
    return (empty_matmul_reason(m, k, n) or dtype_reason("Triton", dtype, TRITON_DTYPES)
            or int32_offsets_reason(m, k, n))


def _triton_glu_kernel(x_ref, wg_ref, wu_ref, *refs, m, n, k, bm, bn, bk, activation,
                       weights_transposed, has_gate_bias, has_up_bias, return_preactivations,
                       precision):
    """One (bm, bn) output tile, over whole-array refs; each K step loads one x tile and the two
    weight tiles with masks, so ragged M, N and K are exact without padding."""
    n_bias = int(has_gate_bias) + int(has_up_bias)
    bias_refs = list(refs[:n_bias])
    bg_ref = bias_refs.pop(0) if has_gate_bias else None
    bu_ref = bias_refs.pop(0) if has_up_bias else None
    out_refs = refs[n_bias:]
    row0, col0 = pl.program_id(0) * bm, pl.program_id(1) * bn
    rows, cols = edge_mask(row0, bm, m), edge_mask(col0, bn, n)

    def load_weight(ref, k0, ks):
        if weights_transposed:
            return masked_load(ref.at[pl.ds(col0, bn), pl.ds(k0, bk)], outer_and(cols, ks))
        return masked_load(ref.at[pl.ds(k0, bk), pl.ds(col0, bn)], outer_and(ks, cols))

    def k_step(step, accs):
        acc_gate, acc_up = accs
        k0 = step * bk
        ks = edge_mask(k0, bk, k)
        x = masked_load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], outer_and(rows, ks))
        acc_gate += contract(x, load_weight(wg_ref, k0, ks), weights_transposed, precision)
        acc_up += contract(x, load_weight(wu_ref, k0, ks), weights_transposed, precision)
        return acc_gate, acc_up

    zeros = jnp.zeros((bm, bn), jnp.float32)
    acc_gate, acc_up = lax.fori_loop(0, cdiv(k, bk), k_step, (zeros, zeros))

    def load_bias(ref):
        return None if ref is None else masked_load(ref.at[pl.ds(col0, bn)], cols)[None, :]

    outs = _epilogue(acc_gate, acc_up, load_bias(bg_ref), load_bias(bu_ref), activation,
                     out_refs[0].dtype, return_preactivations)
    out_mask = outer_and(rows, cols)
    for ref, value in zip(out_refs, outs):
        masked_store(ref.at[pl.ds(row0, bm), pl.ds(col0, bn)], value, out_mask)


def glu_triton(
    x: Array,
    w_gate: Array,
    w_up: Array,
    b_gate: Array | None = None,
    b_up: Array | None = None,
    *,
    activation: str | None,
    weights_transposed: bool = False,
    out_dtype: Any = None,
    return_preactivations: bool = False,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    precision: Any = None,
) -> Array | tuple[Array, Array, Array]:
    """``act(x @ w_gate + b_gate) * (x @ w_up + b_up)`` as one Triton (GPU) kernel.

    Same arguments and results as :func:`glu_tpu`. Blocks must be powers of two >= 16; defaults
    are 128 x 64 output tiles (shrunk to the array; two accumulators make that the register
    footprint of one 128 x 128 tile) and K slices of 32 (f32) or 64 (16-bit). Exact GELU uses an
    in-kernel erf approximation (abs error ~1.5e-7), since Triton has no erf. With f32 operands
    and default precision Triton multiplies in IEEE f32 (no TF32).

    Raises:
      NotImplementedError: when :func:`triton_unsupported_reason` (or mixed x/weight dtypes)
        rules the problem out, so the caller can fall back to XLA.
      ValueError: for inconsistent shapes, an unknown activation or an illegal block size.
    """
    m, k, n = _check_operands(x, w_gate, w_up, b_gate, b_up, weights_transposed)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    _raise_if_unsupported(triton_unsupported_reason, x, w_gate, w_up, b_gate, b_up, out_dtype,
                          (m, k, n))
    get_activation(activation)  # validates the name
    bm, bn, bk = triton_matmul_blocks(m, k, n, x.dtype, block_m, block_n, block_k,
                                      max_m=_TRITON_BLOCK_M, max_n=_TRITON_BLOCK_N)
    biases = [b for b in (b_gate, b_up) if b is not None]

    kernel = functools.partial(
        _triton_glu_kernel,
        m=m, n=n, k=k, bm=bm, bn=bn, bk=bk,
        activation=triton_activation(activation),
        weights_transposed=weights_transposed,
        has_gate_bias=b_gate is not None,
        has_up_bias=b_up is not None,
        return_preactivations=return_preactivations,
        precision=precision,
    )
    # No BlockSpecs: every program sees whole arrays and slices them itself, because BlockSpec
    # blocks are loaded unmasked by the Triton lowering (ragged edges would read out of bounds).
    with quiet_triton_deprecation():
        outs = pl.pallas_call(
            kernel,
            out_shape=_out_shapes(m, n, out_dtype, return_preactivations),
            grid=(cdiv(m, bm), cdiv(n, bn)),
            compiler_params=pltriton.CompilerParams(
                # Two accumulators: count both tiles. Stages left to the lowering (3 on CUDA).
                num_warps=8 if 2 * bm * bn >= 128 * 128 else 4
            ),
            interpret=interpret,
            name=_kernel_name(activation),
        )(x, w_gate, w_up, *biases)
    return _finish(outs, return_preactivations)
