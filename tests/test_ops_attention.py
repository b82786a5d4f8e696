"""`jfuse.ops.attention`: numerics of every mask kind against float64 dense attention, every
transform, the kernels (interpret mode and lowering for TPU and GPU), bad input, and the O(T)
memory that is the op's reason to exist."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfuse
from jfuse.ops.attention import DEFAULT_MASK_VALUE, fused_attention
from jfuse.pallas import attention as kernels

from conftest import structural_mask
from lowering import count_kernel_calls, lower_for

B, T, S, N, K, H = 2, 37, 45, 4, 2, 8
BLOCK = 16  # small key blocks, so every case spans several, the last one ragged


def dense(q, k, v, bias=None, mask=None, *, is_causal=False, window=None, q_seg=None,
          kv_seg=None, lengths=None, cap=None, scale=None, mask_value=DEFAULT_MASK_VALUE):
    """The dense attention users write (jnp.repeat GQA, where-masking, softmax), in q's dtype."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    if cap is not None:
        s = jnp.tanh(s / cap) * cap
    if bias is not None:
        s = s + bias
    t, n = s.shape[-2:]
    keep = jnp.broadcast_to(structural_mask(t, n, is_causal=is_causal, window=window), s.shape)
    if q_seg is not None:
        keep &= (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
    if lengths is not None:
        keep &= (jnp.arange(n)[None, :] < lengths[:, None])[:, None, None]
    if mask is not None:
        keep &= mask
    s = jnp.where(keep, s, mask_value)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v)


def _inputs(rng, dtype=jnp.float32, t=T, s=S, n=N, k=K, h=H):
    q = rng.standard_normal((B, t, n, h))
    kk = rng.standard_normal((B, s, k, h))
    v = rng.standard_normal((B, s, k, h))
    return tuple(jnp.asarray(a, dtype) for a in (q, kk, v))


def _masks(rng):
    return {
        "none": {},
        "causal": dict(is_causal=True),
        "window": dict(window=(5, 3)),
        "causal_window": dict(is_causal=True, window=(7, None)),
        "segments": dict(q_seg=jnp.asarray(rng.integers(0, 3, (B, T)), jnp.int32),
                         kv_seg=jnp.asarray(rng.integers(0, 3, (B, S)), jnp.int32)),
        "lengths": dict(lengths=jnp.asarray([S, 20], jnp.int32)),
        "dense_mask": dict(mask=jnp.asarray(rng.random((B, 1, T, S)) > 0.3)),
        "bias": dict(bias=jnp.asarray(rng.standard_normal((1, N, T, S)), jnp.float32)),
        "soft_cap": dict(cap=2.0, is_causal=True),
    }


def _fused(q, k, v, bias=None, mask=None, *, is_causal=False, window=None, q_seg=None,
           kv_seg=None, lengths=None, cap=None, mask_value=DEFAULT_MASK_VALUE,
           implementation="xla", block_k=BLOCK):
    return fused_attention(
        q, k, v, None if bias is None else bias.astype(q.dtype), mask, q_seg, kv_seg, lengths,
        implementation=implementation, scale=1 / math.sqrt(q.shape[-1]), is_causal=is_causal,
        window=window, soft_cap=cap, mask_value=mask_value, block_k=block_k)


_fused_xla = _fused  # the op with keyword defaults, for tests that rebind ``_fused``


def _f64(*arrays):
    return tuple(None if a is None else np.asarray(a, np.float64) for a in arrays)


# The default run takes one case of each kind of mask; JFUSE_SLOW=1 (or the sample) the rest.
DEFAULT_MASKS = ("causal", "segments", "bias", "soft_cap")


def _sampled(cases, default):
    return [c if c in default else pytest.param(c, marks=pytest.mark.slow) for c in cases]


@pytest.mark.parametrize("case", _sampled(_masks(np.random.default_rng(0)), DEFAULT_MASKS))
def test_forward_and_gradients_match_dense_in_float64(case, rng):
    """In float64 the blockwise op and its derivative equal dense attention to rounding."""
    with jax.enable_x64():
        q, k, v = _inputs(rng, jnp.float64)
        kw = _masks(rng)[case]
        kw = {key: (val.astype(jnp.float64) if key == "bias" else val) for key, val in kw.items()}
        fused_out = jax.jit(lambda *a: _fused(*a, **kw))(q, k, v)
        np.testing.assert_allclose(fused_out, dense(q, k, v, **kw), atol=1e-12)
        ct = jnp.asarray(rng.standard_normal(q.shape))
        args = (q, k, v) + ((kw.pop("bias"),) if "bias" in kw else ())

        def loss(f):
            return lambda q, k, v, *b: jnp.sum(f(q, k, v, *b, **kw) * ct)

        got = jax.jit(jax.grad(loss(_fused), argnums=tuple(range(len(args)))))(*args)
        want = jax.jit(jax.grad(loss(dense), argnums=tuple(range(len(args)))))(*args)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-11)


@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow),
                                   jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_no_further_from_float64_than_dense_attention(dtype, implementation, rng):
    """The accuracy rule: in f32 and bf16 the op is no further from a float64 truth than the
    dense attention jax.jit runs, forward and gradients. Interpreted, at shapes splash serves,
    the gradients are the kernel library's own backward."""
    if implementation == "xla":
        q, k, v = _inputs(rng, dtype)
    else:
        q, k, v = _inputs(rng, dtype, t=128, s=128, h=32)
    _fused = functools.partial(_fused_xla, implementation=implementation,
                               block_k=BLOCK if implementation == "xla" else 128)
    truth_args = tuple(a.astype(jnp.float32) for a in (q, k, v))
    ct = jnp.asarray(rng.standard_normal(q.shape), dtype)

    def loss(f):
        return lambda q, k, v: jnp.sum((f(q, k, v, is_causal=True) * ct).astype(jnp.float32))

    with jax.enable_x64():
        f64 = tuple(a.astype(jnp.float64) for a in truth_args)
        truth = jax.grad(loss(dense), argnums=(0, 1, 2))(*f64)
        truth_out = dense(*f64, is_causal=True)
    ours = jax.jit(jax.grad(loss(_fused), argnums=(0, 1, 2)))(q, k, v)
    theirs = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    floor = 1e-6 if dtype == jnp.float32 else 1e-2

    def err(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    out_ours = err(jax.jit(lambda *a: _fused(*a, is_causal=True))(q, k, v), truth_out)
    out_theirs = err(jax.jit(lambda *a: dense(*a, is_causal=True))(q, k, v), truth_out)
    assert out_ours <= 2 * out_theirs + floor
    for o, t, r in zip(ours, theirs, truth):
        assert err(o, r) <= 2 * err(t, r) + floor * float(np.max(np.abs(r)))


def test_public_op_gqa_layouts_and_defaults(rng):
    q, k, v = _inputs(rng)
    want = dense(q, k, v, is_causal=True)
    np.testing.assert_allclose(jfuse.ops.attention(q, k, v, is_causal=True), want, atol=2e-6)
    bnth = [jnp.swapaxes(a, 1, 2) for a in (q, k, v)]
    got = jfuse.ops.attention(*bnth, is_causal=True, layout="BNTH")
    np.testing.assert_allclose(jnp.swapaxes(got, 1, 2), want, atol=2e-6)
    # jax.nn's own attention agrees (its conventions are the op's: BTNH, GQA, is_causal).
    np.testing.assert_allclose(jax.nn.dot_product_attention(q, k, v, is_causal=True), want,
                               atol=2e-6)


@pytest.mark.parametrize("mask_value", [DEFAULT_MASK_VALUE, pytest.param(-1e9, marks=pytest.mark.slow),
                                        -jnp.inf])
def test_fully_masked_rows_give_what_dense_code_gives(mask_value, rng):
    """A row with every key masked: the average of V for a finite constant, NaN for -inf."""
    q, k, v = _inputs(rng)
    mask = jnp.ones((B, 1, T, S), bool).at[:, :, 3].set(False)
    got = jax.jit(lambda *a: _fused(*a, mask=mask, mask_value=mask_value))(q, k, v)
    want = dense(q, k, v, mask=mask, mask_value=mask_value)
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert bool(jnp.isnan(got[:, 3]).all()) == (mask_value == -jnp.inf)
    if mask_value != -jnp.inf:
        g = jax.jit(jax.grad(lambda v: jnp.sum(_fused(q, k, v, mask=mask,
                                                      mask_value=mask_value))))(v)
        w = jax.grad(lambda v: jnp.sum(dense(q, k, v, mask=mask, mask_value=mask_value)))(v)
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_a_query_with_one_valid_key_gets_no_gradient_noise(rng):
    """A query that attends a single key has probabilities exactly (1, 0, ...), so its output is
    that key's value and the exact gradient w.r.t. its query (and, through the scores, w.r.t.
    the keys) is 0. Dense autodiff gives 0 exactly; so must the blockwise derivative for a
    sequence of one block (found by the fuzzer as noise 5-10x jax.jit's error in dq and dk)."""
    q, k, v = _inputs(rng, jnp.float32)
    lengths = jnp.array([1, S], jnp.int32)
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(q, k):
        out = jfuse.ops.attention(q, k, v, key_value_seq_lengths=lengths)
        return jnp.sum(out * ct)

    dq, dk = jax.grad(loss, argnums=(0, 1))(q, k)
    assert np.all(np.asarray(dq[0]) == 0.0) and np.all(np.asarray(dk[0]) == 0.0)
    assert np.any(np.asarray(dq[1]) != 0.0)  # the other example's queries do learn


def test_jvp_vmap_and_hessian_vector_products(rng):
    q, k, v = _inputs(rng)
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in (q, k, v))
    f = lambda q, k, v: _fused(q, k, v, is_causal=True)  # noqa: E731
    g = lambda q, k, v: dense(q, k, v, is_causal=True)  # noqa: E731
    jvp = jax.jit(lambda *a: jax.jvp(f, a, tangents)[1])
    np.testing.assert_allclose(jvp(q, k, v), jax.jvp(g, (q, k, v), tangents)[1], atol=2e-5)
    per_example = jax.jit(jax.vmap(lambda q, k, v: f(q[None], k[None], v[None])[0]))(q, k, v)
    np.testing.assert_allclose(per_example, g(q, k, v), atol=2e-6)

    def hvp(fn):
        grad = jax.grad(lambda q: jnp.sum(jnp.sin(fn(q, k, v))))
        return jax.jit(lambda q: jax.jvp(grad, (q,), (tangents[0],))[1])(q)

    np.testing.assert_allclose(hvp(f), hvp(g), atol=5e-5)


def test_transforms_through_the_kernels_backward(rng):
    """Where a kernel serves the forward (splash, interpreted), grad runs its backward; forward
    mode, vmap and second order still give dense attention's derivatives."""
    q, k, v = _inputs(rng, t=128, s=128, h=32)
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in (q, k, v))
    f = lambda q, k, v: _fused(q, k, v, is_causal=True, implementation="interpret",  # noqa: E731
                               block_k=128)
    g = lambda q, k, v: dense(q, k, v, is_causal=True)  # noqa: E731
    grad = lambda fn: jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))  # noqa
    assert "jfuse_kernel_transposed_backward" in str(jax.make_jaxpr(grad(f))(q, k, v))
    for got, want in zip(jax.jit(grad(f))(q, k, v), grad(g)(q, k, v)):
        np.testing.assert_allclose(got, want, atol=2e-5)
    jvp = jax.jit(lambda *a: jax.jvp(f, a, tangents)[1])
    np.testing.assert_allclose(jvp(q, k, v), jax.jvp(g, (q, k, v), tangents)[1], atol=2e-5)
    per_example = jax.jit(jax.vmap(grad(lambda q, k, v: f(q[None], k[None], v[None]))))
    for got, want in zip(per_example(q, k, v), jax.vmap(grad(
            lambda q, k, v: g(q[None], k[None], v[None])))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=2e-5)

    def hvp(fn):
        first = jax.grad(lambda q: jnp.sum(jnp.sin(fn(q, k, v))))
        return jax.jit(lambda q: jax.jvp(first, (q,), (tangents[0],))[1])(q)

    np.testing.assert_allclose(hvp(f), hvp(g), atol=5e-5)


def test_second_order_with_integer_and_boolean_operands(rng):
    """Hessian-vector products differentiate the backward's residuals, among them the segment
    ids, key lengths and dense mask, which carry no tangent (float0)."""
    q, k, v = _inputs(rng)
    masks = _masks(rng)
    kw = dict(q_seg=masks["segments"]["q_seg"], kv_seg=masks["segments"]["kv_seg"],
              lengths=jnp.asarray([S, 30], jnp.int32), mask=masks["dense_mask"]["mask"])
    f = lambda q, k, v: _fused(q, k, v, **kw)  # noqa: E731
    g = lambda q, k, v: dense(q, k, v, **kw)  # noqa: E731
    tangent = jnp.asarray(rng.standard_normal(q.shape), q.dtype)

    def hvp(fn):
        first = jax.grad(lambda q, k: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1))
        return jax.jit(lambda q, k: jax.jvp(first, (q, k), (tangent, k))[1])(q, k)

    for got, want in zip(hvp(f), hvp(g)):
        np.testing.assert_allclose(got, want, atol=5e-5)


def test_a_broadcast_bias_gradient_stays_bias_sized(rng):
    """The backward reduces a broadcast bias's gradient block by block: a (1, 1, T, S) bias
    over 8 key blocks must not cost a stacked (B, N, T, S) buffer (64 MiB here)."""
    b, n, t, h = 4, 4, 1024, 16
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((1, 1, t, t)), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, bias: jnp.sum(_fused(q, q, q, bias, block_k=128)),
                            argnums=(0, 1)))
    temp = grad.lower(q, bias).compile().memory_analysis().temp_size_in_bytes
    # The per-block buffers (scores, probabilities, their gradients: 8 MiB each) remain.
    assert temp < b * n * t * t * 4, temp / 2**20
    # And it is the right gradient, against dense attention's on a smaller problem.
    small_q, small_bias = q[:, :128], bias[:, :, :128, :128]
    got = jax.grad(lambda bias: jnp.sum(jnp.sin(_fused(small_q, small_q, small_q, bias,
                                                       block_k=32))))(small_bias)
    want = jax.grad(lambda bias: jnp.sum(jnp.sin(dense(small_q, small_q, small_q, bias))))(
        small_bias)
    np.testing.assert_allclose(got, want, atol=2e-5)


# --- kernels -------------------------------------------------------------------------------

KERNEL_CASES = {
    "causal": dict(is_causal=True),
    "full": {},
    "soft_cap": dict(is_causal=True, cap=5.0),
    "window": dict(window=(32, 0)),
}


@pytest.mark.parametrize("case,dtype", [
    ("soft_cap", jnp.bfloat16),
    *(pytest.param(c, d, marks=pytest.mark.slow) for c in KERNEL_CASES
      for d in (jnp.float32, jnp.bfloat16) if (c, d) != ("soft_cap", jnp.bfloat16)),
])
def test_tpu_kernel_in_interpret_mode(case, dtype, rng):
    """Splash attention (interpret mode) through the op: forward and gradients as the XLA path."""
    q, k, v = _inputs(rng, dtype, t=128, s=128, h=32)
    kw = KERNEL_CASES[case]
    tol = 2e-6 if dtype == jnp.float32 else 2e-2

    def loss(impl):
        return lambda q, k, v: jnp.sum(_fused(q, k, v, implementation=impl, block_k=128, **kw)
                                       .astype(jnp.float32) ** 2)

    np.testing.assert_allclose(
        jax.jit(lambda *a: _fused(*a, implementation="interpret", **kw))(q, k, v)
        .astype(jnp.float32), _fused(q, k, v, **kw).astype(jnp.float32), atol=tol, rtol=tol)
    got = jax.jit(jax.grad(loss("interpret"), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
        scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.float32),
                                   atol=tol * scale * 5)


@pytest.mark.parametrize("is_causal", [True, False])
def test_triton_kernel_in_interpret_mode(is_causal, rng):
    """The Triton flash kernel's output and log-sum-exp (converted from base 2) against XLA."""
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in _inputs(rng, t=128, s=128, h=16))
    out, lse = kernels.flash_triton(q, k, v, scale=0.25, is_causal=is_causal, interpret=True)
    s = jnp.einsum("bnth,bnsh->bnts", q, jnp.repeat(k, N // K, axis=1)) * 0.25
    if is_causal:
        s = jnp.where(jnp.tril(jnp.ones((128, 128), bool)), s, -jnp.inf)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(s, axis=-1), atol=1e-5)
    want = jnp.einsum("bnts,bnsh->bnth", jax.nn.softmax(s, -1), jnp.repeat(v, N // K, axis=1))
    np.testing.assert_allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("is_causal", [True, False])
def test_triton_backward_in_interpret_mode(is_causal, rng):
    """The Triton kernel's own backward (what jax.grad runs where it serves the forward) against
    float64 dense attention, no further off than dense f32 attention's gradients."""
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in _inputs(rng, t=128, s=128, h=16))
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def dense_bnth(q, k, v):
        g = q.shape[1] // k.shape[1]
        s = jnp.einsum("bnth,bnsh->bnts", q, jnp.repeat(k, g, axis=1)) * 0.25
        if is_causal:
            s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
        return jnp.einsum("bnts,bnsh->bnth", jax.nn.softmax(s, -1), jnp.repeat(v, g, axis=1))

    kernel = lambda q, k, v: kernels.flash_triton(  # noqa: E731
        q, k, v, scale=0.25, is_causal=is_causal, interpret=True, with_lse=False)[0]
    got = jax.vjp(kernel, q, k, v)[1](ct)
    f32 = jax.vjp(dense_bnth, q, k, v)[1](ct)
    with jax.enable_x64(True):
        want = jax.vjp(dense_bnth, *(jnp.asarray(np.asarray(a), jnp.float64) for a in (q, k, v)))[
            1](jnp.asarray(np.asarray(ct), jnp.float64))
    for g, d, w in zip(got, f32, want):
        w = np.asarray(w)
        assert np.max(np.abs(np.asarray(g, np.float64) - w)) <= 4 * max(
            np.max(np.abs(np.asarray(d, np.float64) - w)), 1e-6)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_gradients_run_the_kernels_own_backward(platform, rng):
    # Where a kernel serves the forward, jax.grad runs its library's backward: the forward, the
    # library's forward without the log-sum-exp (what it differentiates) and its two backward
    # kernels (dq; dk and dv). A call no kernel serves keeps XLA's blockwise derivative.
    q, k, v = _inputs(rng, jnp.bfloat16, t=256, s=256, h=64)

    def grads(**kw):
        loss = lambda q, k, v: jnp.sum(jfuse.ops.attention(q, k, v, **kw)  # noqa: E731
                                       .astype(jnp.float32))
        return lower_for(jax.grad(loss, argnums=(0, 1, 2)), q, k, v, platform=platform)

    assert count_kernel_calls(grads(is_causal=True), platform) == 4
    bias = jnp.zeros((1, 1, 256, 256), jnp.bfloat16)
    assert count_kernel_calls(grads(bias=bias), platform) == 0


def test_backward_runs_the_kernel_or_the_blockwise_backward(rng):
    # Where a kernel serves the forward, jax.grad runs the kernel's backward on its platform and
    # the blockwise XLA backward elsewhere; a CPU program runs only the latter. Either way the
    # gradient is the transpose of the tangent primitive, never JAX's transpose of the
    # checkpointed tangent (no remat in the gradient's program).
    from jfuse.core import targets

    q, k, v = _inputs(rng, t=128, s=128, h=32)  # shapes the TPU and GPU kernels serve
    grad = jax.grad(lambda q, k, v: jnp.sum(jfuse.ops.attention(q, k, v, is_causal=True)))
    with targets.lowering_for(None):
        everywhere = str(jax.make_jaxpr(grad)(q, k, v))
    assert "jfuse_kernel_transposed_backward" in everywhere and "platform_index" in everywhere
    # Another batch size: JAX caches a derivative rule's trace per shape.
    with targets.lowering_for({"cpu"}):
        cpu = str(jax.make_jaxpr(grad)(q[:1], k[:1], v[:1]))
    assert "jfuse_kernel_transposed_backward" in cpu and "platform_index" not in cpu
    assert "remat" not in cpu and "checkpoint" not in cpu


@pytest.mark.parametrize("case,kernels_expected", [
    ("causal", {"tpu": 1, "cuda": 1}),
    ("soft_cap", {"tpu": 1, "cuda": 0}),
    ("window", {"tpu": 1, "cuda": 0}),
    ("bias", {"tpu": 0, "cuda": 0}),
])
def test_lowers_to_one_kernel_where_it_serves(case, kernels_expected, rng):
    q, k, v = _inputs(rng, jnp.bfloat16, t=256, s=256, h=64)
    kw = {"causal": dict(is_causal=True), "soft_cap": dict(is_causal=True, logits_soft_cap=5.0),
          "window": dict(local_window_size=(64, 0)),
          "bias": dict(bias=jnp.zeros((1, 1, 256, 256), jnp.bfloat16))}[case]
    for platform, expected in kernels_expected.items():
        text = lower_for(lambda q, k, v: jfuse.ops.attention(q, k, v, **kw), q, k, v,
                         platform=platform)
        assert count_kernel_calls(text, platform) == expected, platform


def test_refusals_name_the_reason():
    from jfuse.ops.attention import ATTENTION, AttentionSpec

    aval = jax.ShapeDtypeStruct((2, 64, 4, 64), jnp.bfloat16)
    spec = AttentionSpec(scale=0.125, is_causal=True)
    reasons = ATTENTION.refusals(spec, [aval, aval, aval] + [None] * 5)
    assert "multiples of 128" in reasons["tpu"] and "cuda" not in reasons
    bias = jax.ShapeDtypeStruct((1, 1, 64, 64), jnp.bfloat16)
    reasons = ATTENTION.refusals(spec, [aval, aval, aval, bias] + [None] * 4)
    assert all("bias" in reasons[p] for p in ("tpu", "cuda"))


def test_triton_blocks_fit_the_gpus_shared_memory():
    """Found on an H200: f32 at head dim 128 with 128-blocks asked for 256 KiB of shared memory
    (227 KiB there) and failed to launch. The q and k blocks shrink with the head dim and dtype
    so the q block and two stages of K and V blocks fit; bf16 keeps its 128-blocks."""
    budget = kernels.TRITON_SHARED_BYTES
    for dtype, head_dim, want in ((jnp.float32, 128, 64), (jnp.float32, 256, 32),
                                  (jnp.float32, 64, 128), (jnp.bfloat16, 128, 128),
                                  (jnp.bfloat16, 256, 64)):
        block = kernels.triton_block(4096, head_dim, dtype)
        assert block == want, (dtype, head_dim, block)
        assert 5 * block * head_dim * jnp.dtype(dtype).itemsize <= budget
    assert kernels.triton_block(100, 64, jnp.bfloat16) == 100  # never longer than the sequence
    # A sequence that is not whole blocks of the size the kernel would use is refused.
    shape = (1, 4, 96, 128)
    reason = kernels.triton_unsupported_reason(
        shape, shape, shape, jnp.float32, is_causal=False, window=None, soft_cap=None,
        has_bias=False, has_mask=False, has_segments=False, has_lengths=False)
    assert "64-blocks" in reason, reason


def test_triton_refuses_causal_with_fewer_keys_than_queries():
    """Found on an H200: causal f32 attention with S = T/2 came out 0.074 from float64 through
    the Triton kernel (jax.jit: 0.00048); jfuse's causal mask is top-left. XLA serves it; a
    square causal call still runs the kernel."""
    from jfuse.ops.attention import ATTENTION, AttentionSpec

    spec = AttentionSpec(scale=0.125, is_causal=True)
    q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.float32)  # (B, T, N, H)
    k = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.float32)
    reasons = ATTENTION.refusals(spec, [q, k, k] + [None] * 5)
    assert "top-left" in reasons["cuda"], reasons
    assert "cuda" not in ATTENTION.refusals(spec, [q, q, q] + [None] * 5)


def test_kernels_refuse_to_round_what_the_user_keeps_wider(rng):
    """Probabilities kept in f32 for the PV product (a bf16 V upcast), or an f32 output asked of
    it, are more exact under jax.jit than under a bf16 kernel: every platform runs XLA then, and
    the report says why."""
    from jfuse.ops.attention import ATTENTION, AttentionSpec

    aval = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    operands = [aval, aval, aval] + [None] * 5
    for field in ("probs_dtype", "out_dtype"):
        spec = AttentionSpec(scale=0.125, is_causal=True, **{field: jnp.float32})
        reasons = ATTENTION.refusals(spec, operands)
        assert set(reasons) == {"tpu", "cuda"}, field
        assert all("float32; the kernels round it to bfloat16" in r for r in reasons.values())
    served = AttentionSpec(scale=0.125, is_causal=True, probs_dtype=jnp.bfloat16,
                           out_dtype=jnp.bfloat16)
    assert ATTENTION.refusals(served, operands) == {}

    def user_attention(q, k, v):  # softmax kept in f32, V upcast by einsum's promotion
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / 8.0
        t = q.shape[1]
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

    q, k, v = _inputs(rng, jnp.bfloat16, t=256, s=256, k=N, h=64)
    fused = jfuse.fuse(user_attention)
    for platform in ("tpu", "cuda"):
        text = lower_for(fused, q, k, v, platform=platform)
        assert count_kernel_calls(text, platform) == 0, platform
    assert fused.last_report.fused == {"attention": 1}
    assert "the kernels round it to bfloat16" in " ".join(str(fused.last_report).split())


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("change,kind,words", [
    (dict(query=jnp.ones((2, 8, 4))), ValueError, "query must be 4-D"),
    (dict(key=jnp.ones((2, 8, 3, 16)), value=jnp.ones((2, 8, 3, 16))), ValueError,
     "multiple of key's 3 heads"),
    (dict(value=jnp.ones((2, 9, 2, 16))), ValueError, "value must match key's"),
    (dict(query=jnp.ones((2, 8, 4, 16), jnp.int32)), TypeError, "query must be a floating"),
    (dict(mask=jnp.ones((2, 1, 8, 8))), TypeError, "mask must be a boolean"),
    (dict(bias=jnp.ones((2, 3, 8, 8))), ValueError, "broadcastable to (B, N, T, S)"),
    (dict(query_segment_ids=jnp.zeros((2, 8), jnp.int32)), ValueError, "give both"),
    (dict(key_value_seq_lengths=jnp.zeros((3,), jnp.int32)), ValueError,
     "key_value_seq_lengths must be an integer array of shape (2,)"),
    (dict(local_window_size=(-1, 2)), ValueError, "local_window_size"),
    (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap must be positive"),
    (dict(layout="TBNH"), ValueError, "layout must be one of"),
    (dict(implementation="cuda"), ValueError, "implementation="),
])
def test_bad_input_names_the_argument(change, kind, words):
    args = dict(query=jnp.ones((2, 8, 4, 16)), key=jnp.ones((2, 8, 2, 16)),
                value=jnp.ones((2, 8, 2, 16)))
    args.update(change)
    with pytest.raises(kind, match=None) as info:
        jfuse.ops.attention(args.pop("query"), args.pop("key"), args.pop("value"), **args)
    assert words in str(info.value)


# --- memory --------------------------------------------------------------------------------

def _grad_temp_bytes(f, t):
    q = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
    return grad.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes


def test_backward_memory_grows_linearly_in_sequence_length():
    """Dense attention's backward holds (T, T) scores; the op's grows with T, not T²."""
    op = lambda q, k, v: jfuse.ops.attention(q, k, v, is_causal=True)  # noqa: E731
    reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    small, large = _grad_temp_bytes(op, 1024), _grad_temp_bytes(op, 4096)
    assert large <= 5 * small  # 4× the tokens: linear is 4×, quadratic 16×
    assert large <= 0.25 * _grad_temp_bytes(reference, 4096)
