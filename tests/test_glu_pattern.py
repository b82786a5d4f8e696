"""The `glu` pattern on real model code: each form fuses once, matches jax.jit forward and backward,
lowers to one kernel per GLU, and the near-misses stay unfused with the right reason."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jfuse
from jfuse import MissReason

from conftest import assert_same_answers
from lowering import count_kernel_calls, lower_for


def _w(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), dtype)


def test_flax_linen_llama_mlp(rng):
    nn = pytest.importorskip("flax.linen")

    class LlamaMLP(nn.Module):
        hidden: int = 64

        @nn.compact
        def __call__(self, x):
            gate = nn.Dense(self.hidden, use_bias=False, name="gate_proj")(x)
            up = nn.Dense(self.hidden, use_bias=False, name="up_proj")(x)
            return nn.Dense(x.shape[-1], use_bias=False, name="down_proj")(nn.silu(gate) * up)

    model = LlamaMLP()
    x = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    report = jfuse.explain(model.apply)(params, x)
    assert report.fused == {"glu": 1}, str(report)
    assert report.sites[0].detail.startswith("silu gate")
    assert "test_glu_pattern.py" in report.sites[0].where
    assert_same_answers(model.apply, params, x)


def test_plain_jax_bf16_einsum_mlp_with_f32_gate(rng):
    def mlp(x, wg, wu, wd):
        g = jnp.einsum("bsd,df->bsf", x, wg)
        u = jnp.einsum("bsd,df->bsf", x, wu)
        h = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(jnp.bfloat16)
        return jnp.einsum("bsf,fd->bsd", h, wd)

    x = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.bfloat16)
    args = (x, _w(rng, 32, 48, dtype=jnp.bfloat16), _w(rng, 32, 48, dtype=jnp.bfloat16),
            _w(rng, 48, 32, dtype=jnp.bfloat16))
    report = jfuse.explain(mlp)(*args)
    assert report.fused == {"glu": 1}, str(report)
    assert "bfloat16" in report.sites[0].detail
    assert_same_answers(mlp, *args, dtype=jnp.bfloat16)


@pytest.mark.parametrize("split", ["jnp.split", "slicing"])
def test_fused_gate_up_weight(split, rng):
    def mlp(x, w, b):
        h = x @ w + b
        if split == "jnp.split":
            g, u = jnp.split(h, 2, axis=-1)
        else:
            g, u = h[..., :24], h[..., 24:]
        return jax.nn.silu(g) * u

    args = (jnp.asarray(rng.standard_normal((6, 16)), jnp.float32), _w(rng, 16, 48),
            jnp.asarray(rng.standard_normal(48), jnp.float32))
    report = jfuse.explain(mlp)(*args)
    assert report.fused == {"glu": 1}, str(report)
    assert "fused (K, 2N) weight" in report.sites[0].detail
    assert "bias_gate+bias_up" in report.sites[0].detail
    assert_same_answers(mlp, *args)


def test_tokamax_k2n_weight_layout(rng):
    def mlp(x, w):
        h = jnp.einsum("bk,kjn->bjn", x, w)
        return jax.nn.sigmoid(h[:, 0]) * h[:, 1]

    args = (jnp.asarray(rng.standard_normal((6, 16)), jnp.float32), _w(rng, 16, 2, 24))
    report = jfuse.explain(mlp)(*args)
    assert report.fused == {"glu": 1}, str(report)
    assert "(K, 2, N)" in report.sites[0].detail
    assert_same_answers(mlp, *args)


@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_geglu_with_torch_style_weights_and_up_first(gelu, rng):
    approximate = gelu == "tanh"

    def mlp(x, wg, wu):  # torch Linear weights are (out, in)
        return (x @ wu.T) * jax.nn.gelu(x @ wg.T, approximate=approximate)

    args = (jnp.asarray(rng.standard_normal((3, 4, 16)), jnp.float32), _w(rng, 24, 16), _w(rng, 24, 16))
    report = jfuse.explain(mlp)(*args)
    assert report.fused == {"glu": 1}, str(report)
    detail = report.sites[0].detail
    assert detail.startswith("gelu_tanh" if approximate else "gelu gate") and "W as (N, K)" in detail
    assert_same_answers(mlp, *args)


@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_equinox_features_first_glu_vmapped(bias, rng):
    """Equinox's per-example Linear is ``W · x``; under vmap the products have the features first
    (without a bias) or are transposed back before the bias add. Either way one GLU fuses."""
    eqx = pytest.importorskip("equinox")

    class SwiGLU(eqx.Module):
        gate: eqx.nn.Linear
        up: eqx.nn.Linear

        def __init__(self, key):
            a, b = jax.random.split(key)
            self.gate = eqx.nn.Linear(16, 24, use_bias=bias, key=a)
            self.up = eqx.nn.Linear(16, 24, use_bias=bias, key=b)

        def __call__(self, x):
            return jax.nn.silu(self.gate(x)) * self.up(x)

    f = lambda m, x: jax.vmap(m)(x)
    args = (SwiGLU(jax.random.key(0)), jnp.asarray(rng.standard_normal((7, 16)), jnp.float32))
    report = jfuse.explain(f)(*args)
    assert report.fused == {"glu": 1} and not report.missed, str(report)
    assert "W·x" in report.sites[0].detail, report.sites[0].detail
    assert ("bias_gate+bias_up" in report.sites[0].detail) == bias
    assert_same_answers(f, *args)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_features_first_glu_on_columns(dtype, rng):
    """``W @ x`` with the tokens as columns of x (K, T): the op takes xᵀ and the result is
    transposed back, both exact."""
    def mlp(x, wg, wu):
        return jax.nn.gelu(wg @ x) * (wu @ x)

    args = (jnp.asarray(rng.standard_normal((16, 5)), dtype), _w(rng, 24, 16).astype(dtype),
            _w(rng, 24, 16).astype(dtype))
    report = jfuse.explain(mlp)(*args)
    assert report.fused == {"glu": 1} and not report.missed, str(report)
    assert "W·x (features first)" in report.sites[0].detail, report.sites[0].detail
    assert_same_answers(mlp, *args, dtype=dtype)


def test_scan_over_layers_with_remat(rng):
    n_layers, d, f = 3, 16, 32
    # Stacked per-layer weights, scaled by their fan-in so activations stay O(1) through layers.
    wg, wu = _w(rng, d, n_layers, f).swapaxes(0, 1), _w(rng, d, n_layers, f).swapaxes(0, 1)
    wd = _w(rng, f, n_layers, d).swapaxes(0, 1)

    def model(x, wg, wu, wd):
        @jax.checkpoint
        def layer(h, ws):
            g, u, dn = ws
            return h + (jax.nn.silu(h @ g) * (h @ u)) @ dn, None

        return lax.scan(layer, x, (wg, wu, wd))[0]

    x = jnp.asarray(rng.standard_normal((4, d)), jnp.float32)
    report = jfuse.explain(model)(x, wg, wu, wd)
    assert report.fused == {"glu": 1}, str(report)
    assert_same_answers(model, x, wg, wu, wd)


def test_escaped_product_is_a_miss(rng):
    def mlp(x, wg, wu):
        g = x @ wg
        return jax.nn.silu(g) * (x @ wu), g

    args = (jnp.asarray(rng.standard_normal((4, 16)), jnp.float32), _w(rng, 16, 24), _w(rng, 16, 24))
    report = jfuse.explain(mlp)(*args)
    assert "glu" not in report.fused
    glu_misses = [m for m in report.missed if m.pattern == "glu"]
    assert [m.reason for m in glu_misses] == [MissReason.INTERMEDIATE_ESCAPES]
    assert "gate product" in glu_misses[0].detail
    assert_same_answers(mlp, *args)


def test_gate_from_a_different_input_is_a_miss(rng):
    def mlp(x, x2, wg, wu):
        return jax.nn.silu(x2 @ wg) * (x @ wu)

    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    args = (x, x + 1, _w(rng, 16, 24), _w(rng, 16, 24))
    report = jfuse.explain(mlp)(*args)
    assert "glu" not in report.fused
    assert [m.reason for m in report.missed if m.pattern == "glu"] == [MissReason.DIFFERENT_INPUTS]
    assert_same_answers(mlp, *args)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_a_fused_mlp_lowers_to_one_kernel_per_glu(platform, rng):
    def mlp(x, wg, wu, wd):
        for _ in range(2):
            x = (jax.nn.silu(x @ wg) * (x @ wu)) @ wd
        return x

    args = (jnp.asarray(rng.standard_normal((16, 128)), jnp.bfloat16),
            _w(rng, 128, 256, dtype=jnp.bfloat16), _w(rng, 128, 256, dtype=jnp.bfloat16),
            _w(rng, 256, 128, dtype=jnp.bfloat16))
    jfuse.jit(mlp)(*args)  # runs on the CPU first: kernel traces cached there must not leak
    text = lower_for(jfuse.jit(mlp), *args, platform=platform)
    assert count_kernel_calls(text, platform) == 2


def test_gradient_taken_before_jfuse_is_named_in_the_glu_miss(rng):
    args = (jnp.asarray(rng.standard_normal((4, 16)), jnp.float32), _w(rng, 16, 24), _w(rng, 16, 24))
    grad = jax.grad(lambda x, wg, wu: jnp.sum(jax.nn.silu(x @ wg) * (x @ wu)), argnums=(1, 2))
    report = jfuse.explain(grad)(*args)
    misses = [m for m in report.missed if m.pattern == "glu"]
    assert misses and "jax.grad(jfuse.fuse(loss))" in misses[0].hint, str(report)
