"""Repeated fused blocks share one traced function; different blocks never do."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp

import jfuse
from jfuse.shared_calls import FUSED_CALL_PREFIX, is_fused_call


def _fused_functions(text: str) -> set[str]:
    return set(re.findall(r"func\.func\s+private\s+@(%s\w*)\(" % FUSED_CALL_PREFIX, text))


def _stack(n_layers):
    def f(x, w, b):
        for _ in range(n_layers):
            x = jnp.tanh(x @ w + b)
        return jnp.sum(x)

    return f


def test_identical_layers_share_one_function(rng):
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 16)) / 4, jnp.float32)
    b = jnp.zeros(16)
    shared = {}
    for n in (2, 8):
        jitted = jfuse.jit(jax.grad(_stack(n)))  # the forward rewritten, then differentiated
        assert jitted.report is None
        text = jitted.lower(x, w, b).as_text()
        assert jitted.report.fused == {"linear": n}
        shared[n] = _fused_functions(text)
    # The first layer reads the argument (its type may differ); the rest share a function.
    assert 1 <= len(shared[8]) == len(shared[2]) <= 2


def test_blocks_that_differ_get_their_own_function(rng):
    """Same shapes, different activation, eps or bias literal: nothing may be shared."""
    x = jnp.asarray(rng.standard_normal((5, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 16, 16)) / 4, jnp.float32)

    def rms(v, eps):
        return v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)

    def f(x, w):  # distinct operands of the same types, so CSE merges nothing
        a = jnp.tanh(x[0] @ w[0] + 1.0)
        b = jax.nn.gelu(x[1] @ w[1] + 1.0)
        c = jnp.tanh(x[2] @ w[2] + 2.0)
        d = rms(x[3], 1e-6)
        e = rms(x[4], 1e-2)
        return a, b, c, d, e

    fused = jfuse.jit(f)
    got = fused(x, w)
    chex.assert_trees_all_equal(got, jax.jit(f)(x, w))  # a wrongly shared function would differ
    assert sum(fused.report.fused.values()) == 5
    jaxpr = jax.make_jaxpr(jfuse.fuse(f))(x, w)
    assert sum(is_fused_call(e) for e in jaxpr.eqns) == 5
    assert len({id(e.params["jaxpr"]) for e in jaxpr.eqns if is_fused_call(e)}) == 5


def test_shared_function_gradients_match(rng):
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 16)) / 4, jnp.float32)
    b = jnp.asarray(rng.standard_normal(16), jnp.float32)
    f = _stack(4)
    got = jfuse.jit(jax.grad(jfuse.fuse(f), argnums=(0, 1, 2)))(x, w, b)
    want = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, w, b)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)


def test_training_step_is_re_traced_only_where_something_fused(rng, monkeypatch):
    """The differentiated loss is rewritten (one re-trace); the step around it, whose backward
    holds nothing left to fuse, is not traced again."""
    from jfuse import graph, rewrite

    evaluations, retraces = [], []
    original_evaluate = rewrite.Rewriter._evaluate
    monkeypatch.setattr(rewrite.Rewriter, "_evaluate",
                        lambda self, *a: evaluations.append(1) or original_evaluate(self, *a))
    original_canonical = graph._eval_canonical
    monkeypatch.setattr(graph, "_eval_canonical",
                        lambda *a: retraces.append(1) or original_canonical(*a))
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 16)) / 4, jnp.float32)
    b = jnp.zeros(16)
    loss = _stack(4)

    def step(x, w, b):
        value, grads = jax.value_and_grad(loss, argnums=(1, 2))(x, w, b)
        return value, w - 0.1 * grads[0], b - 0.1 * grads[1]

    jitted = jfuse.jit(step)
    chex.assert_trees_all_close(jitted(x, w, b), jax.jit(step)(x, w, b), rtol=2e-5, atol=2e-5)
    assert jitted.report.fused == {"linear": 4}
    assert len(evaluations) == 1  # the loss only
    assert len(retraces) <= 1  # the loss's canonicalization; the step's was already canonical
