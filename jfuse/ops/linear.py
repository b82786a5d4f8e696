"""``linear``: ``activation(x @ w + b)`` as one fused op, with derivatives in plain JAX.

The primal runs one kernel (Pallas on TPU/GPU, XLA elsewhere) that keeps the matmul result in an
f32 accumulator and applies bias and activation before the only write to memory. The derivative
is a ``jax.custom_jvp`` written in ordinary primitives, so ``grad``, ``jvp``, ``jacfwd``,
``hessian``, ``vmap`` and ``checkpoint`` all work. Under ``grad`` the residuals are ``x``, ``w``
and the pre-activation ``z`` (one array the size of the output), never the activation's own
intermediates: its slope is recomputed in the backward.

Example::

    y = jfuse.ops.linear(x, w, b, activation="gelu_tanh")   # x: (..., K), w: (K, N), b: (N,)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jfuse.ops import _partitionable
from jfuse.ops._autodiff import recompute_in_backward
from jfuse.ops._dispatch import check_implementation
from jfuse.ops._op import FusedOp, OpSpec, apply, as_vector, is_zero, matmul_benchmark
from jfuse.pallas import linear as kernels
from jfuse.pallas._common import tpu_precision_reason
from jfuse.core.activations import get_activation

__all__ = ["linear"]

Array = jax.Array

@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class LinearSpec(OpSpec):
    """Everything about one linear call that is not an array. The replay is the user's own
    equations, ``(x, w, b) -> (y, z)``."""

    activation: str | None
    transpose_w: bool  # w is (N, K) and contracted on its dim 1 (torch-style weights)
    out_dtype: Any
    preactivation_dtype: Any
    precision: Any = None


def _contract_dims(x_ndim: int, spec: LinearSpec):
    return (((x_ndim - 1,), (1 if spec.transpose_w else 0,)), ((), ()))


def _n_out(w, spec: LinearSpec) -> int:
    return w.shape[0] if spec.transpose_w else w.shape[1]


def _preactivation_tangent(x, w, b, dx, dw, db, spec: LinearSpec, shape, dtype):
    """dz = dx·w + x·dw + db, skipping the terms whose tangent is zero."""
    dims = _contract_dims(x.ndim, spec)
    dz = None
    if not is_zero(dx):
        dz = lax.dot_general(dx, w, dims, precision=spec.precision, preferred_element_type=dtype)
    if not is_zero(dw):
        term = lax.dot_general(x, dw, dims, precision=spec.precision, preferred_element_type=dtype)
        dz = term if dz is None else dz + term
    if b is not None and not is_zero(db):
        term = jnp.broadcast_to(as_vector(db, shape[-1]).astype(dtype), shape)
        dz = term if dz is None else dz + term
    return jnp.zeros(shape, dtype) if dz is None else dz.astype(dtype)


def _activation_tangent(activation: str, out_dtype, z, dz):
    """act'(z)·dz in z's dtype; under ``jax.checkpoint`` so ``grad`` saves ``z`` alone (as the
    unfused graph does) and recomputes the slope in the backward."""
    # In z's dtype, as the unfused graph's autodiff computes it (no f32 temporary of z's size).
    return (get_activation(activation).derivative(z) * dz).astype(out_dtype)


class Linear(FusedOp):
    """``activation(x @ w + b)``. Operands ``(x, w, b)``; full outputs ``(y, z)`` with ``z`` the
    pre-activation (what the derivative needs); without it the kernels write ``y`` alone."""

    name = "linear"

    def reference(self, spec: LinearSpec, operands, full):
        """XLA: f32 accumulation, bias and activation in f32, one cast at the end."""
        x, w, b = operands
        if spec.replay is not None:
            y, z = spec.replay(x, w, b)
        else:
            acc = jnp.promote_types(spec.out_dtype, jnp.float32)
            z = lax.dot_general(x, w, _contract_dims(x.ndim, spec), precision=spec.precision,
                                preferred_element_type=acc)
            if b is not None:
                z = z + as_vector(b, z.shape[-1]).astype(acc)
            act = get_activation(spec.activation)
            y = (z if act is None else act.forward(z)).astype(spec.out_dtype)
            z = z.astype(spec.preactivation_dtype)
        return y, (z if full else None)

    def kernel(self, spec: LinearSpec, inputs, backend, interpret, full):
        x, w, b = inputs
        lead, k, n = x.shape[:-1], x.shape[-1], _n_out(w, spec)
        outs = kernels.linear(
            jnp.reshape(x, (-1, k)), w,
            None if b is None else as_vector(b, n).astype(spec.out_dtype),
            backend=backend, activation=spec.activation, rhs_transposed=spec.transpose_w,
            out_dtype=spec.out_dtype, return_preactivation=full, interpret=interpret,
            precision=spec.precision,
        )
        if not full:
            return jnp.reshape(outs, lead + (n,)), None
        y, z = outs
        return (jnp.reshape(y, lead + (n,)),
                jnp.reshape(z, lead + (n,)).astype(spec.preactivation_dtype))

    def unsupported_reason(self, spec: LinearSpec, platform, avals):
        if platform == "tpu" and (reason := tpu_precision_reason(spec.precision)):
            return reason
        x, w = avals[0], avals[1]
        m, k = int(np.prod(x.shape[:-1], dtype=np.int64)), x.shape[-1]
        refuse = (kernels.tpu_unsupported_reason if platform == "tpu"
                  else kernels.triton_unsupported_reason)
        return refuse(m, k, _n_out(w, spec), x.dtype)

    def unprofitable_reason(self, spec: LinearSpec, platform, avals):
        x, w = avals[0], avals[1]
        m, k = int(np.prod(x.shape[:-1], dtype=np.int64)), x.shape[-1]
        return kernels.profitability_reason("tpu" if platform == "tpu" else "gpu",
                                            m, k, _n_out(w, spec), x.dtype,
                                            precision=spec.precision)

    def tangents(self, spec: LinearSpec, operands, tangents, full_outputs):
        x, w, b = operands
        dx, dw, db = tangents
        y, z = full_outputs
        dz = _preactivation_tangent(x, w, b, dx, dw, db, spec, z.shape, z.dtype)
        act = get_activation(spec.activation)
        if act is None:
            dy = dz.astype(y.dtype)
        elif act.derivative_mask is not None:
            dy = lax.select(act.derivative_mask(z), dz, lax.full_like(dz, 0)).astype(y.dtype)
        else:
            tangent = functools.partial(_activation_tangent, spec.activation, y.dtype)
            dy = recompute_in_backward(tangent)(z, dz)
        return dy, dz

    def roles(self, spec: LinearSpec, operands):
        weight = _partitionable.WEIGHT_NK if spec.transpose_w else _partitionable.WEIGHT_KN
        return (_partitionable.X, weight, _partitionable.BIAS)


LINEAR = Linear()


def _spec(*, activation, transpose_w=False, out_dtype, preactivation_dtype=None, precision=None,
          implementation=None, replay=None) -> LinearSpec:
    out_dtype = np.dtype(out_dtype)
    return LinearSpec(activation=activation, transpose_w=transpose_w, out_dtype=out_dtype,
                      preactivation_dtype=np.dtype(preactivation_dtype or out_dtype),
                      precision=precision, implementation=implementation, replay=replay)


def fused_linear(
    x,
    w,
    b=None,
    *,
    activation: str | None,
    transpose_w: bool = False,
    out_dtype=None,
    preactivation_dtype=None,
    precision=None,
    implementation: str | None = None,
    replay: Callable[..., tuple] | None = None,
) -> Array:
    """The op as the rewrite calls it (no argument checks: the pattern pass already did them)."""
    spec = _spec(activation=activation, transpose_w=transpose_w,
                 out_dtype=out_dtype if out_dtype is not None else jnp.result_type(x, w),
                 preactivation_dtype=preactivation_dtype, precision=precision,
                 implementation=implementation, replay=replay)
    return apply(LINEAR, spec, x, w, b)


def linear_refusals(x_aval, w_aval, b_aval=None, **spec_fields) -> dict[str, str]:
    """Per lowering platform, why its kernel will not run this linear (see
    :meth:`FusedOp.refusals`); ``spec_fields`` as :func:`fused_linear` takes them."""
    spec_fields.setdefault("out_dtype", x_aval.dtype)
    return LINEAR.refusals(_spec(**spec_fields), [x_aval, w_aval, b_aval])


def _check_float(name: str, a) -> None:
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"jfuse.ops.linear: {name} must be a floating array, got dtype {a.dtype}.")


def linear(
    x: Array,
    w: Array,
    b: Array | None = None,
    *,
    activation: str | None = None,
    implementation: str | None = None,
) -> Array:
    """``activation(x @ w + b)`` as one fused op.

    Args:
      x: activations, shape ``(..., K)``, floating (f32, bf16, f16).
      w: weight, shape ``(K, N)``. For a torch-style ``(N, K)`` weight pass ``w.T``.
      b: optional bias, shape ``(N,)``.
      activation: ``None`` or one of ``"relu"``, ``"relu_max"``, ``"gelu_tanh"``, ``"gelu"``
        (exact), ``"silu"``, ``"sigmoid"``, ``"tanh"``.
      implementation: ``None`` (Pallas on TPU and GPU, XLA elsewhere, chosen at lowering time),
        ``"xla"``, ``"pallas"`` (like None, but a kernel that cannot serve the inputs raises
        instead of falling back to XLA) or ``"interpret"`` (the TPU kernel in interpret mode, on
        any machine).

    Returns:
      An array of shape ``(..., N)`` and dtype ``result_type(x, w)``. Accumulation, bias and
      activation are computed in f32 for narrower inputs.

    Example::

        >>> x, w, b = jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.zeros(16)
        >>> jfuse.ops.linear(x, w, b, activation="silu").shape
        (4, 16)
    """
    check_implementation(implementation)
    get_activation(activation)
    x, w = jnp.asarray(x), jnp.asarray(w)
    _check_float("x", x)
    _check_float("w", w)
    if x.ndim < 1:
        raise ValueError(f"jfuse.ops.linear: x must have at least 1 dimension, got shape {x.shape}.")
    if w.ndim != 2:
        raise ValueError(f"jfuse.ops.linear: w must be 2-D (K, N), got shape {w.shape}.")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"jfuse.ops.linear: x's last dim ({x.shape[-1]}) must equal w's first dim "
            f"({w.shape[0]}); got x {x.shape} and w {w.shape}."
        )
    dtype = jnp.result_type(x, w)
    x, w = x.astype(dtype), w.astype(dtype)
    if b is not None:
        b = jnp.asarray(b)
        _check_float("b", b)
        if b.shape != (w.shape[1],):
            raise ValueError(
                f"jfuse.ops.linear: b must have shape (N,) = ({w.shape[1]},), got {b.shape}."
            )
        b = b.astype(dtype)
    return fused_linear(x, w, b, activation=activation, implementation=implementation)


def _benchmark_inputs(shape, dtype, normal):
    m, k, n = shape
    return normal((m, k)), normal((k, n), 1 / np.sqrt(k)), jnp.zeros(n, dtype) + 0.01


# Beside the op, what benchmarks/ops.py times: an MLP's up-projection with a bias and a GELU or
# SiLU epilogue, at the sizes of each preset.
BENCHMARKS = (matmul_benchmark(
    "linear", products=1, inputs=_benchmark_inputs,
    call=lambda implementation, activation: (
        lambda x, w, b: linear(x, w, b, activation=activation, implementation=implementation)),
    sizes={
        "quick": (((64, 32, 64), "gelu_tanh"), ((64, 32, 64), "silu")),
        "cpu": (((1024, 512, 2048), "gelu_tanh"), ((1024, 512, 2048), "silu")),
        "accelerator": (((8192, 4096, 4096), "gelu_tanh"), ((8192, 4096, 4096), "silu")),
        "device": (((8192, 4096, 4096), "gelu_tanh"),),
    },
),)
