"""The norm patterns on real layers and hand-written styles: each fuses once, matches jax.jit
forward and backward, pre-norm residual stacks fuse as add_* with both outputs, each fused norm
lowers to one kernel, a norm over one other axis fuses with that axis moved last, and a norm over
several axes (or with a traced eps) is a miss."""

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

from conftest import assert_same_answers, tolerance
from lowering import count_kernel_calls, lower_for


def _x(rng, shape=(2, 5, 64), dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape) * 1.5 + 0.3, dtype)


def _vec(rng, n=64, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(n), dtype)


def llama_rms(x, w, eps=1e-6):
    x32 = x.astype(jnp.float32)
    n = x32 * lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + eps)
    return n.astype(x.dtype) * w  # Llama: downcast, then scale in the model dtype


def gemma_rms(x, w, eps=1e-6):
    x32 = x.astype(jnp.float32)
    n = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (n * (1.0 + w.astype(jnp.float32))).astype(x.dtype)  # Gemma: (1 + w) in f32


STYLES = {
    "llama": (llama_rms, "rms_norm", "scale"),
    "gemma (1 + w)": (gemma_rms, "rms_norm", "(1 + w)"),
    "mean(x*x), x / sqrt": (lambda x, w: x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * w,
                            "rms_norm", "eps=1e-05"),
    "sum / n, integer_pow": (lambda x, w: x * lax.rsqrt(jnp.sum(lax.integer_pow(x, 2), -1, keepdims=True)
                                                        / x.shape[-1] + 1e-5) * w, "rms_norm", "scale"),
    "layer: x - mean twice, var": (
        lambda x, w: (x - x.mean(-1, keepdims=True)) * lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * w,
        "layer_norm", "eps=1e-05"),
    "layer: E[x^2] - E[x]^2 clamped": (
        lambda x, w: (x - x.mean(-1, keepdims=True)) * (lax.rsqrt(jnp.maximum(
            jnp.mean(x * x, -1, keepdims=True) - x.mean(-1, keepdims=True) ** 2, 0.0) + 1e-6) * w),
        "layer_norm", "scale"),
    "layer: E[x^2] - E[x]^2 unclamped": (
        lambda x, w: w * (x - x.mean(-1, keepdims=True)) * lax.rsqrt(
            jnp.mean(x * x, -1, keepdims=True) - x.mean(-1, keepdims=True) ** 2 + 1e-6),
        "layer_norm", "scale"),
}


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_hand_written_styles_fuse(style, dtype, rng):
    f, pattern, fragment = STYLES[style]
    x, w = _x(rng, dtype=dtype), _vec(rng, dtype=dtype)
    report = jfuse.explain(f)(x, w)
    assert report.fused == {pattern: 1}, str(report)
    assert fragment in report.sites[0].detail, report.sites[0].detail
    assert_same_answers(f, x, w, dtype=dtype)


@pytest.mark.parametrize("layer", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_flax_linen_layers(layer, dtype, rng):
    nn = pytest.importorskip("flax.linen")
    module = getattr(nn, layer)(dtype=dtype)
    x = _x(rng, dtype=dtype)
    params = module.init(jax.random.key(0), x)
    report = jfuse.explain(module.apply)(params, x)
    want = "layer_norm" if layer == "LayerNorm" else "rms_norm"
    assert report.fused == {want: 1}, str(report)
    assert_same_answers(module.apply, params, x, dtype=dtype)


@pytest.mark.parametrize("layer", ["LayerNorm", "RMSNorm"])
def test_flax_nnx_layers(layer, rng):
    nnx = pytest.importorskip("flax.nnx")
    module = getattr(nnx, layer)(64, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    f = lambda state, x: nnx.merge(graphdef, state)(x)
    x = _x(rng)
    report = jfuse.explain(f)(state, x)
    want = "layer_norm" if layer == "LayerNorm" else "rms_norm"
    assert report.fused == {want: 1}, str(report)
    assert_same_answers(f, state, x)


@pytest.mark.parametrize("layer", ["LayerNorm", "RMSNorm"])
def test_equinox_layers_vmapped(layer, rng):
    eqx = pytest.importorskip("equinox")
    module = getattr(eqx.nn, layer)(64)
    f = lambda m, x: jax.vmap(m)(x)
    x = _x(rng, shape=(7, 64))
    report = jfuse.explain(f)(module, x)
    want = "layer_norm" if layer == "LayerNorm" else "rms_norm"
    assert report.fused == {want: 1}, str(report)
    assert_same_answers(f, module, x)


def _prenorm_stack(x, params):
    """Pre-norm residual blocks: h = h + f(norm(h)); every norm after the first reads a sum."""
    for w, m in params:
        h = llama_rms(x, w)
        x = x + jnp.tanh(h @ m)
    return llama_rms(x, params[0][0])


def test_prenorm_residual_stack_fuses_add_rms_norm_with_both_outputs(rng):
    params = [(_vec(rng), jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32)) for _ in range(3)]
    x = _x(rng)
    report = jfuse.explain(_prenorm_stack)(x, params)
    assert report.fused == {"rms_norm": 1, "add_rms_norm": 3, "linear": 3}, str(report)
    both = [s for s in report.sites if s.pattern == "add_rms_norm" and "sum also returned" in s.detail]
    assert len(both) == 2  # the last sum is read by the final norm only
    assert_same_answers(_prenorm_stack, x, params)


def test_add_layer_norm_post_norm_style(rng):
    def block(x, y, g, b):
        h = x + y
        return (h - h.mean(-1, keepdims=True)) * lax.rsqrt(h.var(-1, keepdims=True) + 1e-5) * g + b

    args = (_x(rng), _x(rng), _vec(rng), _vec(rng))
    report = jfuse.explain(block)(*args)
    assert report.fused == {"add_layer_norm": 1}, str(report)
    assert_same_answers(block, *args)


def _rms_over(axis):
    def f(x, w):
        shape = [1] * x.ndim
        shape[axis] = -1
        return x * lax.rsqrt(jnp.mean(x * x, axis=axis, keepdims=True) + 1e-6) * w.reshape(shape)
    return f


def _layer_over(axis):
    def f(x, g, b):
        shape = [1] * x.ndim
        shape[axis] = -1
        c = x - x.mean(axis, keepdims=True)
        return c * lax.rsqrt(x.var(axis, keepdims=True) + 1e-5) * g.reshape(shape) + b.reshape(shape)
    return f


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_norm_over_one_other_axis_fuses_with_the_axis_moved(axis, dtype, rng):
    """The op normalizes its last axis: the emitted code moves the normalized axis there and the
    result back (exact transposes), so the answers are jax.jit's."""
    shape = (24, 5, 16)
    x = _x(rng, shape, dtype)
    for f, args, pattern in ((_rms_over(axis), (x, _vec(rng, shape[axis], dtype)), "rms_norm"),
                             (_layer_over(axis), (x, _vec(rng, shape[axis], dtype),
                                                  _vec(rng, shape[axis], dtype)), "layer_norm")):
        report = jfuse.explain(f)(*args)
        assert report.fused == {pattern: 1}, str(report)
        assert f"axis {axis} of" in report.sites[0].detail, report.sites[0].detail
        assert_same_answers(f, *args, dtype=dtype)


def test_norm_over_another_axis_with_the_residual_add_returns_the_sum(rng):
    def block(x, y, w):
        h = x + y
        n = h * lax.rsqrt(jnp.mean(h * h, axis=0, keepdims=True) + 1e-6) * w[:, None]
        return n, h * 2.0

    args = (_x(rng, (32, 6)), _x(rng, (32, 6)), _vec(rng, 32))
    report = jfuse.explain(block)(*args)
    assert report.fused == {"add_rms_norm": 1}, str(report)
    assert "sum also returned" in report.sites[0].detail
    assert_same_answers(block, *args)


def test_norm_whose_output_is_transposed_fuses(rng):
    """penzai's spelling: the block itself moves the normalized axis last before scaling."""
    def f(x, w):
        r = lax.rsqrt(jnp.mean(x * x, axis=0) + 1e-6)
        return jnp.transpose(x, (1, 2, 0)) * r[..., None] * w

    args = (_x(rng, (16, 3, 5)), _vec(rng, 16))
    report = jfuse.explain(f)(*args)
    assert report.fused == {"rms_norm": 1}, str(report)
    assert_same_answers(f, *args)


def test_norm_over_several_axes_is_a_miss(rng):
    f = lambda x: x * lax.rsqrt(jnp.mean(x * x, axis=(1, 2), keepdims=True) + 1e-6)
    report = jfuse.explain(f)(_x(rng))
    assert report.fused == {}
    assert [m.reason for m in report.missed] == [MissReason.NORMALIZED_AXIS]
    assert "test_norm_pattern.py" in report.missed[0].where


def test_eps_held_as_a_constant_fuses_and_a_traced_eps_is_a_miss(rng):
    """An eps captured as an array (penzai's ``epsilon`` leaf, closed over) is a constant of the
    jaxpr: the norm fuses with its value. Passed as an argument it is traced: the op cannot take
    it as a number, and the report says so."""
    eps = jnp.float32(1e-5)
    closed = lambda x, w: x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w
    x, w = _x(rng), _vec(rng)
    report = jfuse.explain(closed)(x, w)
    assert report.fused == {"rms_norm": 1} and "eps=1e-05" in report.sites[0].detail, str(report)
    assert_same_answers(closed, x, w)

    traced = lambda x, w, eps: x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w
    report = jfuse.explain(traced)(x, w, eps)
    assert report.fused == {}
    assert [m.reason for m in report.missed] == [MissReason.TRACED_CONSTANT], str(report)


def test_a_look_alike_that_is_not_a_norm_stays_unfused(rng):
    # rsqrt of a row statistic, but the variance is of a different array than the one scaled.
    f = lambda x, y: x * lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6)
    report = jfuse.explain(f)(_x(rng), _x(rng))
    assert report.fused == {}
    # and one whose eps is added after the root is not an rms norm
    g = lambda x: x / (jnp.sqrt(jnp.mean(x * x, -1, keepdims=True)) + 1e-6)
    assert jfuse.explain(g)(_x(rng)).fused == {}


def test_the_norm_pass_name_selects_every_norm_pattern(rng, monkeypatch):
    """``norm`` (the pass's name) stands for its four patterns in patterns= and JFUSE_DISABLE."""
    params = [(_vec(rng), jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32))
              for _ in range(2)]
    x = _x(rng)
    everything = jfuse.explain(_prenorm_stack)(x, params).fused
    assert {"rms_norm", "add_rms_norm"} <= set(everything)
    norms = {k: v for k, v in everything.items() if k.endswith("norm")}
    assert jfuse.explain(_prenorm_stack, patterns=("norm",))(x, params).fused == norms
    monkeypatch.setenv("JFUSE_DISABLE", "norm")
    assert not set(jfuse.explain(_prenorm_stack)(x, params).fused) & set(norms)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_each_fused_norm_lowers_to_one_kernel(platform, rng):
    params = [(_vec(rng, 128, jnp.bfloat16), jnp.asarray(rng.standard_normal((128, 128)) / 12, jnp.bfloat16))
              for _ in range(2)]
    x = _x(rng, shape=(4, 8, 128), dtype=jnp.bfloat16)
    norms_only = jfuse.jit(_prenorm_stack, patterns=("rms_norm", "add_rms_norm"))
    text = lower_for(norms_only, x, params, platform=platform)
    assert count_kernel_calls(text, platform) == 3


def _flax_one_pass_layer_norm(x, g, b, eps):
    """Flax's LayerNorm (``use_fast_variance``): f32 statistics, E[x²] - E[x]² clamped at 0."""
    dt = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(dt)
    mu, mu2 = x32.mean(-1, keepdims=True), (x32 * x32).mean(-1, keepdims=True)
    var = jnp.maximum(0.0, mu2 - mu * mu)
    return ((x32 - mu) * lax.rsqrt(var + eps) * g.astype(dt) + b.astype(dt)).astype(x.dtype)


def _near_constant_rows_program(rng, dtype, rows=64, d=32, sigma=1e-3):
    """A linear layer into a one-pass LayerNorm whose rows vary by ~sigma: the variance is about
    eps, where the one-pass statistics the forward computes and two-pass ones part ways. Half
    the rows are near-constant, four are all-zero padding."""
    x = rng.standard_normal((rows, d))
    x[: rows // 2] = 1.0 + sigma * rng.standard_normal((rows // 2, d))
    x[rows // 2: rows // 2 + 4] = 0.0
    params = {"w": rng.standard_normal((d, d)) / np.sqrt(d) * sigma + 1.0 / d,
              "g": 1 + 0.1 * rng.standard_normal(d), "b": 0.1 * rng.standard_normal(d),
              "w2": rng.standard_normal((d, d)) / np.sqrt(d)}
    cot = np.cos(np.arange(rows * d)).reshape(rows, d)

    def loss(p, x):
        y = _flax_one_pass_layer_norm(x @ p["w"], p["g"], p["b"], 1e-6)
        return jnp.sum((jnp.tanh(y) @ p["w2"]).astype(jnp.float32) * cot)

    param_dtype = jnp.float32  # mixed precision: f32 parameters, `dtype` activations
    return loss, {k: jnp.asarray(v, param_dtype) for k, v in params.items()}, jnp.asarray(x, dtype)


@functools.lru_cache(maxsize=None)
def _one_pass_float64_references() -> dict:
    """Both dtypes' float64 gradients, in one x64 session: on jax 0.10 a second session, after
    jfuse has traced the same program, fails inside JAX (an f32/f64 mismatch in the transpose of
    a jitted `*`); one session serves both cases."""
    refs = {}
    with jax.enable_x64(True):
        for dtype in (jnp.bfloat16, jnp.float32):
            loss, params, x = _near_constant_rows_program(np.random.default_rng(0), dtype)
            f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), t)
            ref = jax.jit(jax.grad(loss))(f64(params), f64(x))
            refs[np.dtype(dtype).name] = jax.tree.map(np.asarray, ref)
    return refs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_one_pass_layer_norm_gradients_are_as_accurate_as_jax_jit(dtype):
    """The XLA path replays the user's one-pass statistics in the forward; its derivative must be
    the derivative of those (as jax.jit's is), not of two-pass statistics that disagree with them
    on rows whose variance is near eps. Judged against the same program in float64."""
    ref = _one_pass_float64_references()[np.dtype(dtype).name]
    loss, params, x = _near_constant_rows_program(np.random.default_rng(0), dtype)
    assert jfuse.explain(loss)(params, x).fused == {"layer_norm": 1}
    fused = jax.jit(jax.grad(jfuse.fuse(loss)))(params, x)
    plain = jax.jit(jax.grad(loss))(params, x)
    for name in params:
        r = ref[name]
        err_fused = np.max(np.abs(np.asarray(fused[name], np.float64) - r))
        err_plain = np.max(np.abs(np.asarray(plain[name], np.float64) - r))
        floor = 8 * np.finfo(np.float32).eps * np.max(np.abs(r))
        assert err_fused <= 1.25 * err_plain + floor, (name, err_fused, err_plain)


def _penzai_llamalike():
    pz = pytest.importorskip("penzai.pz", reason="penzai is not installed (test extra)")
    from penzai.models.transformer.variants import llamalike_common
    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=2, query_head_multiplier=2, embedding_dim=24, projection_dim=8,
        mlp_hidden_dim=32, num_decoder_blocks=1, vocab_size=16, mlp_variant="swiglu",
        tie_embedder_and_logits=False)
    model = llamalike_common.build_llamalike_transformer(config, init_base_rng=jax.random.key(0))

    def run(model, tokens):
        logits = model(pz.nx.wrap(tokens).tag("batch", "seq"),
                       token_positions=pz.nx.arange("seq", tokens.shape[1]))
        return logits.untag("batch", "seq", "vocabulary").unwrap()

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 8)), jnp.int32)
    return pz, model, run, tokens


def test_penzai_llamalike_norms_and_glus_fuse(rng):
    """penzai normalizes over a named axis that is not always last, holds eps as a captured
    array, scales through a batch-only dot_general and puts copies between the GLU's matmuls and
    its product: all three norms and the GLU fuse, with jax.jit's answers."""
    pz, model, run, tokens = _penzai_llamalike()
    unbound, params = pz.unbind_params(model, freeze=True)
    f = lambda params, tokens: run(pz.bind_variables(unbound, params), tokens)
    report = jfuse.explain(f)(params, tokens)
    assert report.fused == {"rms_norm": 3, "glu": 1, "attention": 1}, str(report)
    assert not report.missed, str(report)
    assert any("axis 0 of" in s.detail for s in report.sites if s.pattern == "rms_norm")
    # Without attention, whose blockwise op differs from the dense code by rounding, the CPU
    # replay of the norms and GLUs gives jax.jit's forward exactly.
    fused = jfuse.fuse(f, patterns=("norm", "glu"))
    np.testing.assert_array_equal(jax.jit(fused)(params, tokens), jax.jit(f)(params, tokens))
    grad = lambda fn: jax.jit(jax.grad(lambda p, t: jnp.sum(jnp.sin(fn(p, t)))))
    chex.assert_trees_all_close(grad(fused)(params, tokens), grad(f)(params, tokens),
                                **tolerance(jnp.float32))


def test_penzai_model_passed_whole_reports_its_traced_eps():
    """Passed whole, a penzai model carries eps as an array leaf, traced like the weights: the
    norms are reported (TRACED_CONSTANT), not silently left alone."""
    pz, model, run, tokens = _penzai_llamalike()
    report = jfuse.explain(run)(pz.freeze_params(model), tokens)
    assert "rms_norm" not in report.fused
    assert [m.reason for m in report.missed if m.pattern == "rms_norm"] == (
        [MissReason.TRACED_CONSTANT] * 3), str(report)


def _count_primitive(jaxpr, name: str, within: frozenset = frozenset(), inside=False) -> int:
    """Equations named ``name`` in ``jaxpr`` and every jaxpr nested in it; with ``within``,
    only those nested in an equation whose primitive is one of those."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name and (inside or not within)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _count_primitive(inner, name, within,
                                              inside or eqn.primitive.name in within)
    return count


def _residual_norm_loss(x, residual, w):
    """An RMSNorm after a residual sum that the loss also reads."""
    h = x + residual
    h32 = h.astype(jnp.float32)
    n = h32 * lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + 1e-6)
    return jnp.sum(jnp.sin(n.astype(x.dtype) * w) * h)


def _residual_norm_inputs(rng):
    x, residual = (jnp.asarray(rng.standard_normal((16, 64)), jnp.float32) for _ in range(2))
    return x, residual, jnp.asarray(rng.standard_normal(64), jnp.float32)


def test_a_cpu_training_step_computes_the_statistics_once_in_the_forward(monkeypatch, rng):
    """Where the forward is the user's own equations (a CPU program), a fused norm's output
    comes from the same evaluation as its derivative: the row statistics are computed once, not
    once for the output and again for what the derivative keeps. The values are jax.jit's, bit
    for bit; the gradients match. Checked against the op computing the two apart."""
    from jfuse.ops import norm as norm_op

    loss, (x, residual, w) = _residual_norm_loss, _residual_norm_inputs(rng)

    def step(*args):
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)

    def run():
        """The step as jfuse.jit lowers it for this CPU (the forward is the user's equations
        everywhere it runs): its rsqrt count, and its results."""
        fused = jfuse.jit(step)
        lowered = fused.lower(x, residual, w).as_text()
        assert fused.report.fused == {"add_rms_norm": 1}, str(fused.report)
        return lowered.count("stablehlo.rsqrt"), fused(x, residual, w)

    joint, (joint_value, joint_grads) = run()
    monkeypatch.setattr(norm_op.Norm, "primal_and_tangents", lambda self, *a: None)
    apart, (apart_value, apart_grads) = run()
    monkeypatch.undo()
    assert (joint, apart) == (1, 2)
    value, grads = jax.jit(step)(x, residual, w)
    assert joint_value == value == apart_value
    chex.assert_trees_all_close(joint_grads, apart_grads, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(joint_grads, grads, rtol=1e-5, atol=1e-5)


def test_the_backward_reads_the_forward_statistics_instead_of_reducing_again(monkeypatch, rng):
    """The derivative of a fused norm saves its per-row statistics (a few bytes per row) rather
    than recomputing them in the backward with a second reduction over the rows; the rows
    themselves are still recomputed. Checked against the same gradient with nothing saved."""
    from jfuse.core import markers

    loss, (x, residual, w) = _residual_norm_loss, _residual_norm_inputs(rng)

    def backward_reductions():
        fused = jfuse.fuse(loss)
        jaxpr = jax.make_jaxpr(jax.grad(fused, argnums=(0, 1, 2)))(x, residual, w).jaxpr
        assert fused.last_report.fused == {"add_rms_norm": 1}
        # The backward's recomputation is the checkpoint region left after linearization.
        return _count_primitive(jaxpr, "reduce_sum", within=frozenset({"checkpoint", "remat2"}))

    saving = backward_reductions()
    monkeypatch.setattr(markers.DerivativePolicy, "__call__", lambda self, *a, **k: False)
    assert backward_reductions() == saving + 1
    monkeypatch.undo()
    got = jax.grad(jfuse.fuse(loss), argnums=(0, 1, 2))(x, residual, w)
    want = jax.grad(loss, argnums=(0, 1, 2))(x, residual, w)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
