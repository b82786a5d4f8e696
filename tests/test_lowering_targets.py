"""A concrete call traces only the kernels of the platform it runs on (jfuse.core.targets).

``jfuse.jit(f)(x)`` and ``.lower(x)`` can only run on the arguments' platform, so the fused ops
trace that platform's kernels alone (on this CPU: none, no ``platform_dependent``); ``.trace()``
and a call under another trace keep every platform, so lowering for "tpu" or "cuda" from here
still finds one kernel per site. The answer is the same either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import abstract_device_context, count_kernel_calls

import jfuse
from jfuse.core import targets


def _block(params, x):
    h = jax.nn.gelu(x @ params["w1"] + params["b1"])
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * params["scale"]
    return jnp.sum(h @ params["w2"])


@pytest.fixture
def model():
    # bf16: the GPU runs f32 matmuls on XLA (its TF32 GEMMs beat the f32 Triton kernels), and
    # these tests need a kernel per site on every platform.
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k[0], (128, 256)) * 0.05, "b1": jnp.zeros(256),
              "scale": jnp.ones(256), "w2": jax.random.normal(k[1], (256, 128)) * 0.05}
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    return params, jax.random.normal(k[2], (64, 128), jnp.bfloat16)


def _step(params, x):
    loss, grads = jax.value_and_grad(_block)(params, x)
    return loss, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


def _platform_switches(lowered_text: str) -> int:
    return lowered_text.count("stablehlo.case")


def test_a_concrete_call_traces_only_this_platform(model):
    params, x = model
    f = jfuse.jit(_step)
    local = f.lower(params, x).as_text()
    everywhere = f.trace(params, x).lower().as_text()
    assert f.report is not None and sum(f.report.fused.values()) >= 2
    assert _platform_switches(everywhere) > 0  # every platform's kernel, picked at lowering
    assert _platform_switches(local) == 0  # this CPU's: the XLA versions alone


def test_the_answer_is_the_same_bit_for_bit(model):
    params, x = model
    got = jfuse.jit(_step)(params, x)
    everywhere = jfuse.jit(_step).trace(params, x).lower().compile()(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(everywhere)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_trace_and_calls_under_another_trace_keep_every_platform(model, platform):
    params, x = model
    f = jfuse.jit(_step)
    f(params, x)  # a concrete call first: its CPU-only trace must not serve what follows
    with abstract_device_context(platform):  # the chip the kernels are lowered for
        via_trace = f.trace(params, x).lower(lowering_platforms=(platform,)).as_text()
        under_jit = jax.jit(f).trace(params, x).lower(lowering_platforms=(platform,)).as_text()
    assert count_kernel_calls(via_trace, platform) >= 2
    assert count_kernel_calls(under_jit, platform) == count_kernel_calls(via_trace, platform)


def test_one_trace_per_signature_and_the_latest_report(model):
    params, x = model
    f = jfuse.jit(_step)
    for _ in range(3):
        f(params, x)
    f.lower(params, x)
    assert f.trace_count == 1
    f.trace(params, x)  # every platform: a trace of its own
    assert f.trace_count == 2 and len(f.reports) == 2
    assert f.report.fused == f.reports[0].fused


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_concrete_arguments_inside_another_trace_keep_every_platform(model, platform):
    """An outer jit closing over concrete arrays calls jfuse.jit with them while it traces: its
    lowering may be for any platform, so every platform's kernel is kept."""
    params, x = model
    f = jfuse.jit(_step)
    with abstract_device_context(platform):
        text = jax.jit(lambda: f(params, x)).trace().lower(lowering_platforms=(platform,)).as_text()
    assert count_kernel_calls(text, platform) >= 2


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_a_nested_fuse_never_serves_a_restricted_trace_to_an_unrestricted_one(model, platform):
    """A ``jfuse.fuse`` used inside a jfuse.jit step caches per signature: an entry traced for
    this CPU alone must not answer a later ``.trace()`` for every platform."""
    params, x = model
    block = jfuse.fuse(_block)
    step = jfuse.jit(lambda p, x: jax.grad(block)(p, x))
    step(params, x)
    with abstract_device_context(platform):
        text = step.trace(params, x).lower(lowering_platforms=(platform,)).as_text()
    assert count_kernel_calls(text, platform) >= 2


def test_platforms_of_a_call():
    here = targets.platforms_of_call([jnp.ones(3), 1.0, "static"])
    assert here == ({"cpu"} if jax.default_backend() == "cpu" else here)
    traced = []
    jax.jit(lambda a: traced.append(targets.platforms_of_call([a])) or a)(jnp.ones(3))
    assert traced == [None]  # a tracer: the lowering could be for any platform
    assert targets.platforms_of_call([jnp.ones(3)], {"in_shardings": object()}) is None
    sharding = _two_device_sharding()  # the multi-device subprocess tests cover meshes fully
    if sharding is not None:
        spread = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)
        assert targets.platforms_of_call([spread]) is None


def _two_device_sharding():
    devices = jax.devices()
    if len(devices) < 2:
        return None
    mesh = jax.sharding.Mesh(np.array(devices[:2]), ("d",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))


def test_wanted_inside_and_outside_the_context():
    assert targets.wanted("tpu") and targets.wanted("cuda")
    with targets.lowering_for({"cpu"}):
        assert not targets.wanted("tpu") and targets.wanted("cpu")
        with targets.lowering_for(None):
            assert targets.wanted("tpu")
    assert targets.wanted("tpu")


def test_a_concrete_call_traces_no_kernel_on_this_cpu(model):
    """Inside the step, the loss jax.grad differentiates is fused too: it inherits the call's
    platforms, so on a CPU no Pallas kernel is traced at all (the point of the restriction)."""
    from jfuse.ops import _dispatch

    params, x = model
    _dispatch._TRACES.clear()
    jfuse.jit(_step).lower(params, x)
    assert list(_dispatch._TRACES) == []
    jfuse.jit(_step).trace(params, x)
    assert {key[0][:2] for key in _dispatch._TRACES} == {
        ("linear", "tpu"), ("linear", "triton"), ("norm", "tpu"), ("norm", "triton")}
