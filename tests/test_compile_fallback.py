"""A kernel that fails to compile on the device falls back to XLA, and the program still runs.

Mosaic and Triton compile a kernel only when XLA compiles the program, after jfuse has traced
it, so jfuse's trace-time fallbacks cannot see such a failure. ``jfuse.jit`` catches it at the
call, recompiles that signature with the fused ops on their XLA implementation, warns and
records it in the report. On this CPU the failure is injected: the fused op's kernel path emits a
Mosaic kernel call (the ``tpu_custom_call`` target), which the CPU cannot compile. It fails
exactly where a real kernel would: in ``compile()``, after a successful trace and lowering.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfuse
from jfuse.core.kernel_calls import kernel_calls
from jfuse.passes import linear as linear_pass

# A Pallas kernel call as jfuse counts them, with no implementation on this CPU.
MISSING_TARGET = "tpu_custom_call"


def _mlp(w1, w2, x):
    return jax.nn.gelu(jax.nn.relu(x @ w1) @ w2)


@pytest.fixture
def arguments(rng):
    return (jnp.asarray(rng.standard_normal((16, 32)) / 4, jnp.float32),
            jnp.asarray(rng.standard_normal((32, 16)) / 4, jnp.float32),
            jnp.asarray(rng.standard_normal((8, 16)), jnp.float32))


@pytest.fixture
def uncompilable_kernels(monkeypatch):
    """Every fused linear whose implementation is not "xla" gets a kernel XLA cannot compile."""
    monkeypatch.setenv("JFUSE_RAISE", "0")
    real = linear_pass.fused_linear
    calls = {"xla": 0, "kernel": 0}

    def fused_linear(*args, implementation=None, **kwargs):
        y = real(*args, implementation=implementation, **kwargs)
        if implementation == "xla":
            calls["xla"] += 1
            return y
        calls["kernel"] += 1
        return jax.ffi.ffi_call(MISSING_TARGET, jax.ShapeDtypeStruct(y.shape, y.dtype))(y)

    monkeypatch.setattr(linear_pass, "fused_linear", fused_linear)
    return calls


def test_the_injected_kernel_really_fails_in_compile(uncompilable_kernels, arguments):
    lowered = jax.jit(jfuse.fuse(_mlp)).lower(*arguments)  # traces and lowers fine
    assert kernel_calls(lowered.as_text()) == {"pallas-mosaic": 2}
    with pytest.raises(Exception):  # the message differs between jax versions
        lowered.compile()


def test_compile_failure_falls_back_to_xla_with_a_warning(uncompilable_kernels, arguments):
    step = jfuse.jit(_mlp)
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        got = step(*arguments)
    chex.assert_trees_all_equal(got, jax.jit(_mlp)(*arguments))
    assert uncompilable_kernels["xla"] == 2  # both blocks, still fused, on XLA
    assert step.report.fused == {"linear": 2}
    assert any("failed to compile on cpu" in note and "XLA implementation" in note
               for note in step.report.fallbacks), step.report.fallbacks
    assert all(site.platforms["cuda"] == "xla" for site in step.report.sites)

    # The signature stays on XLA: no second failure, no second warning, the same answer.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chex.assert_trees_all_equal(step(*arguments), got)


def test_other_signatures_still_try_their_kernels(uncompilable_kernels, arguments):
    step = jfuse.jit(_mlp)
    with pytest.warns(RuntimeWarning):
        step(*arguments)
    before = uncompilable_kernels["kernel"]
    w1, w2, x = arguments
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        step(w1, w2, jnp.concatenate([x, x]))
    assert uncompilable_kernels["kernel"] > before


def test_errors_that_are_not_kernel_compiles_are_raised(uncompilable_kernels, arguments):
    step = jfuse.jit(_mlp)
    w1, w2, x = arguments
    with pytest.raises(TypeError):  # the user's own shape error, raised while tracing
        step(w1, w2, x[:, :3])


def test_jfuse_raise_reports_the_compile_error_instead(uncompilable_kernels, arguments,
                                                       monkeypatch):
    monkeypatch.setenv("JFUSE_RAISE", "1")
    with pytest.raises(Exception) as raised:
        jfuse.jit(_mlp)(*arguments)
    assert not isinstance(raised.value, jfuse.FusionError)


def test_strict_mode_raises_on_a_compile_fallback(uncompilable_kernels, arguments):
    step = jfuse.jit(_mlp, strict=True)
    with pytest.warns(RuntimeWarning), pytest.raises(jfuse.FusionError, match="failed to compile"):
        step(*arguments)


def test_a_working_program_keeps_jax_jits_fast_path(arguments):
    step = jfuse.jit(_mlp)
    np.testing.assert_array_equal(step(*arguments), jax.jit(_mlp)(*arguments))
    assert step._xla is None and not step._xla_signatures


def test_the_warning_points_at_the_users_line(uncompilable_kernels, arguments):
    step = jfuse.jit(_mlp)
    with pytest.warns(RuntimeWarning, match="failed to compile") as record:
        step(*arguments)
    assert record[0].filename == __file__, record[0].filename
