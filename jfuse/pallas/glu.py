"""Pallas kernels for the fused ``glu`` op: ``act(x @ Wg + bg) * (x @ Wu + bu)`` in one pass.

A gated linear unit (SwiGLU with ``silu``, GeGLU with ``gelu``/``gelu_tanh``, ReGLU with
``relu``, the original GLU with ``sigmoid``) is two matmuls that share their left operand and
meet in an elementwise product. XLA runs it as two GEMMs (or one against the concatenated
weights) and writes and re-reads the ``(M, 2N)`` intermediate; cuBLASLt cannot fuse the product.
Here it is the matmul-epilogue kernel of :mod:`jfuse.pallas.matmul` with two weights: one pass
over K loads each ``x`` tile once, feeds it to both weight tiles and keeps two f32 accumulators
(gate and up); the epilogue (biases already added) applies the gate activation and multiplies,
all in f32, and casts once to ``out_dtype``. :func:`glu_tpu` is the Mosaic kernel,
:func:`glu_triton` the Triton one.

With ``return_preactivations=True`` both also write ``gate_pre = x @ Wg + bg`` and
``up_pre = x @ Wu + bu`` from the same epilogue (the autodiff rule of ``jfuse.ops.glu`` needs
them). ``interpret=True`` runs either kernel in Pallas' HLO interpreter, which is how their
numerics are tested on a CPU.

``*_unsupported_reason`` say, without tracing anything, whether a kernel *can* serve a problem
(those of any matmul kernel; the kernels raise ``NotImplementedError`` with that reason
otherwise, so a caller can fall back to XLA). :func:`profitability_reason` says whether it
*should*: the one place that encodes where the fused kernel is expected to lose to XLA, so a
measurement on hardware changes one table. The kernels never consult it themselves. Nothing here
knows about jaxprs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jfuse.pallas._common import kernel_activation
from jfuse.pallas.matmul import MatmulOp, gpu_dtype_profitability_reason, matmul
# Re-exported: what a kernel refuses is what any matmul kernel refuses.
from jfuse.pallas.matmul import tpu_unsupported_reason, triton_unsupported_reason

Array = jax.Array

__all__ = [
    "GLU",
    "glu",
    "glu_tpu",
    "glu_triton",
    "tpu_unsupported_reason",
    "triton_unsupported_reason",
    "profitability_reason",
    "GPU_MAX_PROFITABLE_K",
]

# Default tiles. TPU: same bm and bk as the linear kernel (512: block size is everything on
# TPU), but bn halved to 256 because every K step holds two weight tiles and two accumulators
# (tokamax halves block_n for the same reason). The two weight tiles form a 512-wide right-hand
# side, so each x tile does as many flops per byte loaded as in the linear kernel's 512 x 512
# tile. Worst case, f32 in and out with all three outputs and both biases: 2 x (x 1 MiB +
# weights 1 MiB + outputs 1.5 MiB) + accumulators 1 MiB ~= 8 MiB (4.5 MiB in bf16), inside the
# 12 MiB _tiling.TPU_VMEM_BUDGET, so the defaults never raise Mosaic's scoped VMEM limit.
# Triton: a 128 x 64 output tile, so the two f32 accumulators hold as many registers as the
# linear kernel's one 128 x 128 tile; the K slice as in the linear kernel (32 f32, 64 16-bit:
# _tiling.TRITON_BLOCK_K_BY_ITEMSIZE), so a pipeline stage (one x tile + two weight tiles) is
# 32 KiB and 3 stages fit in 96 KiB of shared memory. tokamax's Pallas-Triton GLU uses the same
# shape budget.
GLU = MatmulOp(
    name="glu",
    weights=("w_gate", "w_up"),
    biases=("b_gate", "b_up"),
    tpu_max_blocks=(512, 256, 512),
    triton_max_blocks=(128, 64),
)


# ----------------------------------------------------------------------------------------------
# When fusing pays: the one place to change after measuring on hardware
# ----------------------------------------------------------------------------------------------

# Largest K (per branch, the contraction dim) at which the fused *Triton* GLU is expected to beat
# XLA's two cuBLAS GEMMs plus the elementwise product, by operand dtype. The fused kernel saves
# one write and one read of the (M, 2N) intermediate, a saving that shrinks like 1/K against the
# GEMM, while a Pallas-Triton GEMM is slower than cuBLAS at the same K.
# Measured on an H200 (device check, 2026-11-28, jax 0.11.2; kernel time / XLA time, M=8192,
# benchmarks/results/device/device_check_nvidia_h200.md), bf16:
#   K=384 -> N=1536: x0.64 forward, x0.75 forward+backward;  K=1024 -> 4096: x0.41, x0.72;
#   K=4096 -> 11008: x1.07, x1.04 (the kernel loses).
# So bf16 fuses up to K=1024, the largest K measured to win; between 1024 and 4096 nothing was
# measured. f16 has no timings and follows bf16 (the same tensor-core path). f32 lost at every K
# measured (x1.9-5.3 forward: XLA runs f32 GEMMs in TF32), so it has no entry here: the rule for
# it is matmul.GPU_UNPROFITABLE_DTYPES, shared with the linear kernel.
# (Before the H200 run this table came from tokamax's H100 autotuning caches, which put the bf16
# break-even near K=600-670; the H200 kernel still won at K=1024.)
# TPU has no entry: tokamax ships no TPU GLU kernel and there are no TPU GLU timings at all, so
# there is nothing to base a rule on; profitability_reason always allows the TPU kernel until a
# measurement says where it loses.
GPU_MAX_PROFITABLE_K: dict[str, int] = {"bfloat16": 1024, "float16": 1024}

_GPU_EVIDENCE = {
    "bfloat16": "on an H200 the bf16 GLU kernel won up to K=1024 (x0.41-0.75 of XLA's time) and "
    "lost at K=4096 (x1.04-1.07)",
    "float16": "no f16 timings; it follows bf16, whose kernel won up to K=1024 on an H200 and "
    "lost at K=4096",
}
_BACKENDS = {"tpu": "tpu", "triton": "gpu", "gpu": "gpu", "cuda": "gpu"}


def profitability_reason(backend: str, m: int, k: int, n: int, dtype: Any,
                         precision: Any = None) -> str | None:
    """Why fusing an ``(M, K) -> 2 x (K, N)`` GLU on ``backend`` is expected to be *slower* than
    XLA, or None when the kernel is expected to win (or there is no data to say otherwise).

    ``backend`` is ``"tpu"`` or ``"triton"`` (``"gpu"``/``"cuda"`` are accepted too). Pure
    Python, nothing is traced. Whether a kernel can run at all is a separate question, answered
    by :func:`tpu_unsupported_reason` / :func:`triton_unsupported_reason`; this one reports the
    dtypes the Triton matmul kernels lose in at any size at the default ``precision`` (f32,
    :data:`jfuse.pallas.matmul.GPU_UNPROFITABLE_DTYPES`) and the thresholds in
    :data:`GPU_MAX_PROFITABLE_K` (see the comment above it for the evidence).
    M and N are accepted for a future rule; the current one depends on K and dtype only.
    """
    del m, n  # the measured trend is in K; see GPU_MAX_PROFITABLE_K
    kind = _BACKENDS.get(str(backend).lower())
    if kind is None:
        raise ValueError(f"backend={backend!r}; expected one of {sorted(_BACKENDS)}.")
    if kind == "tpu":
        return None  # no TPU measurements exist (see GPU_MAX_PROFITABLE_K's comment)
    if reason := gpu_dtype_profitability_reason(dtype, precision):
        return reason
    name = jnp.dtype(dtype).name
    limit = GPU_MAX_PROFITABLE_K.get(name)
    if limit is None or k <= limit:
        return None
    return (
        f"K={k} > {limit}: on GPU the fused Triton GLU is expected to lose to XLA's two cuBLAS "
        f"GEMMs at this K in {name} ({_GPU_EVIDENCE[name]})"
    )


# ----------------------------------------------------------------------------------------------
# The kernels
# ----------------------------------------------------------------------------------------------


def _epilogue(activation: Callable[[Array], Array] | None, return_preactivations: bool):
    def epilogue(gate: Array, up: Array) -> tuple[Array, ...]:
        y = (gate if activation is None else activation(gate)) * up
        return (y, gate, up) if return_preactivations else (y,)

    return epilogue


def glu(
    x: Array,
    w_gate: Array,
    w_up: Array,
    b_gate: Array | None = None,
    b_up: Array | None = None,
    *,
    backend: str,
    activation: str | None,
    weights_transposed: bool = False,
    return_preactivations: bool = False,
    **options: Any,
) -> Array | tuple[Array, Array, Array]:
    """``act(x @ w_gate + b_gate) * (x @ w_up + b_up)`` as one Pallas kernel for ``backend``
    (``"tpu"`` or ``"triton"``).

    Args:
      x: ``(M, K)``.
      w_gate, w_up: ``(K, N)`` each, or ``(N, K)`` each with ``weights_transposed=True``
        (torch layout; contracted in place, never transposed in memory).
      b_gate, b_up: ``(N,)`` or None, independently.
      activation: the gate activation, a name from ``jfuse.core.activations`` (``"silu"`` for
        SwiGLU, ``"gelu"``/``"gelu_tanh"`` for GeGLU, ``"relu"`` for ReGLU, ``"sigmoid"`` for
        GLU), or None for the bilinear variant ``(x @ w_gate) * (x @ w_up)``. On Triton exact
        GELU uses an in-kernel erf approximation (abs error ~1.5e-7), since Triton has no erf.
      return_preactivations: also return ``gate_pre = x @ w_gate + b_gate`` and
        ``up_pre = x @ w_up + b_up`` (in ``out_dtype``).
      **options: ``out_dtype`` (default ``x.dtype``), ``interpret``, ``block_m``, ``block_n``,
        ``block_k``, ``precision``, as for :func:`jfuse.pallas.matmul.matmul`. Default tiles:
        TPU 512, 256, 512 (shrunk to the array, balanced across blocks; K in whole blocks,
        zero-padded only to lane alignment); Triton 128 x 64 output tiles (two accumulators
        make that the register footprint of one 128 x 128 tile) and K slices of 32 (f32) or 64
        (16-bit).

    Returns:
      ``y`` of shape ``(M, N)``, or ``(y, gate_pre, up_pre)`` with
      ``return_preactivations=True``.

    Raises:
      NotImplementedError: when :func:`tpu_unsupported_reason` /
        :func:`triton_unsupported_reason` (or mixed x/weight dtypes, or on TPU the precision)
        rules the problem out, so the caller can fall back to XLA.
      ValueError: for inconsistent shapes, an unknown activation or an illegal block size.
    """
    epilogue = _epilogue(kernel_activation(backend, activation), return_preactivations)
    outs = matmul(GLU, x, (w_gate, w_up), (b_gate, b_up), backend=backend,
                  weights_transposed=weights_transposed, epilogue=epilogue,
                  n_outputs=3 if return_preactivations else 1,
                  name=f"jfuse_glu_{activation or 'bilinear'}", **options)
    return outs if return_preactivations else outs[0]


def glu_tpu(x: Array, w_gate: Array, w_up: Array, b_gate: Array | None = None,
            b_up: Array | None = None, **kwargs: Any):
    """The GLU as one Mosaic (TPU) kernel: :func:`glu` with ``backend="tpu"``."""
    return glu(x, w_gate, w_up, b_gate, b_up, backend="tpu", **kwargs)


def glu_triton(x: Array, w_gate: Array, w_up: Array, b_gate: Array | None = None,
               b_up: Array | None = None, **kwargs: Any):
    """The GLU as one Triton (GPU) kernel: :func:`glu` with ``backend="triton"``."""
    return glu(x, w_gate, w_up, b_gate, b_up, backend="triton", **kwargs)
