"""Activation functions a fused op can apply in its epilogue, with their derivatives.

Each activation is written twice on purpose: ``forward`` is the value, in plain ``jax.lax`` /
``jax.numpy`` primitives that every backend lowers (the XLA reference, the TPU kernel and, except
for exact GELU, the Triton kernel all call it); ``derivative`` is ``d act / dz`` in plain
primitives, used by the fused ops' JVP rules so that autodiff never has to differentiate a kernel.

Names are stable: they are what ``jfuse.ops.linear(..., activation=...)`` accepts and what the
fusion report prints. The table lives in :mod:`jfuse.core` because the ops, their Pallas kernels
and the passes all name activations; it imports nothing from jfuse, so none of them has to
import another layer for it. ``jfuse.ops.ACTIVATIONS`` is the public name of the same table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise activation: its value and its derivative, both in plain primitives."""

    name: str
    forward: Callable[[Array], Array]
    derivative: Callable[[Array], Array]
    description: str
    # For a derivative that is 1 where a predicate holds and 0 elsewhere (ReLU): the predicate.
    # Autodiff then keeps a boolean mask, 1 byte per element, instead of the pre-activation.
    derivative_mask: Callable[[Array], Array] | None = None


def _relu(z: Array) -> Array:
    return jnp.maximum(z, jnp.zeros((), z.dtype))


def _relu_derivative(z: Array) -> Array:
    # jax.nn.relu's custom JVP: the derivative at exactly 0 is 0.
    return (z > 0).astype(z.dtype)


def _relu_max_derivative(z: Array) -> Array:
    # lax.max's JVP splits a tie evenly, so `jnp.maximum(z, 0)` has derivative 0.5 at 0.
    one, half, zero = (jnp.asarray(v, z.dtype) for v in (1.0, 0.5, 0.0))
    return jnp.where(z > 0, one, jnp.where(z == 0, half, zero))


def _gelu_tanh(z: Array) -> Array:
    # Same expression as jax.nn.gelu(approximate=True), so the XLA path reproduces it exactly.
    c = jnp.asarray(_SQRT_2_OVER_PI, z.dtype)
    cdf = 0.5 * (1.0 + jnp.tanh(c * (z + _GELU_CUBIC * (z**3))))
    return z * cdf


def _gelu_tanh_derivative(z: Array) -> Array:
    c = jnp.asarray(_SQRT_2_OVER_PI, z.dtype)
    t = jnp.tanh(c * (z + _GELU_CUBIC * (z**3)))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * _GELU_CUBIC * z * z)


def _gelu_exact(z: Array) -> Array:
    # erf, not jax.nn.gelu's erfc: erfc has no Pallas TPU lowering, erf does.
    return 0.5 * z * (1.0 + lax.erf(z * jnp.asarray(_SQRT_HALF, z.dtype)))


def _gelu_exact_derivative(z: Array) -> Array:
    # erfc here (the derivative runs in XLA, never in a kernel): `1 + erf` cancels for negative z,
    # an absolute error of an f32 eps where the CDF is tiny, which saturated gates multiply up
    # (11x jax.jit's weight-gradient error in the fuzzer's long run). jax.nn.gelu uses erfc too.
    cdf = 0.5 * lax.erfc(-z * jnp.asarray(_SQRT_HALF, z.dtype))
    pdf = jnp.exp(-0.5 * z * z) * jnp.asarray(_INV_SQRT_2PI, z.dtype)
    return cdf + z * pdf


def _silu(z: Array) -> Array:
    return z * lax.logistic(z)


def _silu_derivative(z: Array) -> Array:
    s = lax.logistic(z)
    return s * (1.0 + z * (1.0 - s))


def _sigmoid_derivative(z: Array) -> Array:
    s = lax.logistic(z)
    return s * (1.0 - s)


def _tanh_derivative(z: Array) -> Array:
    t = jnp.tanh(z)
    return 1.0 - t * t


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("relu", _relu, _relu_derivative, "max(z, 0); derivative 0 at 0 (jax.nn.relu)",
                   derivative_mask=lambda z: z > 0),
        Activation(
            "relu_max",
            _relu,
            _relu_max_derivative,
            "max(z, 0); derivative 0.5 at 0 (jnp.maximum's tie rule)",
        ),
        Activation("gelu_tanh", _gelu_tanh, _gelu_tanh_derivative, "gelu, tanh approximation"),
        Activation("gelu", _gelu_exact, _gelu_exact_derivative, "exact gelu, 0.5 z (1 + erf(z/√2))"),
        Activation("silu", _silu, _silu_derivative, "z · sigmoid(z), a.k.a. swish"),
        Activation("sigmoid", lax.logistic, _sigmoid_derivative, "1 / (1 + exp(-z))"),
        Activation("tanh", jnp.tanh, _tanh_derivative, "tanh(z)"),
    )
}


def get_activation(name: str | None, *, argname: str = "activation") -> Activation | None:
    """Look up an activation by name; ``None`` means no activation."""
    if name is None:
        return None
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"{argname}={name!r} is not supported; expected None or one of {sorted(ACTIVATIONS)}."
        )
    return ACTIVATIONS[name]
