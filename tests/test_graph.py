"""Canonicalization by editing jaxprs gives exactly the jaxpr re-tracing gives, for real code."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jfuse import graph


def _layer_norm_flax(x, scale, bias):
    return nn.LayerNorm().apply({"params": {"scale": scale, "bias": bias}}, x)


def _rms_twice(x, scale):
    def rms(v):
        return v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + 1e-6) * scale

    return rms(x) + rms(x)  # the same block twice: CSE merges it


PROGRAMS = {
    "where relu (duplicate matmul, converted literal)":
        (lambda x, w, b: jnp.where(x @ w + b > 0, x @ w + b, 0.0), ((8, 16), (16, 32), (32,))),
    "silu and gelu (nested jits)":
        (lambda x, w: jax.nn.silu(x @ w) * jax.nn.gelu(x @ w), ((8, 16), (16, 32))),
    "flax LayerNorm (x - mean twice)": (_layer_norm_flax, ((8, 32), (32,), (32,))),
    "a block computed twice": (_rms_twice, ((8, 32), (32,))),
    "a closed-over constant": (lambda x: x @ jnp.arange(32.0).reshape(4, 8) + 1.0, ((3, 4),)),
    "jit inside a scan body (bodies are left for the rewriter)":
        (lambda x: jax.lax.scan(lambda c, _: (jax.nn.relu(c) * 2.0, None), x, None, length=2)[0],
         ((4, 4),)),
}


@pytest.mark.parametrize("consts_as_inputs", [False, True])
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_editing_matches_re_tracing(name, consts_as_inputs, monkeypatch):
    fn, shapes = PROGRAMS[name]
    closed = jax.make_jaxpr(fn)(*[jnp.ones(s) for s in shapes])
    edited = graph.canonicalize(closed.jaxpr, closed.consts, consts_as_inputs=consts_as_inputs)
    monkeypatch.setattr(graph, "_canonical_by_editing", lambda jaxpr: None)
    traced = graph.canonicalize(closed.jaxpr, closed.consts, consts_as_inputs=consts_as_inputs)
    assert str(edited.jaxpr) == str(traced.jaxpr)
    assert len(edited.consts) == len(traced.consts)
    if name != "jit inside a scan body (bodies are left for the rewriter)":
        assert not any(e.primitive.name in ("jit", "pjit") for e in edited.jaxpr.eqns)
