"""Pallas kernels for the fused ``linear`` op: ``act(x @ w + b)`` in one pass over the output.

The matmul-epilogue kernel of :mod:`jfuse.pallas.matmul` with one weight: this module says what
the epilogue does (bias already added there, then the activation, and optionally the
pre-activation ``z = x @ w + b`` as a second output, which the autodiff rule of
``jfuse.ops.linear`` needs) and the default tiles. :func:`linear_tpu` is the Mosaic kernel,
:func:`linear_triton` the Triton one; both accumulate in f32, do the epilogue in f32 and cast
once to ``out_dtype``. ``interpret=True`` runs either in Pallas' HLO interpreter, which is how
their numerics are tested on a CPU.

``*_unsupported_reason`` say, without tracing anything, whether a kernel can serve a problem
(those of any matmul kernel: linear refuses nothing more); the kernels raise
``NotImplementedError`` with that reason otherwise, so a caller can fall back to XLA. Nothing
here knows about jaxprs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jfuse.pallas._common import kernel_activation
from jfuse.pallas.matmul import MatmulOp, gpu_dtype_profitability_reason, matmul
# Re-exported: what a kernel refuses is what any matmul kernel refuses.
from jfuse.pallas.matmul import tpu_unsupported_reason, triton_unsupported_reason

Array = jax.Array

__all__ = [
    "LINEAR",
    "linear",
    "linear_tpu",
    "linear_triton",
    "profitability_reason",
    "tpu_unsupported_reason",
    "triton_unsupported_reason",
]

# Default tiles. TPU: 512-wide tiles keep the MXU busy (block size is everything on TPU:
# 128-tiles run at a few % of peak); in f32 with two outputs and double buffering that is ~9 MiB
# of VMEM, which fits the smallest chips (16 MiB per core) within _tiling.TPU_VMEM_BUDGET, so
# Mosaic's scoped VMEM limit is not raised. Triton: the usual 128 x 128 output tile; K slices
# (_tiling.TRITON_BLOCK_K_BY_ITEMSIZE) sized so that 3 pipeline stages of both operand tiles fit
# in shared memory (96 KiB).
LINEAR = MatmulOp(
    name="linear",
    weights=("w",),
    biases=("bias",),
    tpu_max_blocks=(512, 512, 512),
    triton_max_blocks=(128, 128),
)


def profitability_reason(backend: str, m: int, k: int, n: int, dtype: Any,
                         precision: Any = None) -> str | None:
    """Why the fused linear kernel on ``backend`` (``"tpu"``, or ``"triton"``/``"gpu"``/
    ``"cuda"``) is expected to be slower than XLA, or None. On GPU: in the dtypes the Triton
    matmul kernels lost in at every size measured, at the default ``precision`` (f32; see
    :data:`jfuse.pallas.matmul.GPU_UNPROFITABLE_DTYPES`). In bf16 the kernel won on an H200
    (x0.76 forward, x0.91 forward+backward at 8192x4096x4096), and TPU has no timings yet."""
    del m, k, n  # no size was measured to change the answer within a dtype
    if str(backend).lower() not in ("tpu", "triton", "gpu", "cuda"):
        raise ValueError(f"backend={backend!r}; expected 'tpu', 'triton', 'gpu' or 'cuda'.")
    if str(backend).lower() == "tpu":
        return None
    return gpu_dtype_profitability_reason(dtype, precision)


def _epilogue(activation: Callable[[Array], Array] | None, return_preactivation: bool):
    def epilogue(z: Array) -> tuple[Array, ...]:
        y = z if activation is None else activation(z)
        return (y, z) if return_preactivation else (y,)

    return epilogue


def linear(
    x: Array,
    w: Array,
    b: Array | None = None,
    *,
    backend: str,
    activation: str | None,
    rhs_transposed: bool = False,
    return_preactivation: bool = False,
    **options: Any,
) -> Array | tuple[Array, Array]:
    """``act(x @ w + b)`` as one Pallas kernel for ``backend`` (``"tpu"`` or ``"triton"``).

    Args:
      x: ``(M, K)``.
      w: ``(K, N)``, or ``(N, K)`` with ``rhs_transposed=True`` (contracted in place, never
        transposed in memory).
      b: ``(N,)`` or None.
      activation: a name from ``jfuse.core.activations`` or None (identity). On Triton exact
        GELU uses an in-kernel erf approximation (abs error ~1.5e-7), since Triton has no erf.
      return_preactivation: also return ``z = x @ w + b`` (in ``out_dtype``).
      **options: ``out_dtype`` (default ``x.dtype``), ``interpret``, ``block_m``, ``block_n``,
        ``block_k``, ``precision``, as for :func:`jfuse.pallas.matmul.matmul`. Default tiles:
        TPU 512 each (shrunk to the array, balanced across blocks); Triton 128 x 128 output
        tiles and K slices of 32 (f32) or 64 (16-bit).

    Returns:
      ``y`` of shape ``(M, N)``, or ``(y, z)`` with ``return_preactivation=True``.

    Raises:
      NotImplementedError: when :func:`tpu_unsupported_reason` /
        :func:`triton_unsupported_reason` (or mixed x/w dtypes, or on TPU the precision) rules
        the problem out, so the caller can fall back to XLA.
      ValueError: for inconsistent shapes, an unknown activation or an illegal block size.
    """
    epilogue = _epilogue(kernel_activation(backend, activation), return_preactivation)
    outs = matmul(LINEAR, x, (w,), (b,), backend=backend, weights_transposed=rhs_transposed,
                  epilogue=epilogue, n_outputs=2 if return_preactivation else 1,
                  name=f"jfuse_linear_{activation or 'identity'}", **options)
    return outs if return_preactivation else outs[0]


def linear_tpu(x: Array, w: Array, b: Array | None = None, **kwargs: Any):
    """``act(x @ w + b)`` as one Mosaic (TPU) kernel: :func:`linear` with ``backend="tpu"``."""
    return linear(x, w, b, backend="tpu", **kwargs)


def linear_triton(x: Array, w: Array, b: Array | None = None, **kwargs: Any):
    """``act(x @ w + b)`` as one Triton (GPU) kernel: :func:`linear` with ``backend="triton"``."""
    return linear(x, w, b, backend="triton", **kwargs)
