"""Differential fuzzer for the attention pattern: random attention blocks built from the spellings
real code uses (layout, GQA form, where the scale goes, the mask and its constant, soft-cap,
softmax form, upcasts; as is, inside ``jax.checkpoint`` or as a ``lax.scan`` body) and from its
near misses. A fusable block must fuse once and be no further from a float64 truth than jax.jit
(the op is blockwise, so not bit-for-bit); a near miss must be reported with its reason and give
jax.jit's answer exactly.

Budget: a sixth of ``JFUSE_FUZZ_EXAMPLES`` (default 3 here: each example compiles three programs
or more); ``JFUSE_FUZZ_EXAMPLES=600`` for a long run.
"""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import jfuse
from jfuse import MissReason

from test_attention_pattern import assert_accurate

EXAMPLES = max(1, int(os.environ.get("JFUSE_FUZZ_EXAMPLES", "20")) // 6)

MASKS = ["none", "tril", "iota", "window", "lengths", "segments", "dense", "additive -inf",
         "bias"]
CONSTANTS = {"-inf": -jnp.inf, "finfo.min": None, "-1e9": -1e9, "-1e10": -1e10, "-1e30": -1e30,
             "-0.7 max": -0.7 * float(np.finfo(np.float32).max)}
NEAR_MISSES = {
    "none": None,
    "probabilities returned": MissReason.PROBABILITIES_ESCAPE,
    "dropout": MissReason.DROPOUT,
    "softmax over queries": MissReason.SOFTMAX_AXIS,
    "scale after mask": MissReason.SCORE_FUNCTION,
}


@st.composite
def attention_programs(draw):
    return dict(
        b=draw(st.sampled_from([1, 2])),
        t=draw(st.sampled_from([5, 8, 13])),
        n=4,
        kv=draw(st.sampled_from([4, 2, 1])),
        h=draw(st.sampled_from([4, 8])),
        layout=draw(st.sampled_from(["bthd", "bhtd"])),
        gqa=draw(st.sampled_from(["repeat", "5-D"])),
        scale_on=draw(st.sampled_from(["q", "k", "scores mul", "scores div"])),
        mask=draw(st.sampled_from(MASKS)),
        constant=draw(st.sampled_from(list(CONSTANTS))),
        soft_cap=draw(st.sampled_from([None, None, 30.0])),
        softmax=draw(st.sampled_from(["jax.nn", "manual", "manual stop_gradient"])),
        upcast=draw(st.booleans()),
        dtype=draw(st.sampled_from([jnp.float32, jnp.float32, jnp.bfloat16])),
        wrapper=draw(st.sampled_from(["none", "none", "checkpoint", "scan"])),
        near_miss=draw(st.sampled_from(list(NEAR_MISSES) + ["none"] * 3)),
        seed=draw(st.integers(0, 2**16)),
    )


def _softmax(kind, s, axis=-1):
    if kind == "jax.nn":
        return jax.nn.softmax(s, axis=axis)
    m = s.max(axis, keepdims=True)
    if kind == "manual stop_gradient":
        m = lax.stop_gradient(m)
    e = jnp.exp(s - m)
    return e / e.sum(axis, keepdims=True)


def _program(c):
    b, t, n, kv, h = c["b"], c["t"], c["n"], c["kv"], c["h"]
    g = n // kv
    constant = CONSTANTS[c["constant"]]
    scale = h ** -0.5

    def attention(q, k, v, lengths, ids, dense, bias):
        # q (b, t, n, h), k/v (b, t, kv, h); the layout is the einsum's.
        if c["scale_on"] == "q":
            q = q * jnp.asarray(scale, q.dtype)
        elif c["scale_on"] == "k":
            k = k / jnp.asarray(1 / scale, k.dtype)
        if c["gqa"] == "repeat" or g == 1:
            k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
            if c["layout"] == "bthd":
                s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
            else:
                q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
                s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
            heads = (n,)
        else:  # jax.nn / MaxText: q as (b, t, kv, g, h)
            q = jnp.reshape(q, (b, t, kv, g, h))
            s = jnp.einsum("btkgd,bskd->bkgts", q, k)
            heads = (kv, g)
        if c["scale_on"] == "scores mul":
            s = s * scale
        elif c["scale_on"] == "scores div":
            s = s / (1 / scale)
        if c["upcast"]:
            s = s.astype(jnp.float32)
        if c["soft_cap"]:
            s = jnp.tanh(s / c["soft_cap"]) * c["soft_cap"]
        i = jnp.arange(t)
        keep = None
        if c["mask"] == "tril":
            keep = jnp.tril(jnp.ones((t, t), bool))
        elif c["mask"] == "iota":
            keep = i[:, None] >= i[None, :]
        elif c["mask"] == "window":
            keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)
        elif c["mask"] == "lengths":
            keep = jnp.reshape(i[None, :] < lengths[:, None], (b,) + (1,) * (len(heads) + 1) + (t,))
        elif c["mask"] == "segments":
            keep = jnp.reshape(ids[:, :, None] == ids[:, None, :], (b,) + (1,) * len(heads) + (t, t))
        elif c["mask"] == "dense":
            keep = jnp.reshape(dense, (b,) + (1,) * len(heads) + (t, t))
        if keep is not None:
            fill = jnp.finfo(s.dtype).min if constant is None else constant
            s = jnp.where(keep, s, fill)
            if c["near_miss"] == "scale after mask":
                s = s * 0.5
        elif c["near_miss"] == "scale after mask":
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9) * 0.5
        if c["mask"] == "additive -inf":
            s = s + jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, -jnp.inf).astype(s.dtype)
        elif c["mask"] == "bias":
            s = s + jnp.reshape(bias, (1,) * (1 + len(heads)) + (t, t)).astype(s.dtype)
        axis = -2 if c["near_miss"] == "softmax over queries" else -1
        p = _softmax(c["softmax"], s, axis)
        if c["near_miss"] == "dropout":
            keep_p = jax.random.bernoulli(jax.random.key(1, impl="rbg"), 0.9, p.shape)
            p = jnp.where(keep_p, p / 0.9, 0.0)
        p = p.astype(v.dtype)
        if len(heads) == 2:
            o = jnp.reshape(jnp.einsum("bkgts,bskd->btkgd", p, v), (b, t, n, h))
        elif c["layout"] == "bthd":
            o = jnp.einsum("bhqk,bkhd->bqhd", p, v)
        else:
            o = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", p, v), 1, 2)
        return o, (p if c["near_miss"] == "probabilities returned" else None)

    def body(params, x, lengths, ids, dense):
        q, k, v = (jnp.reshape(x @ params[w], (b, t, -1, h)) for w in ("wq", "wk", "wv"))
        o, extra = attention(q, k, v, lengths, ids, dense, params["bias"])
        y = x + jnp.reshape(o, (b, t, n * h)).astype(x.dtype)
        return y, extra

    if c["wrapper"] == "checkpoint":
        return jax.checkpoint(body)
    if c["wrapper"] == "scan":
        def program(params, x, lengths, ids, dense):
            # The extra output (returned probabilities) leaves the loop as its per-step output:
            # dropped there, the "probabilities returned" near miss would be dead code, rightly
            # fused.
            return lax.scan(lambda y, _: body(params, y, lengths, ids, dense), x, None, length=2)
        return program
    return body


def _inputs(c):
    rng = np.random.default_rng(c["seed"])
    b, t, n, kv, h, dtype = c["b"], c["t"], c["n"], c["kv"], c["h"], c["dtype"]
    d = n * h
    params = {w: jnp.asarray(rng.standard_normal((d, heads * h)) / np.sqrt(d), dtype)
              for w, heads in (("wq", n), ("wk", kv), ("wv", kv))}
    params["bias"] = jnp.asarray(rng.standard_normal((t, t)), dtype)
    x = jnp.asarray(rng.standard_normal((b, t, d)), dtype)
    lengths = jnp.asarray(rng.integers(1, t + 1, size=b), jnp.int32)
    ids = jnp.asarray(np.sort(rng.integers(0, 3, size=(b, t)), axis=1), jnp.int32)
    dense = jnp.asarray(rng.random((b, t, t)) > 0.3).at[..., 0].set(True)
    return params, x, lengths, ids, dense


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 50,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(attention_programs())
def test_random_attention_never_changes_the_answer(c):
    program = _program(c)
    args = _inputs(c)
    report = jfuse.explain(program)(*args)
    assert not report.fallbacks, f"{c}\n{report}"
    expected_miss = NEAR_MISSES[c["near_miss"]]
    misses = [m.reason for m in report.missed if m.pattern == "attention"]
    if expected_miss is None:
        assert report.fused.get("attention") == 1 and not misses, f"{c}\n{report}"
        assert_accurate(program, *args, dtype=c["dtype"])
    else:
        assert "attention" not in report.fused and misses == [expected_miss], f"{c}\n{report}"
        chex.assert_trees_all_equal(jfuse.jit(program)(*args), jax.jit(program)(*args))
