"""`jfuse.ops.rms_norm` / `layer_norm`: numerics (incl. NaN/inf rows), the residual variants,
transforms, bad input, and the backward's live memory against the unfused norm."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfuse


def _reference(x, scale, bias, residual, eps, subtract_mean, offset=0.0):
    """float64 numpy reference from the same (rounded) inputs."""
    h = x if residual is None else (x + residual)  # rounded to x's dtype, as the user's add is
    h = np.asarray(h, np.float64)
    mean = h.mean(-1, keepdims=True) if subtract_mean else 0.0
    c = h - mean
    y = c / np.sqrt((c * c).mean(-1, keepdims=True) + eps)
    if scale is not None:
        y = y * (np.asarray(scale, np.float64) + offset)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y, h


def _inputs(rng, shape=(37, 100), dtype=jnp.float32):
    x = jnp.asarray(rng.standard_normal(shape) * 2 + 0.5, dtype)
    r = jnp.asarray(rng.standard_normal(shape), dtype)
    scale = jnp.asarray(rng.standard_normal(shape[-1]), dtype)
    bias = jnp.asarray(rng.standard_normal(shape[-1]), dtype)
    return x, r, scale, bias


def _tol(dtype, hidden):
    if dtype == jnp.bfloat16:  # one bf16 ulp of an O(few) output, plus f32 statistics error
        return dict(rtol=2**-7, atol=2**-6)
    return dict(rtol=1e-5, atol=5e-7 * np.sqrt(hidden) * 10)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_forward_matches_f64_reference(norm, with_residual, implementation, dtype, rng):
    x, r, scale, bias = _inputs(rng, dtype=dtype)
    residual = r if with_residual else None
    if norm == "rms":
        out = jfuse.ops.rms_norm(x, scale, eps=1e-6, residual=residual, implementation=implementation)
        want, h = _reference(x, scale, None, residual, 1e-6, False)
    else:
        out = jfuse.ops.layer_norm(x, scale, bias, eps=1e-5, residual=residual,
                                   implementation=implementation)
        want, h = _reference(x, scale, bias, residual, 1e-5, True)
    y = out[0] if with_residual else out
    assert y.dtype == dtype
    chex.assert_trees_all_close(np.asarray(y, np.float64), want, **_tol(dtype, x.shape[-1]))
    if with_residual:
        np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(x + r))


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_gemma_scale_offset(implementation, rng):
    x, _, scale, _ = _inputs(rng)
    got = jfuse.ops.rms_norm(x, scale, scale_offset=1.0, implementation=implementation)
    want, _ = _reference(x, scale, None, None, 1e-6, False, offset=1.0)
    chex.assert_trees_all_close(np.asarray(got, np.float64), want, **_tol(jnp.float32, 100))


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_nan_and_inf_rows_stay_nan_and_inf_like_unfused(implementation, rng):
    x, _, scale, bias = _inputs(rng, shape=(4, 64))
    x = x.at[1, 3].set(jnp.nan).at[2, 5].set(jnp.inf)
    got = jfuse.ops.layer_norm(x, scale, bias, implementation=implementation)
    m = x.mean(-1, keepdims=True)
    want = (x - m) * jax.lax.rsqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-5) * scale + bias
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[jnp.array([0, 3])], want[jnp.array([0, 3])], rtol=1e-5, atol=1e-5)


def _plain(x, scale, bias, residual, subtract_mean):
    h = x if residual is None else x + residual
    m = h.mean(-1, keepdims=True) if subtract_mean else 0.0
    y = (h - m) * jax.lax.rsqrt(((h - m) ** 2).mean(-1, keepdims=True) + 1e-5) * scale
    return (y + bias if bias is not None else y), h


@pytest.mark.parametrize("subtract_mean", [False, True], ids=["rms", "layer"])
@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_gradients_of_both_outputs(subtract_mean, implementation, rng):
    x, r, scale, bias = _inputs(rng, shape=(6, 32))
    bias = bias if subtract_mean else None

    def fused(x, r, scale):
        if subtract_mean:
            y, h = jfuse.ops.layer_norm(x, scale, bias, residual=r, implementation=implementation)
        else:
            y, h = jfuse.ops.rms_norm(x, scale, eps=1e-5, residual=r, implementation=implementation)
        return jnp.sum(jnp.sin(y) * jnp.cos(h))

    def plain(x, r, scale):
        y, h = _plain(x, scale, bias, r, subtract_mean)
        return jnp.sum(jnp.sin(y) * jnp.cos(h))

    chex.assert_trees_all_close(jax.grad(fused, (0, 1, 2))(x, r, scale),
                                jax.grad(plain, (0, 1, 2))(x, r, scale), rtol=1e-4, atol=1e-4)


TRANSFORMS = {
    "jvp": lambda f, a: jax.jvp(f, a, tuple(jnp.ones_like(v) for v in a)),
    "jacfwd": lambda f, a: jax.jacfwd(f, argnums=(0, 1))(*a),
    "hessian": lambda f, a: jax.hessian(lambda x: jnp.sum(f(x, a[1]) ** 3))(a[0]),
    "vmap": lambda f, a: jax.vmap(f, in_axes=(0, None))(jnp.stack([a[0], 3 * a[0]]), a[1]),
    "checkpoint": lambda f, a: jax.grad(lambda *v: jnp.sum(jax.checkpoint(f)(*v) ** 2),
                                        argnums=(0, 1))(*a),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("subtract_mean", [False, True], ids=["rms", "layer"])
def test_every_transform_agrees_with_the_unfused_function(transform, subtract_mean, rng):
    x, _, scale, _ = _inputs(rng, shape=(3, 8))
    if subtract_mean:
        fused = lambda x, s: jfuse.ops.layer_norm(x, s)
    else:
        fused = lambda x, s: jfuse.ops.rms_norm(x, s, eps=1e-5)
    plain = lambda x, s: _plain(x, s, None, None, subtract_mean)[0]
    chex.assert_trees_all_close(TRANSFORMS[transform](fused, (x, scale)),
                                TRANSFORMS[transform](plain, (x, scale)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: jfuse.ops.rms_norm(np.ones((2, 4)), np.ones(5)), ValueError, "scale must have shape"),
        (lambda: jfuse.ops.layer_norm(np.ones((2, 4)), None, np.ones(3)), ValueError, "bias"),
        (lambda: jfuse.ops.rms_norm(np.ones((2, 4)), residual=np.ones((2, 5))), ValueError, "residual"),
        (lambda: jfuse.ops.rms_norm(np.ones((2, 4), np.int32)), TypeError, "x must be a floating"),
        (lambda: jfuse.ops.rms_norm(np.ones((2, 4)), eps=-1.0), ValueError, "eps"),
        (lambda: jfuse.ops.layer_norm(np.ones((2, 4)), implementation="triton"), ValueError,
         "implementation"),
    ],
)
def test_bad_input_names_the_argument(call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()


def _temp_bytes(f, *args) -> int:
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("subtract_mean", [False, True], ids=["rms", "layer"])
def test_backward_keeps_no_more_live_memory_than_unfused(subtract_mean, rng):
    x, r, scale, _ = _inputs(rng, shape=(512, 256))

    def step(norm):
        def loss(x, r, scale):
            h = x
            for _ in range(3):
                y, h = norm(h, r, scale)
                h = h + jnp.tanh(y)
            return jnp.sum(h**2)

        return jax.grad(loss, argnums=(0, 2))

    if subtract_mean:
        fused = step(lambda h, r, s: jfuse.ops.layer_norm(h, s, residual=r))
    else:
        fused = step(lambda h, r, s: jfuse.ops.rms_norm(h, s, eps=1e-5, residual=r))
    plain = step(lambda h, r, s: _plain(h, s, None, r, subtract_mean))
    assert _temp_bytes(fused, x, r, scale) <= _temp_bytes(plain, x, r, scale)
