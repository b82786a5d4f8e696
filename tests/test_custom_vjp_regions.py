"""Blocks inside a user's ``jax.custom_vjp`` region (their own wrappers, tokamax-style ops with a
``custom_vmap`` inside) are left alone, since their backward is user-defined, and each one is
named in the report: an ``OPAQUE_CUSTOM_VJP`` miss with its source line, the region and a hint.
The user's answer, forward and backward (their own backward, however it is written), is kept."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jfuse
from jfuse import MissReason

# The default run takes the first cases of these parametrized tests; the rest are slow
# cases, sampled (tests/conftest.py) and all run with JFUSE_SLOW=1.
DEFAULT_CASES = {
    "test_each_block_in_a_region_is_a_named_miss": 2,
}



def rms(x, w, eps=1e-6):
    return x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def linear_gelu(x, w, b):
    return jax.nn.gelu(x @ w + b)


def _true_vjp(f):
    """``f`` under a custom_vjp whose backward is ``f``'s own derivative."""
    wrapped = jax.custom_vjp(f)
    wrapped.defvjp(lambda *a: (f(*a), a), lambda a, g: jax.vjp(f, *a)[1](g))
    return wrapped


rms_vjp = _true_vjp(rms)
linear_gelu_vjp = _true_vjp(linear_gelu)


# tokamax's XLA ops: a custom_vjp whose forward is a custom_vmap (a batching rule of its own).
@jax.custom_batching.custom_vmap
def _rms_batched(x, w):
    return rms(x, w)


@_rms_batched.def_vmap
def _rms_batched_rule(axis_size, in_batched, x, w):
    if in_batched[1]:
        w = w[:, None, :]
    return rms(x, w), True


@jax.custom_vjp
def tokamax_style_rms(x, w):
    return _rms_batched(x, w)


tokamax_style_rms.defvjp(lambda x, w: (_rms_batched(x, w), (x, w)),
                         lambda res, g: jax.vjp(rms, *res)[1](g))


# A straight-through estimator: the backward is deliberately not the forward's derivative.
@jax.custom_vjp
def rms_straight_through(x, w):
    return rms(x, w)


rms_straight_through.defvjp(lambda x, w: (rms(x, w), w), lambda w, g: (g, jnp.zeros_like(w)))


def _args(rng, rows=8, hidden=64, out=32):
    x = jnp.asarray(rng.standard_normal((rows, hidden)) * 1.5 + 0.3, jnp.float32)
    w = jnp.asarray(rng.standard_normal(hidden) + 1.0, jnp.float32)
    m = jnp.asarray(rng.standard_normal((hidden, out)) / 8, jnp.float32)
    b = jnp.asarray(rng.standard_normal(out), jnp.float32)
    return x, w, m, b


def _assert_user_answers_kept(f, *args):
    """Forward bitwise, gradients (through the user's own backward) as jax.jit's."""
    chex.assert_trees_all_equal(jfuse.jit(f)(*args), jax.jit(f)(*args))
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(loss(jfuse.fuse(f)), argnums=argnums))(*args)
    want = jax.jit(jax.grad(loss(f), argnums=argnums))(*args)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


REGIONS = {
    "rms_norm in a custom_vjp": (lambda x, w, m, b: rms_vjp(x, w), "rms_norm", "rms"),
    "linear + gelu in a custom_vjp": (
        lambda x, w, m, b: linear_gelu_vjp(x, m, b), "linear", "linear_gelu"),
    "tokamax style (custom_vmap inside)": (
        lambda x, w, m, b: tokamax_style_rms(x, w), "rms_norm", "tokamax_style_rms"),
    "straight-through estimator": (
        lambda x, w, m, b: rms_straight_through(x, w), "rms_norm", "rms_straight_through"),
}


@pytest.mark.parametrize("region", list(REGIONS))
def test_each_block_in_a_region_is_a_named_miss(region, rng):
    f, pattern, function = REGIONS[region]
    args = _args(rng)
    report = jfuse.explain(f)(*args)
    assert report.fused == {}, str(report)
    assert [(m.pattern, m.reason) for m in report.missed] == [
        (pattern, MissReason.OPAQUE_CUSTOM_VJP)], str(report)
    miss = report.missed[0]
    assert "test_custom_vjp_regions.py" in miss.where, miss.where
    assert f"jfuse.ops.{pattern}" in miss.hint and "custom_vjp" in miss.hint, miss.hint
    assert f"custom_vjp {function!r} called at" in miss.detail, miss.detail
    assert "OPAQUE_CUSTOM_VJP" in str(report.to_dict()) and function in str(report)
    _assert_user_answers_kept(f, *args)


def test_the_straight_through_gradient_is_the_users(rng):
    x, w, _, _ = _args(rng)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    _, vjp = jax.vjp(jfuse.fuse(rms_straight_through), x, w)
    gx, gw = vjp(g)
    chex.assert_trees_all_equal(gx, g)  # the estimator passes the cotangent through as it is
    chex.assert_trees_all_equal(gw, jnp.zeros_like(w))


def test_vmap_of_a_tokamax_style_region_keeps_its_batching_rule(rng):
    x, w, _, _ = _args(rng)
    xs, ws = jnp.stack([x, 2 * x]), jnp.stack([w, w + 1])
    f = jax.vmap(tokamax_style_rms)
    report = jfuse.explain(f)(xs, ws)
    assert [m.reason for m in report.missed] == [MissReason.OPAQUE_CUSTOM_VJP], str(report)
    chex.assert_trees_all_equal(jfuse.jit(f)(xs, ws), jax.jit(f)(xs, ws))


def test_regions_in_a_scan_next_to_blocks_that_fuse(rng):
    x, w, m, b = _args(rng, hidden=32)

    def step(h, _):
        h = rms_vjp(h, w)  # left alone and named
        return jnp.tanh(h @ m + b), None  # fused

    f = lambda x: lax.scan(step, x, None, length=3)[0]
    report = jfuse.explain(f)(x)
    assert report.fused == {"linear": 1}, str(report)
    assert [(m.pattern, m.reason) for m in report.missed] == [
        ("rms_norm", MissReason.OPAQUE_CUSTOM_VJP)], str(report)
    chex.assert_trees_all_equal(jfuse.jit(f)(x), jax.jit(f)(x))


def test_a_region_without_a_pattern_is_not_reported(rng):
    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def clip(x, bound):
        return jnp.clip(x, -bound, bound)

    clip.defvjp(lambda x, bound: (clip(x, bound), None), lambda bound, _, g: (g,))
    x, w, _, _ = _args(rng)
    report = jfuse.explain(lambda x: jnp.sum(clip(x, 1.0) ** 2))(x)
    assert report.fused == {} and report.missed == [], str(report)


def test_several_blocks_in_one_region_are_each_named(rng):
    x, w, m, b = _args(rng)
    block = _true_vjp(lambda x, w, m, b: linear_gelu(rms(x, w), m, b))
    report = jfuse.explain(block)(x, w, m, b)
    assert sorted(m.pattern for m in report.missed) == ["linear", "rms_norm"], str(report)
    assert {m.reason for m in report.missed} == {MissReason.OPAQUE_CUSTOM_VJP}
    assert np.all([m.detail.endswith(")") for m in report.missed])
    _assert_user_answers_kept(block, x, w, m, b)
