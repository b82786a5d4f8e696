"""The matmul-epilogue kernels: ``epilogue(x @ W_1 [+ b_1], ..., x @ W_n [+ b_n])`` in one pass.

Every matmul-shaped fused op is this one kernel with a different epilogue: ``linear`` has one
weight and applies an activation (and may also write the pre-activation), ``glu`` has two
weights that share ``x`` and multiplies the activated gate by the up projection. An op declares
itself once as a :class:`MatmulOp` (the names its operands have in error messages, its default
tiles) and calls :func:`matmul` with its weights, its optional biases (``None`` where absent),
and an epilogue function over f32 tiles.

* TPU (Mosaic): a ``(M/bm, N/bn, K/bk)`` grid whose K axis accumulates ``x @ W_i`` into one f32
  VMEM scratch per weight, each ``x`` tile loaded once for all weights; the last K step adds the
  biases, runs the epilogue and writes. Blocks follow the (8, 128) tiling rule (16-row tiles for
  16-bit data), ragged M and N are edge blocks whose extra rows/columns are never written, and K
  is exact by a dividing tile or by zero padding (a partial block there would add garbage).
  Default blocks stay within :data:`~jfuse.pallas._tiling.TPU_VMEM_BUDGET`; a caller-forced
  block over it raises Mosaic's scoped VMEM limit.
* GPU (Triton): a ``(M/bm, N/bn)`` grid of programs over whole-array refs, each looping over K
  with masked loads of one ``x`` tile and the ``n`` weight tiles, so ragged M, N and K need no
  padding. Blocks are powers of two >= 16.

Both accumulate in f32, run the epilogue in f32 and cast each output once to ``out_dtype``.
Optional operands are ``None`` in the operand list, in the BlockSpecs and in the kernel's refs
(as JAX's ``pallas/ops/tpu/flash_attention.py`` passes its optional ``ab``), so a kernel reads
``b_refs[i]`` for weight ``i``'s bias and never counts positions in ``refs``.

``tpu_unsupported_reason`` / ``triton_unsupported_reason`` say, without tracing anything,
whether a kernel can serve an ``(M, K) @ (K, N)`` problem; :func:`matmul` raises
``NotImplementedError`` with that reason otherwise, so a caller can fall back to XLA. What an
op's epilogue computes, and any op-specific refusal, stays in the op's module (``linear``,
``glu``). Nothing here knows about jaxprs or activations.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

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
    contract,
    dtype_reason,
    empty_matmul_reason,
    int32_offsets_reason,
    quiet_triton_deprecation,
    raise_if_unsupported,
    tpu_precision_reason,
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

# ``epilogue(z_1, ..., z_n) -> (out_1, ..., out_k)``: f32 (bm, bn) tiles in, f32 tiles out.
Epilogue = Callable[..., tuple[Array, ...]]

__all__ = [
    "BACKENDS",
    "Epilogue",
    "GPU_UNPROFITABLE_DTYPES",
    "MatmulOp",
    "gpu_dtype_profitability_reason",
    "matmul",
    "tpu_blocks",
    "tpu_unsupported_reason",
    "triton_unsupported_reason",
]

BACKENDS = ("tpu", "triton")


@dataclasses.dataclass(frozen=True)
class MatmulOp:
    """One op served by the matmul-epilogue kernels: what it calls its operands, its tiles.

    Attributes:
      name: the op's name, for error messages ("linear kernels take 2-D x and w ...").
      weights: the argument names of its weights, in order (``("w_gate", "w_up")``).
      biases: the argument names of their biases, one per weight, in the same order.
      tpu_max_blocks: default upper bounds of ``(bm, bn, bk)`` on TPU; an op with more weights
        holds more weight tiles and accumulators per step, so it may want a smaller ``bn``.
      triton_max_blocks: default upper bounds of the ``(bm, bn)`` output tile on Triton.
    """

    name: str
    weights: tuple[str, ...]
    biases: tuple[str, ...]
    tpu_max_blocks: tuple[int, int, int]
    triton_max_blocks: tuple[int, int]

    def __post_init__(self):
        if len(self.biases) != len(self.weights) or not self.weights:
            raise ValueError(f"MatmulOp {self.name!r}: one bias name per weight, at least one.")


# ----------------------------------------------------------------------------------------------
# Refusals and operand checks: pure Python, nothing traced
# ----------------------------------------------------------------------------------------------


def tpu_unsupported_reason(m: int, k: int, n: int, dtype: Any) -> str | None:
    """Why the Mosaic matmul kernel cannot serve ``x (M, K)`` against ``(K, N)`` weights of
    ``dtype``, or None if it can."""
    return empty_matmul_reason(m, k, n) or dtype_reason("TPU", dtype, TPU_DTYPES)


def triton_unsupported_reason(m: int, k: int, n: int, dtype: Any) -> str | None:
    """Why the Triton matmul kernel cannot serve ``x (M, K)`` against ``(K, N)`` weights of
    ``dtype``, or None if it can."""
    return (empty_matmul_reason(m, k, n) or dtype_reason("Triton", dtype, TRITON_DTYPES)
            or int32_offsets_reason(m, k, n))


_UNSUPPORTED_REASON = {"tpu": tpu_unsupported_reason, "triton": triton_unsupported_reason}


# Operand dtypes in which the Triton matmul kernels lost to XLA at every size measured on a GPU,
# at the default matmul precision, and the evidence. The device check on an H200 (2026-11-28,
# jax 0.11.2, benchmarks/results/device/device_check_nvidia_h200.md): in f32 the GLU kernel took
# x1.9-5.3 XLA's time forward and x1.3-2.5 forward+backward (K = 384 to 4096), the linear kernel
# x4.2 and x2.2 (8192x4096x4096). At the default precision XLA's f32 GEMMs run on the tensor
# cores in TF32, while the kernels multiply in IEEE f32 (the kernel ran at ~67 TFLOP/s, the
# H200's f32 peak). So on GPU an f32 linear or GLU at the default precision runs on XLA unless
# the user asks for the kernel (implementation="pallas"). Where the user asks for full f32
# (precision HIGHEST, or "float32"/"highest" as the default), XLA gives up TF32 too and the rule
# does not apply (not measured).
GPU_UNPROFITABLE_DTYPES: dict[str, str] = {
    "float32": "XLA's TF32 GEMMs beat the f32 Triton kernels (x1.3-5.3 on an H200)",
}


def _is_default_precision(precision: Any) -> bool:
    if precision is None:
        return True
    try:
        return lax.Precision(precision) == lax.Precision.DEFAULT
    except (TypeError, ValueError):  # a DotAlgorithmPreset or the like: an explicit choice
        return False


def gpu_dtype_profitability_reason(dtype: Any, precision: Any = None) -> str | None:
    """Why a Triton matmul kernel is expected to lose to XLA in ``dtype`` at any size (see
    :data:`GPU_UNPROFITABLE_DTYPES`), or None. Only at the default ``precision`` (None or
    DEFAULT, where XLA may use TF32): under an explicit higher precision both multiply in f32."""
    parts = precision if isinstance(precision, (tuple, list)) else (precision,)
    if not all(_is_default_precision(p) for p in parts):
        return None
    name = jnp.dtype(dtype).name
    evidence = GPU_UNPROFITABLE_DTYPES.get(name)
    return None if evidence is None else f"{name} on GPU: {evidence}"


def _and_join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _check_operands(
    op: MatmulOp,
    x: Array,
    weights: Sequence[Array],
    biases: Sequence[Array | None],
    weights_transposed: bool,
) -> tuple[int, int, int]:
    """Validates ranks and shapes (a caller bug, so ValueError) and returns (M, K, N)."""
    if len(weights) != len(op.weights) or len(biases) != len(op.biases):
        raise ValueError(f"{op.name} kernels take {len(op.weights)} weight(s) and as many "
                         f"biases (None where absent); got {len(weights)} and {len(biases)}.")
    if x.ndim != 2 or any(w.ndim != 2 for w in weights):
        names = _and_join(("x",) + op.weights)
        shapes = _and_join([f"x{x.shape}"] + [f"{a}{w.shape}" for a, w in zip(op.weights, weights)])
        raise ValueError(f"{op.name} kernels take 2-D {names}; got {shapes}.")
    first = weights[0]
    for name, w in zip(op.weights[1:], weights[1:]):
        if w.shape != first.shape:
            raise ValueError(f"{op.weights[0]}{first.shape} and {name}{w.shape} must have the "
                             "same shape.")
    m, k = x.shape
    n, k_w = first.shape if weights_transposed else first.shape[::-1]
    if k_w != k:
        layout = "(N, K)" if weights_transposed else "(K, N)"
        what = f"{op.weights[0]}{first.shape}" if len(weights) == 1 else f"the weights {first.shape}"
        raise ValueError(f"x{x.shape} and {what} {layout} disagree on K.")
    for name, b in zip(op.biases, biases):
        if b is not None and b.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},); got {b.shape}.")
    return m, k, n


def _raise_if_unsupported(
    op: MatmulOp,
    backend: str,
    x: Array,
    weights: Sequence[Array],
    biases: Sequence[Array | None],
    out_dtype: Any,
    mkn: tuple[int, int, int],
) -> None:
    """NotImplementedError (the caller's cue to fall back to XLA) with the first reason found:
    x's dtype, mixed x/weight dtypes, then each bias's and the output's dtype."""
    mixed = None
    if any(w.dtype != x.dtype for w in weights):
        dtypes = ", ".join(f"{a} {w.dtype.name}" for a, w in zip(("x",) + op.weights,
                                                                   (x, *weights)))
        mixed = f"mixed operand dtypes ({dtypes}) are not supported"
    others = [(name, None if b is None else b.dtype) for name, b in zip(op.biases, biases)]
    others.append(("out_dtype", out_dtype))
    raise_if_unsupported(_UNSUPPORTED_REASON[backend], mkn, x.dtype, mixed, others)


# ----------------------------------------------------------------------------------------------
# The epilogue, shared by both kernels
# ----------------------------------------------------------------------------------------------


def _run_epilogue(
    epilogue: Epilogue,
    accs: Sequence[Array],
    biases: Sequence[Array | None],
    out_dtype: Any,
    n_outputs: int,
) -> tuple[Array, ...]:
    """The f32 biases added to the f32 accumulator tiles, the op's epilogue, one cast per output."""
    zs = [acc if b is None else acc + b.astype(jnp.float32) for acc, b in zip(accs, biases)]
    outs = tuple(epilogue(*zs))
    if len(outs) != n_outputs:  # a bug in the op's module, caught while tracing
        raise ValueError(f"the epilogue returned {len(outs)} outputs; n_outputs={n_outputs}.")
    return tuple(out.astype(out_dtype) for out in outs)


# ----------------------------------------------------------------------------------------------
# TPU (Mosaic)
# ----------------------------------------------------------------------------------------------


def _tpu_vmem_bytes(bm, bn, bk, in_itemsize, out_itemsize, *, n_weights, n_outputs,
                    n_biases) -> int:
    """VMEM held by one grid step: double-buffered x, weight, bias and output blocks, plus one
    f32 accumulator per weight."""
    inputs = (bm * bk + n_weights * bk * bn + n_biases * bn) * in_itemsize
    outputs = n_outputs * bm * bn * out_itemsize
    return 2 * (inputs + outputs) + n_weights * bm * bn * 4


def tpu_blocks(
    op: MatmulOp,
    m: int,
    k: int,
    n: int,
    dtype: Any,
    out_dtype: Any,
    *,
    n_outputs: int,
    n_biases: int,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> tuple[int, int, int, int]:
    """``(bm, bn, bk, vmem_bytes)`` of ``op``'s Mosaic kernel: the caller's blocks (checked
    against the tiling rule) or ``op.tpu_max_blocks``-bounded defaults, and the VMEM one grid
    step of them holds."""
    max_m, max_n, max_k = op.tpu_max_blocks
    bm, bn, bk = tpu_matmul_blocks(m, k, n, dtype, out_dtype, block_m, block_n, block_k,
                                   max_m=max_m, max_n=max_n, max_k=max_k)
    in_size, out_size = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
    vmem = _tpu_vmem_bytes(bm, bn, bk, in_size, out_size, n_weights=len(op.weights),
                           n_outputs=n_outputs, n_biases=n_biases)
    return bm, bn, bk, vmem


def _tpu_kernel(x_ref, w_refs, b_refs, *refs, epilogue, n_outputs, weights_transposed,
                precision):
    """One (bm, bn) output tile; grid axis 2 walks K, the x tile feeding every weight tile and
    its f32 VMEM accumulator. ``b_refs[i]`` is weight i's (1, bn) bias block, or None."""
    *out_refs, acc_refs = refs
    k_step = pl.program_id(2)

    @pl.when(k_step == 0)
    def _zero():
        for acc_ref in acc_refs:
            acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...]
    for acc_ref, w_ref in zip(acc_refs, w_refs):
        acc_ref[...] += contract(x, w_ref[...], weights_transposed, precision)

    @pl.when(k_step == pl.num_programs(2) - 1)
    def _write():
        outs = _run_epilogue(
            epilogue,
            [acc_ref[...] for acc_ref in acc_refs],
            [None if b_ref is None else b_ref[...] for b_ref in b_refs],  # (1, bn): row bcast
            out_refs[0].dtype,
            n_outputs,
        )
        for ref, value in zip(out_refs, outs):
            ref[...] = value


def _tpu_call(op, x, weights, biases, *, m, k, n, epilogue, n_outputs, name,
              weights_transposed, out_dtype, interpret, block_m, block_n, block_k, precision):
    if reason := tpu_precision_reason(precision):
        raise NotImplementedError(reason)
    n_biases = sum(b is not None for b in biases)
    bm, bn, bk, vmem = tpu_blocks(op, m, k, n, x.dtype, out_dtype, n_outputs=n_outputs,
                                  n_biases=n_biases, block_m=block_m, block_n=block_n,
                                  block_k=block_k)

    # K is summed over, so a partial edge block there would add garbage: pad it with zeros to a
    # whole number of blocks. M and N edge blocks only hold rows/columns that are never written.
    x, weights, k_padded = tpu_pad_k(x, tuple(weights), bk, weights_transposed)
    grid = (cdiv(m, bm), cdiv(n, bn), k_padded // bk)

    x_spec = pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk))
    if weights_transposed:
        w_spec = pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk))
    else:
        w_spec = pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))
    b_spec = pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))
    # An absent bias is None in the operands and in the specs alike; the kernel gets None.
    b_specs = tuple(None if b is None else b_spec for b in biases)
    b_operands = tuple(None if b is None else b.reshape(1, n) for b in biases)

    kernel = functools.partial(_tpu_kernel, epilogue=epilogue, n_outputs=n_outputs,
                               weights_transposed=weights_transposed, precision=precision)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((m, n), out_dtype),) * n_outputs,
        grid=grid,
        in_specs=(x_spec, (w_spec,) * len(weights), b_specs),
        out_specs=(out_spec,) * n_outputs,
        scratch_shapes=[tuple(pltpu.VMEM((bm, bn), jnp.float32) for _ in weights)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY),
            vmem_limit_bytes=tpu_vmem_limit_bytes(vmem),
        ),
        interpret=interpret,
        name=name,
    )(x, weights, b_operands)


# ----------------------------------------------------------------------------------------------
# GPU (Triton)
# ----------------------------------------------------------------------------------------------


def _triton_kernel(x_ref, w_refs, b_refs, *out_refs, m, n, k, bm, bn, bk, epilogue, n_outputs,
                   weights_transposed, precision):
    """One (bm, bn) output tile, over whole-array refs; each K step loads one x tile and every
    weight tile with masks, so ragged M, N and K are exact without padding. ``b_refs[i]`` is
    weight i's whole (N,) bias, or None."""
    row0, col0 = pl.program_id(0) * bm, pl.program_id(1) * bn
    rows, cols = edge_mask(row0, bm, m), edge_mask(col0, bn, n)

    def load_weight(ref, k0, ks):
        if weights_transposed:
            return masked_load(ref.at[pl.ds(col0, bn), pl.ds(k0, bk)], outer_and(cols, ks))
        return masked_load(ref.at[pl.ds(k0, bk), pl.ds(col0, bn)], outer_and(ks, cols))

    def k_step(step, accs):
        k0 = step * bk
        ks = edge_mask(k0, bk, k)
        x = masked_load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], outer_and(rows, ks))
        return tuple(acc + contract(x, load_weight(w_ref, k0, ks), weights_transposed, precision)
                     for acc, w_ref in zip(accs, w_refs))

    zeros = jnp.zeros((bm, bn), jnp.float32)
    accs = lax.fori_loop(0, cdiv(k, bk), k_step, (zeros,) * len(w_refs))

    def load_bias(ref):
        return None if ref is None else masked_load(ref.at[pl.ds(col0, bn)], cols)[None, :]

    outs = _run_epilogue(epilogue, accs, [load_bias(b_ref) for b_ref in b_refs],
                         out_refs[0].dtype, n_outputs)
    out_mask = outer_and(rows, cols)
    for ref, value in zip(out_refs, outs):
        masked_store(ref.at[pl.ds(row0, bm), pl.ds(col0, bn)], value, out_mask)


def _triton_call(op, x, weights, biases, *, m, k, n, epilogue, n_outputs, name,
                 weights_transposed, out_dtype, interpret, block_m, block_n, block_k, precision):
    max_m, max_n = op.triton_max_blocks
    bm, bn, bk = triton_matmul_blocks(m, k, n, x.dtype, block_m, block_n, block_k,
                                      max_m=max_m, max_n=max_n)
    kernel = functools.partial(
        _triton_kernel, m=m, n=n, k=k, bm=bm, bn=bn, bk=bk, epilogue=epilogue,
        n_outputs=n_outputs, weights_transposed=weights_transposed, precision=precision,
    )
    # No BlockSpecs: every program sees whole arrays and slices them itself, because BlockSpec
    # blocks are loaded unmasked by the Triton lowering (ragged edges would read out of bounds).
    with quiet_triton_deprecation():
        return pl.pallas_call(
            kernel,
            out_shape=(jax.ShapeDtypeStruct((m, n), out_dtype),) * n_outputs,
            grid=(cdiv(m, bm), cdiv(n, bn)),
            compiler_params=pltriton.CompilerParams(
                # Registers go to the accumulators, one tile per weight: 8 warps from the
                # footprint of one 128 x 128 tile. Stages left to the lowering: 3 on CUDA, 1 on
                # ROCm.
                num_warps=8 if len(weights) * bm * bn >= 128 * 128 else 4
            ),
            interpret=interpret,
            name=name,
        )(x, tuple(weights), tuple(biases))


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------


def matmul(
    op: MatmulOp,
    x: Array,
    weights: Sequence[Array],
    biases: Sequence[Array | None],
    *,
    backend: str,
    epilogue: Epilogue,
    n_outputs: int,
    name: str,
    weights_transposed: bool = False,
    out_dtype: Any = None,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    precision: Any = None,
) -> tuple[Array, ...]:
    """``epilogue(x @ W_1 + b_1, ..., x @ W_n + b_n)`` as one Pallas kernel for ``backend``.

    Args:
      op: the op's declaration (operand names for errors, default tiles).
      x: ``(M, K)``.
      weights: ``len(op.weights)`` arrays of the same shape, ``(K, N)`` each, or ``(N, K)``
        each with ``weights_transposed=True`` (contracted in place, never transposed in memory).
      biases: one per weight, ``(N,)`` or None (that weight's product gets no bias).
      backend: ``"tpu"`` (Mosaic) or ``"triton"`` (GPU).
      epilogue: ``epilogue(z_1, ..., z_n)`` on f32 ``(bm, bn)`` tiles ``z_i = x @ W_i + b_i``,
        returning ``n_outputs`` f32 tiles of the same shape, in plain ``jax.numpy``/``lax`` that
        ``backend`` lowers (Triton has no ``erf``).
      n_outputs: how many outputs the epilogue returns; each is an ``(M, N)`` array.
      name: the kernel's name in the lowered program (``jfuse_<op>_<variant>``).
      out_dtype: dtype of every output; default ``x.dtype``.
      interpret: run in Pallas' HLO interpreter (any backend, e.g. CPU for tests).
      block_m, block_n, block_k: tile sizes; None picks defaults bounded by ``op``'s (shrunk to
        the array, balanced across blocks on TPU). On TPU each must be a multiple of the tile (8
        or 16 rows for 32/16-bit M, 128 for N and K) or cover its whole dimension; on Triton a
        power of two >= 16. Triton's default K slice is 32 (f32) or 64 (16-bit).
      precision: ``lax.dot_general`` precision of the in-kernel dots. TPU: None/DEFAULT (Mosaic
        feeds f32 operands to the MXU as bf16) or HIGHEST (full f32); others raise
        NotImplementedError. Triton multiplies f32 in IEEE f32 by default (no TF32).
        Accumulation is f32 regardless.

    Returns:
      The ``n_outputs`` outputs, a tuple of ``(M, N)`` arrays in ``out_dtype``.

    Raises:
      NotImplementedError: when the backend's ``*_unsupported_reason``, mixed x/weight dtypes or
        (TPU) the precision rule the problem out, so the caller can fall back to XLA.
      ValueError: for inconsistent shapes, an unknown backend or an illegal block size.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {list(BACKENDS)}.")
    weights, biases = tuple(weights), tuple(biases)
    m, k, n = _check_operands(op, x, weights, biases, weights_transposed)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    _raise_if_unsupported(op, backend, x, weights, biases, out_dtype, (m, k, n))
    call = _tpu_call if backend == "tpu" else _triton_call
    return tuple(call(
        op, x, weights, biases, m=m, k=k, n=n, epilogue=epilogue, n_outputs=n_outputs,
        name=name, weights_transposed=weights_transposed, out_dtype=out_dtype,
        interpret=interpret, block_m=block_m, block_n=block_n, block_k=block_k,
        precision=precision,
    ))
