"""`jfuse._jax.kernel_transpose`: a plain-JAX tangent whose backward runs a given (kernel) VJP.

A toy op, ``sin``, whose tangent is written in plain JAX and whose "kernel" backward is the exact
transpose times ``BACKWARD_SCALE``: at 1 every transform must give ``sin``'s own derivatives, and
moving the scale shows which transforms really run the backward (reverse mode must; forward mode
must not). Second-order derivatives differentiate the residuals, which JAX's own ``linear_call``
refuses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfuse._jax.kernel_transpose import kernel_transposed

STATE = {"scale": 1.0}


def _tangent(res, lin):
    (x,), (dx,) = res, lin
    return (jnp.cos(x) * dx,)


def _backward(res, ct):
    (x,), (c,) = res, ct
    return (STATE["scale"] * jnp.cos(x) * c,)


@jax.custom_jvp
def toy_sin(x):
    return jnp.sin(x)


@toy_sin.defjvp
def _toy_sin_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    like = (jax.ShapeDtypeStruct(x.shape, x.dtype),)
    return jnp.sin(x), kernel_transposed(_tangent, _backward, (x,), (dx,), like)[0]


X = jnp.linspace(0.0, 2.0, 5)
V = jnp.full(5, 0.5)


def _loss(fn):
    return lambda x: jnp.sum(fn(x) ** 2)


TRANSFORMS = {
    # name: (function of the op, whether reverse mode runs the backward)
    "grad": (lambda f: jax.grad(_loss(f))(X), True),
    "jit_grad": (lambda f: jax.jit(jax.grad(_loss(f)))(X), True),
    "vjp": (lambda f: jax.vjp(f, X)[1](V)[0], True),
    "jacrev": (lambda f: jax.jacrev(f)(X), True),
    "vmap_grad": (lambda f: jax.vmap(jax.grad(lambda s: jnp.sum(f(s * X) ** 2)))(
        jnp.arange(3.0)), True),
    "grad_vmap": (lambda f: jax.grad(lambda x: jnp.sum(jax.vmap(f)(jnp.stack([x, 2 * x])) ** 2))(
        X), True),
    "checkpoint_grad": (lambda f: jax.grad(jax.checkpoint(_loss(f)))(X), True),
    "scan_grad": (lambda f: jax.grad(lambda x: jnp.sum(jax.lax.scan(
        lambda c, _: (f(c), None), x, None, length=3)[0]))(X), True),
    "hvp": (lambda f: jax.jit(lambda x, v: jax.jvp(jax.grad(_loss(f)), (x,), (v,))[1])(X, V),
            True),
    "grad_of_grad": (lambda f: jax.grad(lambda x: jnp.sum(jax.grad(_loss(f))(x) ** 2))(X), True),
    "hessian": (lambda f: jax.hessian(_loss(f))(X), True),
    "jvp": (lambda f: jax.jit(lambda x, v: jax.jvp(f, (x,), (v,))[1])(X, V), False),
    "jacfwd": (lambda f: jax.jacfwd(f)(X), False),
    "linearize": (lambda f: jax.linearize(f, X)[1](V), False),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_every_transform_matches_the_plain_derivative(name, monkeypatch):
    transform, runs_backward = TRANSFORMS[name]
    want = transform(jnp.sin)
    monkeypatch.setitem(STATE, "scale", 1.0)
    np.testing.assert_allclose(transform(toy_sin), want, rtol=1e-6, atol=1e-6)
    # A wrong backward shows wherever the transform runs it, and nowhere else.
    monkeypatch.setitem(STATE, "scale", 2.0)
    moved = not np.allclose(transform(toy_sin), want, rtol=1e-6, atol=1e-6)
    assert moved == runs_backward


def _two_outputs(x, backward):
    """(sin x, x²) as one op; its backward reads only the first output's cotangent."""

    @jax.custom_jvp
    def op(x):
        return jnp.sin(x), x * x

    @op.defjvp
    def op_jvp(primals, tangents):
        (x,), (dx,) = primals, tangents
        like = (jax.ShapeDtypeStruct(x.shape, x.dtype),) * 2
        outs = kernel_transposed(
            lambda res, lin: (jnp.cos(res[0]) * lin[0], 2 * res[0] * lin[0]),
            backward, (x,), (dx,), like, kernel_outputs=(True, False))
        return op(x), outs

    return op(x)


def test_a_cotangent_the_kernel_cannot_take_uses_the_plain_transpose():
    def backward(res, ct):
        return (jnp.cos(res[0]) * ct[0] * 100.0,)  # wrong on purpose: it must not run below

    only_first = jax.grad(lambda x: jnp.sum(_two_outputs(x, backward)[0]))(X)
    np.testing.assert_allclose(only_first, 100.0 * jnp.cos(X), rtol=1e-6)  # the kernel's
    both = jax.grad(lambda x: jnp.sum(_two_outputs(x, backward)[0] + _two_outputs(
        x, backward)[1]))(X)
    np.testing.assert_allclose(both, 100.0 * jnp.cos(X) + 2 * X, rtol=1e-6)
    second_only = jax.grad(lambda x: jnp.sum(_two_outputs(x, backward)[1]))(X)
    np.testing.assert_allclose(second_only, 2 * X, rtol=1e-6)  # the plain transpose


def test_a_backward_per_platform_runs_the_plain_transpose_elsewhere():
    # A backward given for "cuda" and "tpu" only: this CPU program runs the plain transpose.
    wrong = lambda res, ct: (100.0 * jnp.cos(res[0]) * ct[0],)  # noqa: E731

    @jax.custom_jvp
    def op(x):
        return jnp.sin(x)

    @op.defjvp
    def op_jvp(primals, tangents):
        (x,), (dx,) = primals, tangents
        like = (jax.ShapeDtypeStruct(x.shape, x.dtype),)
        return op(x), kernel_transposed(_tangent, {"cuda": wrong, "tpu": wrong}, (x,), (dx,),
                                        like)[0]

    got = jax.jit(jax.grad(lambda x: jnp.sum(op(x))))(X)
    np.testing.assert_allclose(got, jnp.cos(X), rtol=1e-6)
    # Lowered for each platform: the given backward (its factor 100) only where it was given.
    traced = jax.jit(jax.grad(lambda x: jnp.sum(op(x)))).trace(X)
    for platform, runs_given in (("tpu", True), ("cuda", True), ("cpu", False)):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert ("1.000000e+02" in text) == runs_given, platform
