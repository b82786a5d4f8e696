"""The engine: jfuse.jit as a drop-in jax.jit, fuse composing with transforms, nested bodies,
effects, caching, determinism and fallbacks."""

from __future__ import annotations

import sys
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jfuse
from jfuse import MissReason


def _params(rng, sizes=(16, 32, 16), dtype=jnp.float32):
    return [
        (jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), dtype), jnp.asarray(rng.standard_normal(b) * 0.1, dtype))
        for a, b in zip(sizes[:-1], sizes[1:])
    ]


def mlp(params, x):
    for w, b in params:
        x = jax.nn.gelu(x @ w + b)
    return x


def loss(params, x):
    return jnp.mean(mlp(params, x) ** 2)


@pytest.fixture
def model(rng):
    return _params(rng), jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)


# --- jfuse.jit behaves like jax.jit ---------------------------------------------------------

def test_pytrees_kwargs_and_decorator_forms(model):
    params, x = model

    @jfuse.jit
    def f(p, *, x, scale=1.0):
        return {"y": mlp(p, x) * scale, "n": (x.shape[0],)}

    out = f(params, x=x, scale=2.0)
    chex.assert_trees_all_equal(out["y"], jax.jit(mlp)(params, x) * 2.0)
    assert out["n"][0] == 8
    assert f.report.fused == {"linear": 2}


def test_static_argnums_and_argnames(model):
    params, x = model

    def f(p, x, n_layers, act):
        for w, b in p[:n_layers]:
            x = act(x @ w + b)
        return x

    g = jfuse.jit(f, static_argnums=(2,), static_argnames=("act",))
    got = g(params, x, 1, act=jax.nn.silu)
    chex.assert_trees_all_equal(got, jax.jit(f, static_argnums=(2, 3))(params, x, 1, jax.nn.silu))
    assert g.report.fused == {"linear": 1}
    g(params, x, 2, act=jax.nn.silu)
    assert g.report.fused == {"linear": 2}


def test_donated_buffers_stay_correct(model):
    params, x = model
    step = jfuse.jit(lambda p, x: jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p, x)),
                     donate_argnums=(0,))
    expected = jax.jit(lambda p, x: jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p, x)))(
        params, x)
    copies = jax.tree.map(jnp.copy, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU may not honour donation
        got = step(copies, x)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)


def test_lower_compile_and_memory_analysis(model):
    params, x = model
    compiled = jfuse.jit(loss).lower(params, x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes >= 0
    chex.assert_trees_all_close(compiled(params, x), loss(params, x), rtol=1e-6)


def test_cross_lowering_for_tpu_has_one_kernel_per_site(model):
    from lowering import count_kernel_calls, lower_for

    params, x = model
    f = jfuse.fuse(mlp)
    text = lower_for(f, params, x, platform="tpu")
    assert count_kernel_calls(text, "tpu") == 2
    text = lower_for(jfuse.jit(mlp), params, x, platform="tpu")
    assert count_kernel_calls(text, "tpu") == 2


def test_report_prints_once_per_signature(model, capsys):
    params, x = model
    f = jfuse.jit(mlp, report=True)
    f(params, x)
    f(params, x)
    assert capsys.readouterr().out.count("jfuse fusion report") == 1
    f(params, x[:4])
    assert capsys.readouterr().out.count("jfuse fusion report") == 1


def test_report_env_switch(model, capsys, monkeypatch):
    params, x = model
    monkeypatch.setenv("JFUSE_REPORT", "1")
    jfuse.jit(mlp)(params, x)
    out = capsys.readouterr().out
    assert "linear" in out and "test_engine.py" in out


def test_second_call_does_not_retrace_and_new_shape_retraces_once(model):
    params, x = model
    f = jfuse.jit(mlp)
    for _ in range(3):
        f(params, x)
    assert f.trace_count == 1
    f(params, x[:3])
    f(params, x[:3])
    assert f.trace_count == 2


def test_fuse_caches_by_signature_outside_jit(model):
    params, x = model
    f = jfuse.fuse(mlp)
    f(params, x)
    f(params, x + 1)
    assert f.trace_count == 1
    f(params, x.astype(jnp.bfloat16))
    assert f.trace_count == 2


# --- fuse composes with transforms -----------------------------------------------------------

def test_grad_of_fuse_under_jit(model):
    params, x = model
    got = jax.jit(jax.grad(jfuse.fuse(loss)))(params, x)
    chex.assert_trees_all_close(got, jax.grad(loss)(params, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transform", ["vmap", "jvp", "hessian", "checkpoint", "grad eager"])
def test_fuse_composes(transform, rng):
    params = _params(rng, sizes=(4, 6, 3))
    x = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    fused = jfuse.fuse(loss)
    if transform == "vmap":
        run = lambda f: jax.vmap(f, in_axes=(None, 0))(params, jnp.stack([x, 2 * x]))
    elif transform == "jvp":
        run = lambda f: jax.jvp(lambda x: f(params, x), (x,), (jnp.ones_like(x),))
    elif transform == "hessian":
        run = lambda f: jax.hessian(lambda x: f(params, x))(x)
    elif transform == "checkpoint":
        run = lambda f: jax.grad(jax.checkpoint(f))(params, x)
    else:
        run = lambda f: jax.grad(f)(params, x)
    chex.assert_trees_all_close(run(fused), run(loss), rtol=1e-4, atol=1e-5)


def test_composes_with_a_users_custom_vjp(model):
    params, x = model

    @jax.custom_vjp
    def clip_grad(v):
        return v

    clip_grad.defvjp(lambda v: (v, None), lambda _, g: (jnp.clip(g, -0.01, 0.01),))

    def f(p, x):
        return jnp.sum(mlp(p, clip_grad(x)) ** 2)

    got = jax.grad(jfuse.fuse(f), argnums=1)(params, x)
    chex.assert_trees_all_close(got, jax.grad(f, argnums=1)(params, x), rtol=1e-5)
    assert float(jnp.max(jnp.abs(got))) <= 0.01


# --- nested bodies ---------------------------------------------------------------------------

def _stacked(rng, n_layers=3, d=16):
    ws = jnp.asarray(rng.standard_normal((n_layers, d, d)) / np.sqrt(d), jnp.float32)
    bs = jnp.asarray(rng.standard_normal((n_layers, d)) * 0.1, jnp.float32)
    return ws, bs


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan+checkpoint"])
def test_rewrites_inside_scan_over_layers(remat, rng):
    ws, bs = _stacked(rng)
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)

    def layer(h, wb):
        w, b = wb
        return jax.nn.silu(h @ w + b), None

    def f(ws, bs, x):
        body = jax.checkpoint(layer) if remat else layer
        return jnp.sum(lax.scan(body, x, (ws, bs))[0] ** 2)

    report = jfuse.explain(f)(ws, bs, x)
    assert report.fused == {"linear": 1}, str(report)
    chex.assert_trees_all_equal(jfuse.jit(f)(ws, bs, x), jax.jit(f)(ws, bs, x))
    chex.assert_trees_all_close(
        jax.jit(jax.grad(jfuse.fuse(f), argnums=(0, 1)))(ws, bs, x),
        jax.grad(f, argnums=(0, 1))(ws, bs, x), rtol=1e-5, atol=1e-6)


def test_rewrites_inside_while_and_cond(rng):
    (w, b), = _params(rng, sizes=(16, 16))
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)

    def f(w, b, x):
        x = lax.cond(x.sum() > 0, lambda v: jnp.tanh(v @ w + b), lambda v: v, x)
        return lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jax.nn.relu(c[1] @ w + b)), (0, x))[1]

    report = jfuse.explain(f)(w, b, x)
    assert report.fused == {"linear": 2}, str(report)
    chex.assert_trees_all_equal(jfuse.jit(f)(w, b, x), jax.jit(f)(w, b, x))


def test_custom_vjp_regions_stay_opaque_and_are_reported(model):
    params, x = model
    (w, b) = params[0]

    @jax.custom_vjp
    def block(x):
        return jax.nn.relu(x @ w + b)

    block.defvjp(lambda x: (block(x), x), lambda x, g: (g @ w.T,))
    report = jfuse.explain(lambda x: block(x))(x)
    assert report.fused == {}
    assert [m.reason for m in report.missed] == [MissReason.OPAQUE_CUSTOM_VJP]
    chex.assert_trees_all_equal(jfuse.jit(block)(x), jax.jit(block)(x))


# --- effects, inputs, determinism -------------------------------------------------------------

def test_debug_print_and_callbacks_keep_their_order(model, capfd):
    params, x = model
    seen = []

    def f(p, x):
        jax.debug.print("first {}", x.shape[0], ordered=True)
        h = mlp(p[:1], x)
        jax.experimental.io_callback(lambda v: seen.append(("cb", float(v))), None, h.sum(), ordered=True)
        jax.debug.print("second {}", h.shape[1], ordered=True)
        return h

    jfuse.jit(f)(params, x)
    out = capfd.readouterr().out
    assert out.index("first 8") < out.index("second 32")
    assert len(seen) == 1


def test_rng_keys_pass_through(model):
    params, x = model

    def f(p, x, key):
        noise = jax.random.normal(key, x.shape)
        return mlp(p, x + noise)

    key = jax.random.key(3)
    chex.assert_trees_all_equal(jfuse.jit(f)(params, x, key), jax.jit(f)(params, x, key))


def test_python_scalars_in_and_out():
    f = lambda a, s: (jax.nn.relu(a @ jnp.ones((3, 2)) + s), 3)
    got = jfuse.fuse(f)(jnp.ones((4, 3)), 2.0)
    assert got[1] == 3
    chex.assert_trees_all_equal(got[0], f(jnp.ones((4, 3)), 2.0)[0])
    chex.assert_trees_all_equal(jfuse.jit(f)(jnp.ones((4, 3)), 2.0)[0], got[0])


def test_eager_only_code_still_runs_under_fuse():
    def f(x):
        if float(x.sum()) > 0:  # concrete Python control flow: cannot be traced
            return x * 2
        return x

    np.testing.assert_array_equal(jfuse.fuse(f)(jnp.ones(3)), jnp.full(3, 2.0))


def test_user_errors_surface_unchanged():
    def f(x):
        return x @ jnp.ones((5, 2))

    with pytest.raises(TypeError):
        jfuse.jit(f)(jnp.ones((3, 4)))


def test_rewrite_is_deterministic(model):
    params, x = model
    a = str(jax.make_jaxpr(jfuse.fuse(loss))(params, x))
    b = str(jax.make_jaxpr(jfuse.fuse(loss))(params, x))
    assert a == b
    assert "custom_jvp_call" in a


def test_patterns_switch_and_env_disable(model, monkeypatch):
    params, x = model
    report = jfuse.explain(mlp, patterns=())(params, x)
    assert report.fused == {}
    assert {m.reason for m in report.missed} == {MissReason.PATTERN_DISABLED}
    monkeypatch.setenv("JFUSE_DISABLE", "linear")
    assert jfuse.explain(mlp)(params, x).fused == {}
    with pytest.raises(ValueError, match="unknown pattern"):
        jfuse.jit(mlp, patterns=("lineer",))


# --- fallbacks --------------------------------------------------------------------------------

def test_a_failing_pass_falls_back_to_the_unfused_function(model, monkeypatch):
    params, x = model
    monkeypatch.setenv("JFUSE_RAISE", "0")

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("jfuse.rewrite.plan_rewrites", broken)
    f = jfuse.jit(mlp)
    with pytest.warns(RuntimeWarning, match="boom"):
        got = f(params, x)
    chex.assert_trees_all_equal(got, jax.jit(mlp)(params, x))
    assert any("boom" in fb for fb in f.report.fallbacks)


def test_a_failing_fused_op_runs_that_block_unfused(model, monkeypatch):
    params, x = model
    monkeypatch.setenv("JFUSE_RAISE", "0")

    def refuse(*args, **kwargs):
        raise NotImplementedError("kernel says no")

    monkeypatch.setattr("jfuse.passes.linear.fused_linear", refuse)
    f = jfuse.jit(mlp)
    with pytest.warns(RuntimeWarning, match="kernel says no"):
        got = f(params, x)
    chex.assert_trees_all_equal(got, jax.jit(mlp)(params, x))
    assert f.report.fused == {}
    assert len(f.report.fallbacks) == 2


def test_a_block_whose_fused_op_failed_is_a_miss_with_the_reason(model, monkeypatch):
    params, x = model
    monkeypatch.setenv("JFUSE_RAISE", "0")
    outcomes = iter([NotImplementedError("kernel says no"), RuntimeError("a jfuse bug")])

    def fail(*args, **kwargs):
        raise next(outcomes)

    monkeypatch.setattr("jfuse.passes.linear.fused_linear", fail)
    f = jfuse.jit(mlp)
    with pytest.warns(RuntimeWarning) as record:
        f(params, x)
    assert [m.reason for m in f.report.missed] == [MissReason.NO_KERNEL, MissReason.INTERNAL_ERROR]
    assert "kernel says no" in f.report.missed[0].detail and "a jfuse bug" in f.report.missed[1].detail
    assert all(w.filename == __file__ for w in record), [w.filename for w in record]


def _step(params, x):
    value, grads = jax.value_and_grad(loss)(params, x)
    return value, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


def test_an_error_in_jfuse_while_tracing_says_so_and_runs_unfused(model, monkeypatch):
    # A fused op's derivative fails while jax.grad traces it inside the step: the step runs as
    # written, with a warning naming where in jfuse (it used to fall back silently).
    params, x = model
    # The bug: the derivative's activation lookup is gone, so jfuse's own line raises.
    monkeypatch.setattr(sys.modules["jfuse.ops.linear"], "get_activation", None)
    monkeypatch.setenv("JFUSE_RAISE", "0")
    with pytest.warns(RuntimeWarning,
                      match=r"failed inside jfuse at jfuse/ops/linear.py:\d+ \(TypeError"):
        got = jfuse.jit(_step)(params, x)
    chex.assert_trees_all_close(got, jax.jit(_step)(params, x), rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("JFUSE_RAISE", "1")
    with pytest.raises(TypeError, match="not callable"):
        jfuse.jit(_step)(params, x)


def test_code_that_cannot_be_traced_runs_as_written_without_a_warning(model, monkeypatch):
    params, x = model
    monkeypatch.setenv("JFUSE_RAISE", "0")

    def eager(params, x):  # Python control flow on a value: jax.jit cannot trace it either
        return mlp(params, x) if float(jnp.sum(x)) > 0 else -mlp(params, x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jfuse.fuse(eager)(params, x)  # called eagerly, as written
    chex.assert_trees_all_close(got, eager(params, x), rtol=1e-6, atol=1e-6)


def test_kernel_refusal_in_interpret_mode_falls_back_per_site(rng, monkeypatch):
    monkeypatch.setenv("JFUSE_RAISE", "0")
    w = jnp.asarray(rng.standard_normal((16, 16)), jnp.float16)  # no f16 kernel guarantee
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float16)
    f = lambda x: jax.nn.relu(x @ w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = jfuse.jit(f, implementation="interpret")(x)
    chex.assert_trees_all_close(got.astype(np.float32), jax.jit(f)(x).astype(np.float32), rtol=1e-2, atol=1e-2)


def test_grad_taken_inside_the_jitted_step_still_fuses_the_forward(model):
    """jfuse.jit(train_step) where train_step differentiates an unfused loss itself."""
    params, x = model

    def train_step(p, x):
        value, grads = jax.value_and_grad(loss)(p, x)
        return value, jax.tree.map(lambda a, g: a - 0.1 * g, p, grads)

    f = jfuse.jit(train_step)
    got = f(params, x)
    assert f.report.fused == {"linear": 2}, str(f.report)
    assert all(s.detail.startswith("gelu_tanh+bias") for s in f.report.sites)
    want = jax.jit(train_step)(params, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    assert jax.grad is not None and jax.grad.__module__.startswith("jax")  # patch undone


def test_equinox_filter_value_and_grad_inside_jfuse_jit(rng):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(8, 4, width_size=16, depth=2, activation=jax.nn.silu, key=jax.random.key(0))
    x = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)

    params, static = eqx.partition(model, eqx.is_array)

    def step(params, x):
        m = eqx.combine(params, static)
        return eqx.filter_value_and_grad(lambda m: jnp.sum(jax.vmap(m)(x) ** 2))(m)

    f = jfuse.jit(step)
    got = f(params, x)
    assert f.report.fused == {"linear": 3}, str(f.report)
    chex.assert_trees_all_close(got, jax.jit(step)(params, x), rtol=1e-5, atol=1e-6)


def test_strict_raises_listing_the_misses(rng, monkeypatch):
    def f(x, w, b):
        z = x @ w + b
        return jax.nn.relu(z), z  # pre-activation escapes: a miss

    x = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
    b = jnp.zeros(6)
    with pytest.raises(jfuse.FusionError, match="intermediate read elsewhere") as info:
        jfuse.jit(f, strict=True)(x, w, b)
    assert info.value.report.missed[0].reason is MissReason.INTERMEDIATE_ESCAPES
    monkeypatch.setenv("JFUSE_STRICT", "1")
    with pytest.raises(jfuse.FusionError):
        jfuse.jit(f)(x, w, b)
    # A model that fuses cleanly passes strict mode, including grads taken inside the step.
    clean = lambda x, w, b: jax.grad(lambda w: jnp.sum(jax.nn.relu(x @ w + b)))(w)
    chex.assert_trees_all_close(jfuse.jit(clean)(x, w, b), jax.jit(clean)(x, w, b), rtol=1e-6)


def test_report_is_logged_at_info(model, caplog):
    import logging

    params, x = model
    with caplog.at_level(logging.INFO, logger="jfuse"):
        jfuse.jit(mlp)(params, x)
    assert any("jfuse fusion report" in r.getMessage() for r in caplog.records)


def test_debug_switch_explains_each_rejected_candidate(rng, monkeypatch, capsys):
    x = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
    monkeypatch.setenv("JFUSE_DEBUG", "linear")
    jfuse.explain(lambda x, w: jnp.sin(x @ w))(x, w)
    err = capsys.readouterr().err
    assert "jfuse debug [linear]" in err and "no recognized activation" in err
    assert "test_engine.py" in err
    monkeypatch.setenv("JFUSE_DEBUG", "rms_norm")
    jfuse.explain(lambda x, y: x * lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6))(x, x + 1)
    assert "jfuse debug [norm]" in capsys.readouterr().err
    monkeypatch.delenv("JFUSE_DEBUG")
    jfuse.explain(lambda x, w: jnp.sin(x @ w))(x, w)
    assert "jfuse debug" not in capsys.readouterr().err


def test_kernels_are_traced_once_per_configuration_not_per_site(rng, monkeypatch):
    from jfuse.ops import _dispatch
    from jfuse.pallas import linear as kernels
    from lowering import count_kernel_calls, lower_for

    calls = []
    original = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    w = jnp.asarray(rng.standard_normal((16, 16)) / 4, jnp.float32)
    b = jnp.zeros(16)
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)

    def kernel_traces(n_layers):
        monkeypatch.setattr(_dispatch, "_TRACES", type(_dispatch._TRACES)())
        calls.clear()

        def f(x):
            for _ in range(n_layers):  # n sites, one configuration
                x = jnp.tanh(x @ w + b)
            return x

        text = lower_for(jfuse.jit(f), x, platform="tpu")
        assert count_kernel_calls(text, "tpu") == n_layers  # still one kernel call per site
        return len(calls)

    # The first site reads the input (its aval may carry another mesh), the rest share a trace.
    assert kernel_traces(6) == kernel_traces(2) > 0
