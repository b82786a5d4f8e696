"""Differential fuzzer: random programs built from every pattern's variants and near-misses (as is,
inside ``jax.checkpoint``, or as a ``lax.scan`` body) run under jax.jit and under jfuse; forward results must be identical (on CPU the fused ops replay the
user's equations) and gradients must agree within dtype rounding.

Budget: ``JFUSE_FUZZ_EXAMPLES`` examples (default 20, CI-sized); e.g. ``JFUSE_FUZZ_EXAMPLES=2000``
for a long run. Every failure it finds becomes a named regression test in this file.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import jfuse

from conftest import assert_same_answers

EXAMPLES = int(os.environ.get("JFUSE_FUZZ_EXAMPLES", "20"))

ACTIVATIONS = {
    "none": None,
    "relu": jax.nn.relu,
    "maximum": lambda z: jnp.maximum(z, 0.0),
    "where": lambda z: jnp.where(z > 0, z, 0.0),
    "gelu_tanh": jax.nn.gelu,
    "gelu_exact": lambda z: jax.nn.gelu(z, approximate=False),
    "silu": jax.nn.silu,
    "z*sigmoid": lambda z: z * jax.nn.sigmoid(z),
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "sin (not an activation)": jnp.sin,
}
GATES = [k for k in ACTIVATIONS if k != "none"]


def _linear_block(draw, d):
    act = draw(st.sampled_from(list(ACTIVATIONS)))
    bias = draw(st.sampled_from(["none", "vector", "vector first", "per-row", "full"]))
    torch_weight = draw(st.booleans())
    escape = draw(st.booleans())

    def block(p, h):
        w = p["w"].T if torch_weight else p["w"]
        z = h @ w
        if bias == "vector":
            z = z + p["b"]
        elif bias == "vector first":
            z = p["b"] + z
        elif bias == "per-row":
            z = z + h[..., :1]
        elif bias == "full":
            z = z + h
        y = z if ACTIVATIONS[act] is None else ACTIVATIONS[act](z)
        return y, (z if escape else None)

    def params(rng, dtype):
        w = rng.standard_normal((d, d)) / np.sqrt(d)
        return {"w": jnp.asarray(w.T if torch_weight else w, dtype),
                "b": jnp.asarray(rng.standard_normal(d) * 0.1, dtype)}

    return f"linear({act}, bias={bias}, torch={torch_weight}, escape={escape})", block, params


def _glu_block(draw, d):
    gate = draw(st.sampled_from(GATES))
    layout = draw(st.sampled_from(["separate", "split", "slice", "up first"]))
    near_miss = draw(st.sampled_from(["none", "escape", "other input"]))

    def block(p, h):
        act = ACTIVATIONS[gate]
        if layout in ("split", "slice"):
            both = h @ p["w_fused"]
            g, u = jnp.split(both, 2, axis=-1) if layout == "split" else (both[..., :d], both[..., d:])
        else:
            g = (h * 2.0 if near_miss == "other input" else h) @ p["wg"]
            u = h @ p["wu"]
        y = u * act(g) if layout == "up first" else act(g) * u
        return y @ p["wd"], (g if near_miss == "escape" else None)

    def params(rng, dtype):
        mat = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), dtype)
        return {"wg": mat(d, d), "wu": mat(d, d), "w_fused": mat(d, 2 * d), "wd": mat(d, d)}

    return f"glu({gate}, {layout}, near_miss={near_miss})", block, params


def _norm_block(draw, d):
    kind = draw(st.sampled_from(["rms", "rms sum/n", "rms x/sqrt", "layer", "layer var",
                                 "layer E[x2]-E[x]2", "gemma"]))
    residual = draw(st.sampled_from(["none", "add", "add, sum reused"]))
    axis = draw(st.sampled_from([-1, -1, -1, 0]))
    upcast = draw(st.booleans())

    def norm(x, w, b):
        x32 = x.astype(jnp.float32) if upcast else x
        mean = lambda v: jnp.mean(v, axis=axis, keepdims=True)
        if kind == "rms":
            n = x32 * lax.rsqrt(mean(x32 * x32) + 1e-6)
        elif kind == "rms sum/n":
            n = x32 * lax.rsqrt(jnp.sum(x32**2, axis=axis, keepdims=True) / x.shape[axis] + 1e-5)
        elif kind == "rms x/sqrt":
            n = x32 / jnp.sqrt(mean(jnp.square(x32)) + 1e-6)
        elif kind == "layer":
            c = x32 - mean(x32)
            n = c * lax.rsqrt(mean(c * c) + 1e-5)
        elif kind == "layer var":
            n = (x32 - mean(x32)) * lax.rsqrt(jnp.var(x32, axis=axis, keepdims=True) + 1e-5)
        elif kind == "layer E[x2]-E[x]2":
            var = jnp.maximum(mean(x32 * x32) - mean(x32) ** 2, 0.0)
            n = (x32 - mean(x32)) * lax.rsqrt(var + 1e-6)
        else:  # gemma
            n = x32 * lax.rsqrt(mean(x32 * x32) + 1e-6) * (1.0 + w.astype(n_dtype(x32)))
            return n.astype(x.dtype)
        out = n.astype(x.dtype) * w
        return out + b if kind.startswith("layer") else out

    def n_dtype(v):
        return v.dtype

    def block(p, h):
        if residual == "none":
            return norm(h, p["w"], p["b"]), None
        s = h + jnp.tanh(h)
        y = norm(s, p["w"], p["b"])
        return (y + s if residual == "add, sum reused" else y), None

    def params(rng, dtype):
        return {"w": jnp.asarray(rng.standard_normal(d) + 1.0, dtype),
                "b": jnp.asarray(rng.standard_normal(d) * 0.1, dtype)}

    return f"norm({kind}, residual={residual}, axis={axis}, upcast={upcast})", block, params


@st.composite
def programs(draw):
    d = draw(st.sampled_from([3, 5, 8, 16, 37]))
    lead = draw(st.sampled_from([(4,), (2, 3), (1, 5), (7,)]))
    dtype = draw(st.sampled_from([jnp.float32, jnp.float32, jnp.bfloat16]))
    # Mixed dtypes: f32 parameters with bf16 activations, as mixed-precision models keep them.
    param_dtype = draw(st.sampled_from([dtype, jnp.float32]))
    makers = draw(st.lists(st.sampled_from([_linear_block, _glu_block, _norm_block]),
                           min_size=1, max_size=3))
    blocks = [maker(draw, d) for maker in makers]
    seed = draw(st.integers(0, 2**16))
    wrapper = draw(st.sampled_from(["none", "none", "checkpoint", "scan"]))
    return d, lead, dtype, param_dtype, blocks, seed, wrapper


def _build(d, lead, dtype, param_dtype, blocks, seed, wrapper):
    rng = np.random.default_rng(seed)
    params = [make(rng, param_dtype) for _, _, make in blocks]
    x = jnp.asarray(rng.standard_normal(lead + (d,)), dtype)

    def body(params, x):
        outputs = []
        h = x
        for (_, block, _), p in zip(blocks, params):
            y, extra = block(p, h)
            h = jnp.tanh(y).astype(dtype) + h  # residual stream keeps values O(1)
            if extra is not None:
                outputs.append(extra)
        return h, outputs

    if wrapper == "checkpoint":  # a remat region around the blocks
        return jax.checkpoint(body), params, x
    if wrapper == "scan":  # the blocks as the body of a 2-step scan, as layer stacks are written
        def program(params, x):
            return lax.scan(lambda h, _: (body(params, h)[0], None), x, None, length=2)[0]

        return program, params, x
    return body, params, x


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 50,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs())
def test_random_programs_never_change_the_answer(program_spec):
    d, lead, dtype, param_dtype, blocks, seed, wrapper = program_spec
    program, params, x = _build(d, lead, dtype, param_dtype, blocks, seed, wrapper)
    description = f"{wrapper}: " + " -> ".join(name for name, _, _ in blocks)
    report = jfuse.explain(program)(params, x)
    assert not report.fallbacks, f"{description}\n{report}"
    try:
        assert_same_answers(program, params, x, dtype=dtype)
    except AssertionError as error:
        raise AssertionError(f"{description} ({np.dtype(dtype).name} activations, "
                             f"{np.dtype(param_dtype).name} params, lead={lead}, d={d})\n"
                             f"{report}") from error


# --- regression tests: every failure the fuzzer found, by name ---------------------------------
