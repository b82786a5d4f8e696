"""``glu``: a gated linear unit, ``act(x·Wg + bg) ⊙ (x·Wu + bu)``, as one fused op.

SwiGLU (silu), GeGLU (gelu), ReGLU (relu) and GLU (sigmoid) are this op with different gates.
Unfused, XLA runs two GEMMs, writes both (M, N) products to memory and reads them back for the
gate. The kernels load each x tile once, keep two f32 accumulators and apply the gate before the
only write. The derivative is a ``jax.custom_jvp`` in plain primitives: under ``grad`` it keeps
``x``, the weights and two (M, N) arrays (``act'(g)·u`` and ``act(g)``), never the activation's
own intermediates.

Example::

    y = jfuse.ops.glu(x, w_gate, w_up, activation="silu")   # SwiGLU; x (..., K), w (K, N)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jfuse.ops import _partitionable
from jfuse.ops._autodiff import recompute_in_backward
from jfuse.ops._dispatch import check_implementation
from jfuse.ops._op import (FusedOp, OpSpec, apply, as_vector, is_zero, matmul_benchmark,
                           not_in_key)
from jfuse.pallas import glu as kernels
from jfuse.pallas._common import tpu_precision_reason
from jfuse.core.activations import get_activation

__all__ = ["glu"]

Array = jax.Array

# Where each of (w_gate, w_up, b_gate, b_up) comes from: (index into the op's params tuple, a
# linear selector such as "take the first half of the columns" or None for the param itself).
Source = tuple[int, Callable[[Any], Any] | None] | None


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class GluSpec(OpSpec):
    """Everything about one GLU call that is not an array. The replay is the user's own
    equations, ``(x, *params) -> (y, gate_pre, up_pre)``."""

    activation: str
    weights_transposed: bool  # weights are (N, K), contracted on dim 1
    out_dtype: Any
    # Selected from the params by the kernel's inputs (kernel_inputs), so not part of the key.
    sources: tuple[Source, Source, Source, Source] = not_in_key(())
    preactivation_dtype: Any = None  # dtype of the gate/up products (the matmuls' outputs)
    precision: Any = None


def _take(params: Sequence[Any], source: Source):
    if source is None:
        return None
    index, select = source
    value = params[index]
    if value is None or isinstance(value, SymbolicZero):
        return None
    return value if select is None else select(value)


def _operands(params, spec: GluSpec):
    return tuple(_take(params, s) for s in spec.sources)


def _dims(x_ndim: int, spec: GluSpec):
    return (((x_ndim - 1,), (1 if spec.weights_transposed else 0,)), ((), ()))


def _param_roles(spec: GluSpec, count: int) -> tuple[str, ...]:
    """What each param is, for the sharding rules: a weight or bias used as it is, or one the
    op slices (a fused (K, 2N) weight), which must not be split along its output features."""
    roles: list[str | None] = [None] * count
    for which, source in enumerate(spec.sources):  # (w_gate, w_up, b_gate, b_up)
        if source is None:
            continue
        index, select = source
        if which < 2:
            if select is None:
                role = (_partitionable.WEIGHT_NK if spec.weights_transposed
                        else _partitionable.WEIGHT_KN)
            else:
                role = (_partitionable.FUSED_WEIGHT_NK if spec.weights_transposed
                        else _partitionable.FUSED_WEIGHT)
        else:
            role = _partitionable.BIAS if select is None else _partitionable.FUSED_BIAS
        roles[index] = role
    return tuple(role or _partitionable.FUSED_BIAS for role in roles)


def _branch_tangent(x, dx, w, dw, db, spec: GluSpec, shape, dtype):
    """d(x·w + b) = dx·w + x·dw + db, skipping zero terms."""
    dims = _dims(x.ndim, spec)
    terms = []
    if not is_zero(dx):
        terms.append(lax.dot_general(dx, w, dims, precision=spec.precision,
                                     preferred_element_type=dtype))
    if dw is not None:
        terms.append(lax.dot_general(x, dw, dims, precision=spec.precision,
                                     preferred_element_type=dtype))
    if db is not None:
        terms.append(jnp.broadcast_to(jnp.reshape(db, (-1,)).astype(dtype), shape))
    if not terms:
        return None
    return functools.reduce(lambda a, b: a + b, terms).astype(dtype)


def _gated_tangent(activation: str, out_dtype, g, u, dg, du):
    """dy = act'(g)·u·dg + act(g)·du, in the products' dtype.

    Called under ``jax.checkpoint``: ``grad`` then saves ``g`` and ``u`` (the two products, as
    the unfused MLP does) and recomputes the gate's slope in the backward, instead of saving
    extra (M, N) arrays.
    """
    # In the products' own dtype, as the unfused graph's autodiff computes it: an f32 copy of
    # the slope would be a materialized (M, N) f32 temporary in the backward.
    act = get_activation(activation)
    terms = []
    if dg is not None:
        terms.append(act.derivative(g) * u * dg)
    if du is not None:
        terms.append(act.forward(g) * du)
    if not terms:
        return jnp.zeros(g.shape, out_dtype)
    return functools.reduce(lambda a, b: a + b, terms).astype(out_dtype)


def _mkn(avals, spec: GluSpec) -> tuple[int, int, int]:
    x, w_gate = avals[0], avals[1]
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    return m, x.shape[-1], w_gate.shape[0] if spec.weights_transposed else w_gate.shape[1]


class Glu(FusedOp):
    """``act(x·Wg + bg) ⊙ (x·Wu + bu)``. Operands ``(x, *params)`` with the weights and biases
    selected from ``params`` by ``spec.sources`` (a fused gate/up weight is sliced); full outputs
    ``(y, g, u)``, the two products being what the derivative needs."""

    name = "glu"

    def kernel_inputs(self, spec: GluSpec, operands):
        return (operands[0], *_operands(operands[1:], spec))

    def reference(self, spec: GluSpec, operands, full):
        x, params = operands[0], operands[1:]
        if spec.replay is not None:
            y, g, u = spec.replay(x, *params)
        else:
            w_gate, w_up, b_gate, b_up = _operands(params, spec)
            acc = jnp.promote_types(spec.out_dtype, jnp.float32)
            dims = _dims(x.ndim, spec)
            g = lax.dot_general(x, w_gate, dims, precision=spec.precision,
                                preferred_element_type=acc)
            u = lax.dot_general(x, w_up, dims, precision=spec.precision,
                                preferred_element_type=acc)
            if b_gate is not None:
                g = g + b_gate.astype(acc)
            if b_up is not None:
                u = u + b_up.astype(acc)
            y = (get_activation(spec.activation).forward(g) * u).astype(spec.out_dtype)
            g, u = g.astype(spec.preactivation_dtype), u.astype(spec.preactivation_dtype)
        return (y, g, u) if full else (y, None, None)

    def kernel(self, spec: GluSpec, inputs, backend, interpret, full):
        x, w_gate, w_up, b_gate, b_up = inputs
        lead, k = x.shape[:-1], x.shape[-1]
        m, _, n = _mkn(inputs, spec)
        outs = kernels.glu(
            jnp.reshape(x, (m, k)), w_gate, w_up, as_vector(b_gate, n), as_vector(b_up, n),
            backend=backend, activation=spec.activation,
            weights_transposed=spec.weights_transposed, out_dtype=spec.out_dtype,
            return_preactivations=full, interpret=interpret, precision=spec.precision,
        )
        shape, pre = lead + (n,), spec.preactivation_dtype
        if not full:
            return jnp.reshape(outs, shape), None, None
        y, g, u = outs
        return (jnp.reshape(y, shape), jnp.reshape(g, shape).astype(pre),
                jnp.reshape(u, shape).astype(pre))

    def unsupported_reason(self, spec: GluSpec, platform, avals):
        if platform == "tpu" and (reason := tpu_precision_reason(spec.precision)):
            return reason
        refuse = (kernels.tpu_unsupported_reason if platform == "tpu"
                  else kernels.triton_unsupported_reason)
        return refuse(*_mkn(avals, spec), avals[0].dtype)

    def unprofitable_reason(self, spec: GluSpec, platform, avals):
        return kernels.profitability_reason("tpu" if platform == "tpu" else "gpu",
                                            *_mkn(avals, spec), avals[0].dtype,
                                            precision=spec.precision)

    def tangents(self, spec: GluSpec, operands, tangents, full_outputs):
        x, params = operands[0], operands[1:]
        dx, dparams = tangents[0], tangents[1:]
        y, g, u = full_outputs
        w_gate, w_up, _, _ = _operands(params, spec)
        dw_gate, dw_up, db_gate, db_up = _operands(dparams, spec)
        dg = _branch_tangent(x, dx, w_gate, dw_gate, db_gate, spec, g.shape, g.dtype)
        du = _branch_tangent(x, dx, w_up, dw_up, db_up, spec, u.shape, u.dtype)
        dy = recompute_in_backward(functools.partial(_gated_tangent, spec.activation, y.dtype))(
            g, u, dg, du)
        zeros = lambda a: jnp.zeros(a.shape, a.dtype)
        return dy, (zeros(g) if dg is None else dg), (zeros(u) if du is None else du)

    def roles(self, spec: GluSpec, operands):
        return (_partitionable.X, *_param_roles(spec, len(operands) - 1))


GLU = Glu()


def _spec(*, activation, sources, weights_transposed=False, out_dtype, preactivation_dtype=None,
          precision=None, implementation=None, replay=None) -> GluSpec:
    out_dtype = np.dtype(out_dtype)
    return GluSpec(activation=activation, weights_transposed=weights_transposed,
                   out_dtype=out_dtype, sources=tuple(sources),
                   preactivation_dtype=np.dtype(preactivation_dtype or out_dtype),
                   precision=precision, implementation=implementation, replay=replay)


def fused_glu(x, params: tuple, *, activation: str, sources, weights_transposed: bool = False,
              out_dtype=None, preactivation_dtype=None, precision=None, implementation=None,
              replay=None) -> Array:
    """The op as the rewrite calls it: weights and biases selected from ``params`` by ``sources``."""
    spec = _spec(activation=activation, sources=sources, weights_transposed=weights_transposed,
                 out_dtype=out_dtype if out_dtype is not None else x.dtype,
                 preactivation_dtype=preactivation_dtype, precision=precision,
                 implementation=implementation, replay=replay)
    return apply(GLU, spec, x, *params)


def glu_refusals(x_aval, param_avals, **spec_fields) -> dict[str, str]:
    """Per lowering platform, why its kernel will not run this GLU (see
    :meth:`FusedOp.refusals`); ``spec_fields`` as :func:`fused_glu` takes them."""
    spec_fields.setdefault("out_dtype", x_aval.dtype)
    return GLU.refusals(_spec(**spec_fields), [x_aval, *param_avals])


def _check(name: str, a, ndim=None, shape=None) -> None:
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"jfuse.ops.glu: {name} must be a floating array, got dtype {a.dtype}.")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"jfuse.ops.glu: {name} must be {ndim}-D, got shape {a.shape}.")
    if shape is not None and a.shape != shape:
        raise ValueError(f"jfuse.ops.glu: {name} must have shape {shape}, got {a.shape}.")


def glu(
    x: Array,
    w_gate: Array,
    w_up: Array,
    *,
    activation: str = "silu",
    b_gate: Array | None = None,
    b_up: Array | None = None,
    implementation: str | None = None,
) -> Array:
    """``activation(x @ w_gate + b_gate) * (x @ w_up + b_up)`` as one fused op.

    Args:
      x: activations, shape ``(..., K)``, floating.
      w_gate, w_up: weights, shape ``(K, N)`` each (pass ``w.T`` for torch-style ``(N, K)``).
      activation: the gate: ``"silu"`` (SwiGLU), ``"gelu_tanh"``/``"gelu"`` (GeGLU), ``"relu"``
        (ReGLU), ``"sigmoid"`` (GLU), or any name in ``jfuse.ops.ACTIVATIONS``.
      b_gate, b_up: optional biases, shape ``(N,)``.
      implementation: as for :func:`jfuse.ops.linear`. Where the fused kernel is expected to lose
        to XLA (see ``jfuse.pallas.glu.profitability_reason``) ``None`` uses XLA; ``"pallas"``
        runs the kernel wherever it can.

    Returns:
      ``(..., N)`` in ``result_type(x, w_gate, w_up)``; f32 accumulation and gating.

    Example::

        >>> x, wg, wu = jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((8, 16))
        >>> jfuse.ops.glu(x, wg, wu, activation="silu").shape
        (4, 16)
    """
    check_implementation(implementation)
    if activation is None:
        raise ValueError("jfuse.ops.glu: activation=None is not a gate; use jfuse.ops.linear.")
    get_activation(activation)
    x, w_gate, w_up = jnp.asarray(x), jnp.asarray(w_gate), jnp.asarray(w_up)
    _check("x", x)
    if x.ndim < 1:
        raise ValueError(f"jfuse.ops.glu: x must have at least 1 dimension, got shape {x.shape}.")
    _check("w_gate", w_gate, ndim=2)
    _check("w_up", w_up, shape=w_gate.shape)
    if x.shape[-1] != w_gate.shape[0]:
        raise ValueError(
            f"jfuse.ops.glu: x's last dim ({x.shape[-1]}) must equal the weights' first dim "
            f"({w_gate.shape[0]}); got x {x.shape} and w_gate {w_gate.shape}."
        )
    n = w_gate.shape[1]
    dtype = jnp.result_type(x, w_gate, w_up)
    biases = []
    for name, b in (("b_gate", b_gate), ("b_up", b_up)):
        if b is not None:
            b = jnp.asarray(b)
            _check(name, b, shape=(n,))
            b = b.astype(dtype)
        biases.append(b)
    params = (w_gate.astype(dtype), w_up.astype(dtype), *biases)
    sources = ((0, None), (1, None), None if biases[0] is None else (2, None),
               None if biases[1] is None else (3, None))
    return fused_glu(x.astype(dtype), params, activation=activation, sources=sources,
                     implementation=implementation)


def _benchmark_inputs(shape, dtype, normal):
    m, k, n = shape
    return normal((m, k)), normal((k, n), 1 / np.sqrt(k)), normal((k, n), 1 / np.sqrt(k))


# Beside the op, what benchmarks/ops.py times: a SwiGLU at the sizes of each preset. On GPU the
# K of the accelerator sizes straddles GPU_MAX_PROFITABLE_K (XLA runs above it); the device
# check's sizes place that threshold (it forces the kernel with implementation="pallas").
BENCHMARKS = (matmul_benchmark(
    "glu", products=2, inputs=_benchmark_inputs,
    call=lambda implementation, gate: (
        lambda x, wg, wu: glu(x, wg, wu, activation=gate, implementation=implementation)),
    sizes={
        "quick": (((64, 32, 96), "silu"),),
        "cpu": (((1024, 512, 1376), "silu"),),
        "accelerator": (((8192, 4096, 11008), "silu"), ((16384, 384, 1536), "silu")),
        "device": (((8192, 384, 1536), "silu"), ((8192, 1024, 4096), "silu"),
                   ((8192, 4096, 11008), "silu")),
    },
),)
