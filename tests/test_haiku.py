"""Haiku model code fuses unmodified: ``hk.Linear`` (its bias arrives through
``jnp.broadcast_to(b, out.shape)``), ``hk.RMSNorm`` and ``hk.LayerNorm`` (their scale and offset
are broadcast to the input's shape the same way) and a SwiGLU of two ``hk.Linear``. Each fuses
once, answers and gradients match jax.jit, every fused site lowers to one kernel for TPU and GPU,
and the look-alikes that are not jfuse's patterns keep their answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfuse
from jfuse import MissReason

from conftest import assert_same_answers
from lowering import count_kernel_calls, lower_for

# The default run takes the first cases of these parametrized tests; the rest are slow
# cases, sampled (tests/conftest.py) and all run with JFUSE_SLOW=1.
DEFAULT_CASES = {
    "test_norms": 2,
    "test_linear_with_each_activation": 2,
    "test_swiglu": 1,
    "test_block_lowers_to_one_kernel_per_site": 1,
}


hk = pytest.importorskip("haiku", reason="dm-haiku is not installed (pip install -e '.[test]')")


def _model(fn, x, rng):
    """(apply, params): ``fn`` transformed, with parameters moved off their initial values (a
    scale of ones and an offset of zeros would hide a scale/offset mix-up)."""
    model = hk.without_apply_rng(hk.transform(fn))
    params = model.init(jax.random.key(0), x)
    params = jax.tree.map(
        lambda p: p + jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype), params)
    return model.apply, params


def _x(rng, shape=(2, 5, 64), dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape) * 1.5 + 0.3, dtype)


ACTIVATIONS = {
    "none": (lambda z: z, None),
    "relu": (jax.nn.relu, "relu"),
    "gelu tanh": (jax.nn.gelu, "gelu_tanh"),
    "gelu exact": (lambda z: jax.nn.gelu(z, approximate=False), "gelu"),
    "silu": (jax.nn.silu, "silu"),
    "sigmoid": (jax.nn.sigmoid, "sigmoid"),
    "tanh": (jnp.tanh, "tanh"),
}


# A bare matmul (no bias, no activation) is not a site, so that one pair is not a case.
LINEAR_CASES = [(a, b) for a in ACTIVATIONS for b in (True, False) if b or a != "none"]


@pytest.mark.parametrize("activation,with_bias", LINEAR_CASES,
                         ids=[f"{a}-{'bias' if b else 'no bias'}" for a, b in LINEAR_CASES])
def test_linear_with_each_activation(activation, with_bias, rng):
    act, name = ACTIVATIONS[activation]
    apply, params = _model(lambda x: act(hk.Linear(48, with_bias=with_bias)(x)), _x(rng), rng)
    x = _x(rng)
    report = jfuse.explain(apply)(params, x)
    assert report.fused == {"linear": 1}, str(report)
    assert not report.missed and not report.fallbacks, str(report)
    detail = report.sites[0].detail
    assert ("bias" in detail) == with_bias, detail
    if name is not None:
        assert detail.startswith(name + "+") or detail.startswith(name + " "), detail
    assert_same_answers(apply, params, x)


def test_linear_bf16(rng):
    x = _x(rng, dtype=jnp.bfloat16)
    apply, params = _model(lambda x: jax.nn.gelu(hk.Linear(48)(x)), x, rng)
    report = jfuse.explain(apply)(params, x)
    assert report.fused == {"linear": 1}, str(report)
    assert_same_answers(apply, params, x, dtype=jnp.bfloat16)


NORMS = {
    "RMSNorm": (lambda x: hk.RMSNorm(-1)(x), "rms_norm", "scale"),
    "RMSNorm(eps=2**-8, param_axis=-1)": (
        lambda x: hk.RMSNorm(-1, eps=2.0**-8, param_axis=-1)(x), "rms_norm", "eps=0.00391"),
    "RMSNorm(create_scale=False)": (
        lambda x: hk.RMSNorm(-1, create_scale=False)(x), "rms_norm", "eps=1e-05"),
    "LayerNorm(scale, offset)": (
        lambda x: hk.LayerNorm(-1, True, True)(x), "layer_norm", "scale, bias"),
    "LayerNorm(scale)": (lambda x: hk.LayerNorm(-1, True, False)(x), "layer_norm", "scale"),
    "LayerNorm(offset)": (lambda x: hk.LayerNorm(-1, False, True)(x), "layer_norm", "bias"),
    "LayerNorm()": (lambda x: hk.LayerNorm(-1, False, False)(x), "layer_norm", "eps=1e-05"),
    "LayerNorm(param_axis=-1)": (
        lambda x: hk.LayerNorm(-1, True, True, param_axis=-1)(x), "layer_norm", "scale, bias"),
    "LayerNorm(fast variance)": (
        lambda x: hk.LayerNorm(-1, True, True, use_fast_variance=True)(x), "layer_norm", "scale"),
}


def _spelled_under(rank_promotion, apply):
    """``apply`` traced as it is spelled under ``rank_promotion`` (Haiku chooses its broadcasts
    by it), then run, fused or differentiated under the default config."""
    def traced(*args):
        with jax.numpy_rank_promotion(rank_promotion):
            closed = jax.make_jaxpr(apply)(*args)
        return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree.leaves(args))[0]
    return traced


@pytest.mark.parametrize("rank_promotion", ["allow", "raise"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_norms(norm, dtype, rank_promotion, rng):
    # With rank promotion other than "allow", LayerNorm broadcasts its scale, offset and mean to
    # the input's shape (as RMSNorm always does): both spellings must fuse.
    fn, pattern, fragment = NORMS[norm]
    x = _x(rng, dtype=dtype)
    apply, params = _model(fn, x, rng)
    apply = _spelled_under(rank_promotion, apply)
    report = jfuse.explain(apply)(params, x)
    assert report.fused == {pattern: 1}, str(report)
    assert not report.missed and not report.fallbacks, str(report)
    assert fragment in report.sites[0].detail, report.sites[0].detail
    assert_same_answers(apply, params, x, dtype=dtype)


def test_norm_gradient_under_rank_promotion_raise(rng):
    """A user's strict rank promotion reaches jfuse's ops, whose internals broadcast feature
    vectors by rank promotion: they run under their own setting (jfuse/ops/_op.py)."""
    x = _x(rng)
    with jax.numpy_rank_promotion("raise"):
        apply, params = _model(lambda x: hk.RMSNorm(-1)(x), x, rng)
        assert jfuse.explain(apply)(params, x).fused == {"rms_norm": 1}
        assert_same_answers(apply, params, x)


def _swiglu(hidden=128, with_bias=False):
    def mlp(x):
        gate = hk.Linear(hidden, with_bias=with_bias, name="gate")(x)
        up = hk.Linear(hidden, with_bias=with_bias, name="up")(x)
        return hk.Linear(x.shape[-1], with_bias=False, name="down")(jax.nn.silu(gate) * up)
    return mlp


@pytest.mark.parametrize("with_bias", [False, True], ids=["no bias", "bias"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_swiglu(with_bias, dtype, rng):
    x = _x(rng, dtype=dtype)
    apply, params = _model(_swiglu(with_bias=with_bias), x, rng)
    report = jfuse.explain(apply)(params, x)
    assert report.fused == {"glu": 1}, str(report)
    assert not report.missed and not report.fallbacks, str(report)
    detail = report.sites[0].detail
    assert detail.startswith("silu gate"), detail
    assert ("bias_gate+bias_up" in detail) == with_bias, detail
    assert_same_answers(apply, params, x, dtype=dtype)


def _block(x):
    """A pre-norm transformer MLP block the way Haiku code writes it, then a LayerNorm and a
    gelu projection: one site of each kind."""
    h = x + _swiglu(256)(hk.RMSNorm(-1, name="norm")(x))
    h = hk.LayerNorm(-1, True, True, name="final_norm")(h)
    return jax.nn.gelu(hk.Linear(128, name="head")(h))


def test_block_fuses_every_site(rng):
    x = _x(rng, shape=(2, 8, 128))
    apply, params = _model(_block, x, rng)
    report = jfuse.explain(apply)(params, x)
    assert report.fused == {"rms_norm": 1, "glu": 1, "add_layer_norm": 1, "linear": 1}, str(report)
    assert not report.missed and not report.fallbacks, str(report)
    assert_same_answers(apply, params, x)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_block_lowers_to_one_kernel_per_site(platform, rng):
    x = _x(rng, shape=(2, 8, 128), dtype=jnp.bfloat16)
    apply, params = _model(_block, x, rng)
    report = jfuse.explain(apply)(params, x)
    sites = [s for s in report.sites if s.runs_kernel_on(platform)]
    assert len(sites) == len(report.sites) == 4, str(report)
    text = lower_for(jfuse.jit(apply), params, x, platform=platform)
    assert count_kernel_calls(text, platform) == 4


def test_scale_over_another_axis_than_the_normalized_one_keeps_its_answer(rng):
    # param_axis=0 on a square input: the scale varies along the rows, so this is no jfuse norm
    # even though the shapes would allow it.
    x = _x(rng, shape=(64, 64))
    for fn in (lambda x: hk.RMSNorm(-1, param_axis=0)(x),
               lambda x: hk.LayerNorm(-1, True, True, param_axis=0)(x)):
        with jax.numpy_rank_promotion("raise"):
            apply, params = _model(fn, x, rng)
            assert jfuse.explain(apply)(params, x).fused == {}
            assert_same_answers(apply, params, x)


def test_a_bias_broadcast_along_the_rows_is_a_bias_shape_miss(rng):
    def per_row(x):
        w = hk.get_parameter("w", (64, 64), init=hk.initializers.RandomNormal(0.1))
        b = hk.get_parameter("b", (64,), init=hk.initializers.RandomNormal())
        return jax.nn.gelu(x @ w + jnp.broadcast_to(b[:, None], (64, 64)))

    x = _x(rng, shape=(64, 64))
    apply, params = _model(per_row, x, rng)
    report = jfuse.explain(apply)(params, x)
    assert report.fused == {}, str(report)
    assert [m.reason for m in report.missed] == [MissReason.BIAS_SHAPE], str(report)
    assert "varies along axis 0" in report.missed[0].detail
    assert_same_answers(apply, params, x)
