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
from jax.custom_derivatives import SymbolicZero

from jfuse.ops._autodiff import recompute_in_backward
from jfuse.ops import _partitionable
from jfuse.ops._dispatch import OpCall, cached_trace, check_implementation, dispatch
from jfuse.core.activations import get_activation

Array = jax.Array

# A replay of the exact unfused equations, (x, w, b) -> (y, z), used as the XLA implementation
# when the op comes from a rewrite: on CPU the fused program then computes bit for bit what the
# user's program computed.
Replay = Callable[[Any, Any, Any], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True, eq=False)
class LinearSpec:
    """Everything about one linear call that is not an array."""

    activation: str | None
    transpose_w: bool  # w is (N, K) and contracted on its dim 1 (torch-style weights)
    out_dtype: Any
    preactivation_dtype: Any
    precision: Any = None
    implementation: str | None = None
    replay: Replay | None = None


def _contract_dims(x_ndim: int, spec: LinearSpec):
    return (((x_ndim - 1,), (1 if spec.transpose_w else 0,)), ((), ()))


def _n_out(w, spec: LinearSpec) -> int:
    return w.shape[0] if spec.transpose_w else w.shape[1]


def _bias_vector(b, n: int, dtype) -> Array:
    """The bias as an (N,) vector: it may arrive as (N,), (1, N), (1, 1, N) or a scalar."""
    b = jnp.asarray(b, dtype)
    return jnp.broadcast_to(jnp.reshape(b, (-1,)), (n,)) if b.size == 1 else jnp.reshape(b, (n,))


def _reference(x, w, b, spec: LinearSpec):
    """XLA: f32 accumulation, bias and activation in f32, one cast at the end."""
    if spec.replay is not None:
        return spec.replay(x, w, b)
    acc = jnp.promote_types(spec.out_dtype, jnp.float32)
    z = lax.dot_general(
        x, w, _contract_dims(x.ndim, spec), precision=spec.precision, preferred_element_type=acc
    )
    if b is not None:
        z = z + _bias_vector(b, z.shape[-1], acc)
    act = get_activation(spec.activation)
    y = z if act is None else act.forward(z)
    return y.astype(spec.out_dtype), z.astype(spec.preactivation_dtype)


def _kernel(x, w, b, spec: LinearSpec, backend: str, interpret: bool, with_preactivation: bool):
    from jfuse.pallas import linear as pallas_linear

    if spec.precision is not None and spec.precision != lax.Precision.DEFAULT:
        raise NotImplementedError(f"precision={spec.precision} (the kernels use the default)")
    run = pallas_linear.linear_tpu if backend == "tpu" else pallas_linear.linear_triton
    n = _n_out(w, spec)

    def call(x, w, b):
        lead, k = x.shape[:-1], x.shape[-1]
        outs = run(
            jnp.reshape(x, (-1, k)),
            w,
            None if b is None else _bias_vector(b, n, spec.out_dtype),
            activation=spec.activation,
            rhs_transposed=spec.transpose_w,
            out_dtype=spec.out_dtype,
            return_preactivation=with_preactivation,
            interpret=interpret,
        )
        if not with_preactivation:
            return jnp.reshape(outs, lead + (n,)), None
        y, z = outs
        return (jnp.reshape(y, lead + (n,)),
                jnp.reshape(z, lead + (n,)).astype(spec.preactivation_dtype))

    key = ("linear", backend, interpret, with_preactivation, spec.activation, spec.transpose_w,
           str(spec.out_dtype), str(spec.preactivation_dtype))
    return cached_trace(key, call, x, w, b)


def _forward(x, w, b, spec: LinearSpec, with_preactivation: bool = True):
    """(y, z): the output and the pre-activation (None unless asked for), from the chosen
    implementation. Without the pre-activation the kernels write y alone."""

    def reference_with(spec_):
        def run(x, w, b):
            y, z = _reference(x, w, b, spec_)
            return y, (z if with_preactivation else None)

        return run

    def kernel(backend: str, interpret: bool):
        return functools.partial(_kernel, spec=spec, backend=backend, interpret=interpret,
                                 with_preactivation=with_preactivation)

    weight_role = _partitionable.WEIGHT_NK if spec.transpose_w else _partitionable.WEIGHT_KN
    return dispatch(spec.implementation, OpCall(
        pattern="linear",
        operands=(x, w, b),
        roles=(_partitionable.X, weight_role, _partitionable.BIAS),
        contracts_features=True,
        reference=reference_with(spec),
        # The replay is written for the global shapes; one shard runs the generic reference.
        local_reference=reference_with(dataclasses.replace(spec, replay=None)),
        kernel=kernel,
    ))


def _is_zero(t) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _preactivation_tangent(x, w, b, dx, dw, db, spec: LinearSpec, shape, dtype):
    """dz = dx·w + x·dw + db, skipping the terms whose tangent is zero."""
    dims = _contract_dims(x.ndim, spec)
    dz = None
    if not _is_zero(dx):
        dz = lax.dot_general(dx, w, dims, precision=spec.precision, preferred_element_type=dtype)
    if not _is_zero(dw):
        term = lax.dot_general(x, dw, dims, precision=spec.precision, preferred_element_type=dtype)
        dz = term if dz is None else dz + term
    if b is not None and not _is_zero(db):
        term = jnp.broadcast_to(_bias_vector(db, shape[-1], dtype), shape)
        dz = term if dz is None else dz + term
    return jnp.zeros(shape, dtype) if dz is None else dz.astype(dtype)


def _jvp_parts(spec: LinearSpec, primals, tangents):
    x, w, b = primals
    dx, dw, db = tangents
    y, z = _linear_with_preactivation(x, w, b, spec)
    dz = _preactivation_tangent(x, w, b, dx, dw, db, spec, z.shape, z.dtype)
    act = get_activation(spec.activation)
    if act is None:
        dy = dz.astype(y.dtype)
    elif act.derivative_mask is not None:
        dy = lax.select(act.derivative_mask(z), dz, lax.full_like(dz, 0)).astype(y.dtype)
    else:
        tangent = functools.partial(_activation_tangent, spec.activation, y.dtype)
        dy = recompute_in_backward(tangent)(z, dz)
    return (y, z), (dy, dz)


def _activation_tangent(activation: str, out_dtype, z, dz):
    """act'(z)·dz in z's dtype; under ``jax.checkpoint`` so ``grad`` saves ``z`` alone (as the
    unfused graph does) and recomputes the slope in the backward."""
    # In z's dtype, as the unfused graph's autodiff computes it (no f32 temporary of z's size).
    return (get_activation(activation).derivative(z) * dz).astype(out_dtype)


# Two custom_jvp functions: `_linear` computes y alone (no pre-activation written when nothing
# differentiates it); its JVP rule calls `_linear_with_preactivation`, itself a custom_jvp, so
# derivatives of any order never have to differentiate a kernel.
@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _linear_with_preactivation(x, w, b, spec: LinearSpec):
    return _forward(x, w, b, spec)


_linear_with_preactivation.defjvp(_jvp_parts, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _linear(x, w, b, spec: LinearSpec):
    return _forward(x, w, b, spec, with_preactivation=False)[0]


def _linear_jvp(spec, primals, tangents):
    (y, _), (dy, _) = _jvp_parts(spec, primals, tangents)
    return y, dy


_linear.defjvp(_linear_jvp, symbolic_zeros=True)


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
    replay: Replay | None = None,
) -> Array:
    """The op as the rewrite calls it (no argument checks: the pattern pass already did them)."""
    out_dtype = np.dtype(out_dtype if out_dtype is not None else jnp.result_type(x, w))
    spec = LinearSpec(
        activation=activation,
        transpose_w=transpose_w,
        out_dtype=out_dtype,
        preactivation_dtype=np.dtype(preactivation_dtype or out_dtype),
        precision=precision,
        implementation=implementation,
        replay=replay,
    )
    return _linear(x, w, b, spec)


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
