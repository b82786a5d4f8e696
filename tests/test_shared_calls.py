"""Repeated fused blocks share one traced function; different blocks never do."""

from __future__ import annotations

import importlib

import chex
import jax
import jax.numpy as jnp
from jax import lax
import pytest

import jfuse
from jfuse._jax import jaxpr as jx
from jfuse._jax.compat import inlined_at_lowering
from jfuse.config import FuseOptions
from jfuse.rewrite import Rewriter
from jfuse.shared_calls import inline_fused_calls, is_fused_call

op_wiring = importlib.import_module("jfuse.ops._op")  # where every fused op is dispatched


def _stack(n_layers):
    def f(x, w, b):
        for _ in range(n_layers):
            x = jnp.tanh(x @ w + b)
        return jnp.sum(x)

    return f


def _step(loss):
    def step(x, w, b):  # differentiates inside the traced function, as training steps do
        value, grads = jax.value_and_grad(loss, argnums=(1, 2))(x, w, b)
        return value, w - 0.1 * grads[0], b - 0.1 * grads[1]

    return step


@pytest.fixture
def op_traces(monkeypatch):
    """How many times the fused linear op was traced (each trace goes through ``dispatch``)."""
    calls = []
    original = op_wiring.dispatch

    def counting(implementation, call):
        if call.pattern == "linear":
            calls.append(1)
        return original(implementation, call)

    monkeypatch.setattr(op_wiring, "dispatch", counting)
    return calls


def test_identical_layers_are_traced_once_not_once_per_layer(rng, op_traces):
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 16)) / 4, jnp.float32)
    b = jnp.zeros(16)
    traces = {}
    for n in (2, 8):
        op_traces.clear()
        jitted = jfuse.jit(_step(_stack(n)))
        lowered = jitted.trace(x, w, b).lower().as_text()
        assert jitted.report.fused == {"linear": n}
        traces[n] = len(op_traces)
        # XLA sees the ops inline: the shared functions served the trace, not the program.
        assert "jfuse_fused" not in lowered and lowered.count("tanh") >= n
    # The first layer reads the argument (its type may differ); the rest share one function.
    assert 0 < traces[8] == traces[2] <= 2 * 2  # each distinct block: its primal and its JVP


def test_blocks_that_differ_get_their_own_function(rng, op_traces):
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
    assert len(op_traces) == 3  # the three linear blocks, each traced on its own


def test_a_shared_function_per_distinct_block():
    """Below the finished program (here: a rewrite inside another), sites with equal blocks
    call one function and different blocks call different ones."""
    x = jnp.ones((8, 16))
    w = jnp.ones((16, 16)) / 16
    rewriter = Rewriter(FuseOptions.create())

    def f(x, w):
        a = jnp.tanh(x @ w + 1.0)
        a = jnp.tanh(a @ w + 1.0)
        return jnp.tanh(a @ w + 2.0)

    closed = jax.make_jaxpr(f)(x, w)
    rewritten = rewriter.rewrite(closed.jaxpr, closed.consts)
    calls = [e for e in rewritten.jaxpr.eqns if is_fused_call(e)]
    assert len(calls) == 3
    # The first two blocks are equal but read different input types (an argument vs a result);
    # whichever way that falls, the third (bias 2.0) never shares with the others.
    assert calls[2].params["jaxpr"] is not calls[1].params["jaxpr"]
    assert calls[2].params["jaxpr"] is not calls[0].params["jaxpr"]
    inlined = inline_fused_calls(rewritten)
    # Inlined into the jaxpr, or (jax >= 0.12) marked to be inlined when lowered.
    assert all(inlined_at_lowering(e) for e in inlined.jaxpr.eqns if is_fused_call(e))
    chex.assert_trees_all_equal(jax.core.eval_jaxpr(inlined.jaxpr, inlined.consts, x, w),
                                [f(x, w)])


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
    step = _step(_stack(4))
    jitted = jfuse.jit(step)
    chex.assert_trees_all_close(jitted(x, w, b), jax.jit(step)(x, w, b), rtol=2e-5, atol=2e-5)
    assert jitted.report.fused == {"linear": 4}
    assert len(evaluations) == 1  # the loss only
    assert not retraces  # canonicalization edits jaxprs, it does not re-trace them


def test_inlining_calls_edits_the_jaxpr_at_every_level():
    inner = jax.jit(lambda a, b: jnp.tanh(a @ b) + 1.0)

    def f(x, w):
        y = inner(inner(x, w), w)

        def body(carry, _):
            return inner(carry, w), None

        return lax.scan(body, y, None, length=3)[0]

    x, w = jnp.ones((4, 8)) / 8, jnp.ones((8, 8)) / 8
    closed = jax.make_jaxpr(f)(x, w)
    inlined = jx.inline_call_equations(closed.jaxpr, lambda eqn: True)

    def calls(jaxpr):
        found = sum(e.primitive.name in ("jit", "pjit") for e in jaxpr.eqns)
        for e in jaxpr.eqns:
            for _, body in jx.jaxpr_params(e):
                for b in body if isinstance(body, tuple) else (body,):
                    found += calls(jx.open_and_consts(b)[0])
        return found

    assert calls(closed.jaxpr) >= 3 and calls(inlined) == 0
    got = jax.core.eval_jaxpr(inlined, closed.consts, x, w)
    chex.assert_trees_all_equal(got, [f(x, w)])
    assert jx.inline_call_equations(inlined, lambda eqn: True) is inlined  # nothing left to do
