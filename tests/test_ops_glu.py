"""`jfuse.ops.glu`: numerics of every implementation and gate, transforms, bad input, and the
backward's live memory against the unfused MLP."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfuse

from conftest import tolerance

GATES = {
    "silu": jax.nn.silu,
    "gelu_tanh": jax.nn.gelu,
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
}


def _unfused(x, wg, wu, bg, bu, gate):
    f32 = lambda a: None if a is None else a.astype(jnp.float32)
    g = jnp.dot(f32(x), f32(wg), precision="highest") + (0 if bg is None else f32(bg))
    u = jnp.dot(f32(x), f32(wu), precision="highest") + (0 if bu is None else f32(bu))
    return GATES[gate](g) * u


def _inputs(rng, lead=(37,), k=45, n=53, dtype=jnp.float32, biases=(True, False)):
    x = jnp.asarray(rng.standard_normal(lead + (k,)), dtype)
    wg = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    wu = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    bg = jnp.asarray(rng.standard_normal(n), dtype) if biases[0] else None
    bu = jnp.asarray(rng.standard_normal(n), dtype) if biases[1] else None
    return x, wg, wu, bg, bu


@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_forward_matches_f32_reference(gate, implementation, dtype, rng):
    x, wg, wu, bg, bu = _inputs(rng, lead=(2, 37), dtype=dtype, biases=(True, True))
    got = jfuse.ops.glu(x, wg, wu, activation=gate, b_gate=bg, b_up=bu,
                        implementation=implementation)
    assert got.shape == (2, 37, 53) and got.dtype == dtype
    want = _unfused(x, wg, wu, bg, bu, gate)
    # The product's error is bounded by both factors' errors: scale atol by the output size.
    tol = tolerance(dtype)
    tol["atol"] *= max(1.0, float(jnp.max(jnp.abs(want))))
    chex.assert_trees_all_close(got.astype(jnp.float32), want, **tol)


@pytest.mark.parametrize("gate", ["silu", "gelu", "sigmoid"])
@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_gradients_match_the_unfused_function(gate, implementation, rng):
    x, wg, wu, bg, bu = _inputs(rng, biases=(True, True))
    fused = lambda *a: jnp.sum(jnp.sin(jfuse.ops.glu(a[0], a[1], a[2], activation=gate, b_gate=a[3],
                                                     b_up=a[4], implementation=implementation)))
    plain = lambda *a: jnp.sum(jnp.sin(_unfused(*a, gate)))
    argnums = (0, 1, 2, 3, 4)
    chex.assert_trees_all_close(jax.grad(fused, argnums)(x, wg, wu, bg, bu),
                                jax.grad(plain, argnums)(x, wg, wu, bg, bu), rtol=1e-4, atol=1e-4)


TRANSFORMS = {
    "jvp": lambda f, a: jax.jvp(f, a, tuple(jnp.ones_like(v) for v in a)),
    "jacrev": lambda f, a: jax.jacrev(f, argnums=(0, 1, 2))(*a),
    "hessian": lambda f, a: jax.hessian(lambda x: jnp.sum(f(x, *a[1:]) ** 2))(a[0]),
    "vmap": lambda f, a: jax.vmap(f, in_axes=(0, None, None))(jnp.stack([a[0], -a[0]]), a[1], a[2]),
    "checkpoint": lambda f, a: jax.grad(lambda *v: jnp.sum(jax.checkpoint(f)(*v) ** 2),
                                        argnums=(0, 1, 2))(*a),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_every_transform_agrees_with_the_unfused_function(transform, rng):
    x, wg, wu, _, _ = _inputs(rng, lead=(3,), k=5, n=4)
    fused = lambda x, wg, wu: jfuse.ops.glu(x, wg, wu, activation="silu")
    plain = lambda x, wg, wu: _unfused(x, wg, wu, None, None, "silu")
    chex.assert_trees_all_close(TRANSFORMS[transform](fused, (x, wg, wu)),
                                TRANSFORMS[transform](plain, (x, wg, wu)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(x=np.ones((3, 4)), w_gate=np.ones((5, 6)), w_up=np.ones((5, 6))), ValueError,
         "x's last dim"),
        (dict(x=np.ones((3, 4)), w_gate=np.ones((4, 6)), w_up=np.ones((4, 7))), ValueError, "w_up"),
        (dict(x=np.ones((3, 4)), w_gate=np.ones((4, 6)), w_up=np.ones((4, 6)), b_up=np.ones(5)),
         ValueError, "b_up"),
        (dict(x=np.ones((3, 4), np.int32), w_gate=np.ones((4, 6)), w_up=np.ones((4, 6))), TypeError,
         "x must be a floating"),
        (dict(x=np.ones((3, 4)), w_gate=np.ones((4, 6)), w_up=np.ones((4, 6)), activation=None),
         ValueError, "not a gate"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        jfuse.ops.glu(**kwargs)


def _temp_bytes(f, *args) -> int:
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def swiglu_mlp_step(glu):
    """Training step of a 2-layer SwiGLU MLP stack (gate/up/down), returning the grads."""

    def loss(params, x):
        for wg, wu, wd in params:
            x = x + glu(x, wg, wu) @ wd
        return jnp.mean(x**2)

    return jax.grad(loss)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_swiglu_backward_keeps_no_more_live_memory_than_unfused(dtype, rng):
    d, f = 128, 512
    params = [tuple(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), dtype)
                    for s in ((d, f), (d, f), (f, d))) for _ in range(2)]
    x = jnp.asarray(rng.standard_normal((256, d)), dtype)
    fused = swiglu_mlp_step(lambda x, wg, wu: jfuse.ops.glu(x, wg, wu, activation="silu"))
    plain = swiglu_mlp_step(lambda x, wg, wu: jax.nn.silu(x @ wg) * (x @ wu))
    assert _temp_bytes(fused, params, x) <= _temp_bytes(plain, params, x)
