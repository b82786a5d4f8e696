"""The `linear` pattern on real code: every spelling fuses once, answers and gradients match jax.jit,
and the near-misses stay unfused with the right reason."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jfuse
from jfuse import MissReason

from conftest import assert_same_answers


def _data(rng, x_shape=(4, 6, 32), w_shape=(32, 48), dtype=np.float32):
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    w = jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(w_shape[0]), dtype)
    b = jnp.asarray(rng.standard_normal(w_shape[1] if w_shape[0] == x_shape[-1] else w_shape[0]), dtype)
    return x, w, b


# Every spelling runs in f32 by default; its bf16 twin is a slow case (sampled, see conftest):
# the dtype changes the cast around the block, not how the spelling is read.
DEFAULT_CASES = {"test_each_spelling_fuses_once_with_the_right_activation": 17}

SPELLINGS = {
    "relu": (lambda x, w, b: jax.nn.relu(x @ w + b), "relu"),
    "maximum, bias first": (lambda x, w, b: jnp.maximum(b + x @ w, 0.0), "relu_max"),
    "where relu": (lambda x, w, b: jnp.where(x @ w + b > 0, x @ w + b, 0.0), "relu"),
    "silu (nested jit)": (lambda x, w, b: jax.nn.silu(x @ w + b), "silu"),
    "z*sigmoid(z)": (lambda x, w, b: (lambda z: z * jax.nn.sigmoid(z))(x @ w + b), "silu"),
    "z/(1+exp(-z))": (lambda x, w, b: (lambda z: z / (1 + jnp.exp(-z)))(x @ w + b), "silu"),
    "gelu tanh": (lambda x, w, b: jax.nn.gelu(x @ w + b), "gelu_tanh"),
    "gelu tanh, torch spelling": (
        lambda x, w, b: (lambda z: 0.5 * z * (1.0 + jnp.tanh(0.7978845608 * (z + 0.044715 * z**3))))(x @ w + b),
        "gelu_tanh",
    ),
    "gelu exact (erfc)": (lambda x, w, b: jax.nn.gelu(x @ w + b, approximate=False), "gelu"),
    "gelu exact (erf)": (
        lambda x, w, b: (lambda z: 0.5 * z * (1 + lax.erf(z / np.sqrt(2.0))))(x @ w + b),
        "gelu",
    ),
    "sigmoid": (lambda x, w, b: jax.nn.sigmoid(x @ w + b), "sigmoid"),
    "tanh": (lambda x, w, b: jnp.tanh(x @ w + b), "tanh"),
    "einsum": (lambda x, w, b: jnp.tanh(jnp.einsum("bsk,kn->bsn", x, w) + b), "tanh"),
    "jnp.dot": (lambda x, w, b: jax.nn.relu(jnp.dot(x, w) + b), "relu"),
    "bias only": (lambda x, w, b: x @ w + b, None),
    "bias through reshape": (lambda x, w, b: jax.nn.gelu(x @ w + b.reshape(1, 1, -1)), "gelu_tanh"),
    "activation only": (lambda x, w, b: jax.nn.silu(x @ w), "silu"),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_each_spelling_fuses_once_with_the_right_activation(name, dtype, rng):
    f, activation = SPELLINGS[name]
    x, w, b = _data(rng, dtype=dtype)
    report = jfuse.explain(f)(x, w, b)
    assert report.fused == {"linear": 1}, str(report)
    assert not report.missed and not report.fallbacks, str(report)
    detail = report.sites[0].detail
    assert detail.startswith(activation or "bias"), detail
    assert_same_answers(f, x, w, b, dtype=dtype)


@pytest.mark.parametrize(
    "f",
    [
        lambda x, w, b: jax.nn.relu(x @ w.T + b),
        lambda x, w, b: jax.nn.gelu(jnp.einsum("mk,nk->mn", x, w) + b),
    ],
    ids=["x@W.T", "einsum mk,nk"],
)
def test_torch_style_weights_are_read_in_place(f, rng):
    x, w, b = _data(rng, x_shape=(5, 32), w_shape=(48, 32))
    report = jfuse.explain(f)(x, w, b)
    assert report.fused == {"linear": 1}
    assert "W as (N, K)" in report.sites[0].detail
    assert_same_answers(f, x, w, b)


def test_flax_dense_stack_fuses_every_layer(rng):
    flax_nn = pytest.importorskip("flax.linen")

    class MLP(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            x = flax_nn.gelu(flax_nn.Dense(48)(x))
            x = flax_nn.relu(flax_nn.Dense(40)(x))
            return flax_nn.Dense(8)(x)

    model = MLP()
    x = jnp.asarray(rng.standard_normal((6, 32)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    report = jfuse.explain(model.apply)(params, x)
    assert report.fused == {"linear": 3}, str(report)
    # The report points at the user's module, not at Flax's Dense.
    assert all("test_linear_pattern.py" in site.where for site in report.sites), str(report)
    assert_same_answers(model.apply, params, x)


@pytest.mark.parametrize("layout", ["vmap outside", "vmap inside", "unbatched"])
def test_equinox_linear_fuses_in_every_vmap_layout(layout, rng):
    eqx = pytest.importorskip("equinox")
    layer = eqx.nn.Linear(32, 48, key=jax.random.key(1))
    x = jnp.asarray(rng.standard_normal((5, 32)), jnp.float32)
    f = {
        "vmap outside": lambda m, x: jax.nn.relu(jax.vmap(m)(x)),
        "vmap inside": lambda m, x: jax.vmap(lambda v: jax.nn.gelu(m(v)))(x),
        "unbatched": lambda m, x: jnp.tanh(m(x[0])),
    }[layout]
    report = jfuse.explain(f)(layer, x)
    assert report.fused == {"linear": 1}, str(report)
    assert_same_answers(f, layer, x)


def test_bf16_model_with_f32_upcast_around_the_activation(rng):
    def f(x, w, b):
        z = x @ w + b
        return jax.nn.gelu(z.astype(jnp.float32)).astype(jnp.bfloat16)

    x, w, b = _data(rng, dtype=jnp.bfloat16)
    report = jfuse.explain(f)(x, w, b)
    assert report.fused == {"linear": 1}, str(report)
    assert report.sites[0].detail.startswith("gelu_tanh")
    assert_same_answers(f, x, w, b, dtype=jnp.bfloat16)


def test_escaped_preactivation_fuses_only_matmul_and_bias(rng):
    def f(x, w, b):
        z = x @ w + b
        return jax.nn.relu(z), z

    x, w, b = _data(rng)
    report = jfuse.explain(f)(x, w, b)
    assert report.fused == {"linear": 1}
    assert report.sites[0].detail.startswith("bias")
    assert [m.reason for m in report.missed] == [MissReason.INTERMEDIATE_ESCAPES]
    assert "test_linear_pattern.py" in report.missed[0].where
    assert_same_answers(f, x, w, b)


def test_escaped_matmul_output_is_a_miss(rng):
    def f(x, w, b):
        y = x @ w
        return jax.nn.relu(y + b), y

    x, w, b = _data(rng)
    report = jfuse.explain(f)(x, w, b)
    assert report.fused == {}
    assert [m.reason for m in report.missed] == [MissReason.INTERMEDIATE_ESCAPES]
    assert_same_answers(f, x, w, b)


@pytest.mark.parametrize(
    "f, fragment",
    [
        (lambda x, w, b, m: jax.nn.relu(x @ w + x[..., :1]), "varies along axis"),
        (lambda x, w, b, m: jax.nn.relu(x @ w + m), "full"),
    ],
    ids=["per-row bias", "full-matrix addend"],
)
def test_non_vector_bias_is_a_bias_shape_miss(f, fragment, rng):
    x, w, b = _data(rng)
    m = jnp.asarray(rng.standard_normal((4, 6, 48)), jnp.float32)
    report = jfuse.explain(f)(x, w, b, m)
    assert report.fused == {}
    assert [miss.reason for miss in report.missed] == [MissReason.BIAS_SHAPE]
    assert fragment in report.missed[0].detail
    assert_same_answers(f, x, w, b, m)


@pytest.mark.parametrize(
    "f",
    [lambda x, w, b: x @ w, lambda x, w, b: jnp.einsum("bsk,bsk->bs", x, x) + 1.0,
     lambda x, w, b: (x @ w) * 2.0 - 1.0],
    ids=["bare matmul", "batched contraction", "affine after matmul"],
)
def test_not_a_site_and_not_a_miss(f, rng):
    x, w, b = _data(rng)
    report = jfuse.explain(f)(x, w, b)
    assert report.fused == {} and report.missed == [], str(report)


def test_unsupported_activation_is_a_miss_and_the_bias_still_fuses(rng):
    f = lambda x, w, b: jnp.sin(x @ w + b)
    x, w, b = _data(rng)
    report = jfuse.explain(f)(x, w, b)
    assert report.fused == {"linear": 1} and report.sites[0].detail.startswith("bias")
    assert [m.reason for m in report.missed] == [MissReason.UNSUPPORTED_ACTIVATION]
    assert "sin" in report.missed[0].detail
    assert_same_answers(f, x, w, b)


def test_gradient_taken_before_jfuse_is_named_in_the_report(rng):
    x, w, b = _data(rng)
    grad = jax.grad(lambda w, b, x: jnp.sum(jax.nn.gelu(x @ w + b)), argnums=(0, 1))
    report = jfuse.explain(grad)(w, b, x)  # jfuse sees the joint forward+backward graph
    hidden = [m for m in report.missed if m.reason is MissReason.INTERMEDIATE_ESCAPES]
    assert hidden and "jax.grad(jfuse.fuse(loss))" in hidden[0].hint, str(report)


def test_integer_matmul_is_left_alone():
    x = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
    w = jnp.ones((4, 5), jnp.int32)
    f = lambda x, w: jax.nn.relu(x @ w + 1)
    assert jfuse.explain(f)(x, w).fused == {}
    chex.assert_trees_all_equal(jfuse.jit(f)(x, w), jax.jit(f)(x, w))
