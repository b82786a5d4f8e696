"""`jfuse.ops.linear_cross_entropy`: the logit statistics and the loss against float64 dense
optax/jax.nn forms, every transform, ragged vocabularies, ignore labels (masked, and the NaN/wrap
semantics of an unmasked one), the accuracy rule in bf16, bad input, and the compiled memory that
is the op's reason to exist."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfuse
from jfuse.ops.linear_cross_entropy import logit_statistics

# The default run takes the first cases of these parametrized tests; the rest are slow
# cases, sampled (tests/conftest.py) and all run with JFUSE_SLOW=1.
DEFAULT_CASES = {
    "test_loss_and_gradients_match_dense_in_float64": 2,
    "test_ignore_labels_masked_with_where_and_unmasked": 1,
    "test_bf16_no_further_from_the_truth_than_jax_jit": 1,
}


lce_module = sys.modules["jfuse.ops.linear_cross_entropy"]

T, K, V = 37, 16, 203
BLOCK = 64  # small vocabulary blocks, so every case spans several, the last one ragged


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(lce_module, "BLOCK_V", BLOCK)


def _inputs(rng, dtype=jnp.float32, t=T, k=K, v=V):
    h = jnp.asarray(rng.standard_normal((t, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, v)) * k ** -0.5 * 3, dtype)
    b = jnp.asarray(rng.standard_normal((v,)), dtype)
    y = jnp.asarray(rng.integers(0, v, (t,)), jnp.int32)
    return h, w, b, y


def dense(h, w, y, *, bias=None, transpose_w=False, cap=None, smoothing=0.0, z_loss=0.0):
    """The loss as users write it: logits, then optax's integer-label cross-entropy."""
    z = h @ (w.T if transpose_w else w)
    if bias is not None:
        z = z + bias
    if cap is not None:
        z = jnp.tanh(z / cap) * cap
    if smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype), smoothing)
        loss = optax.softmax_cross_entropy(z, targets)
    else:
        loss = optax.softmax_cross_entropy_with_integer_labels(z, y)
    if z_loss:
        loss = loss + z_loss * jax.nn.logsumexp(z, axis=-1) ** 2
    return loss


def fused(h, w, y, *, bias=None, transpose_w=False, cap=None, smoothing=0.0, z_loss=0.0):
    return jfuse.ops.linear_cross_entropy(
        h, w, y, bias=bias, transpose_w=transpose_w, logits_soft_cap=cap,
        label_smoothing=smoothing, z_loss=z_loss)


CASES = {
    "plain": {},
    "bias": dict(bias=True),
    "tied": dict(transpose_w=True),
    "soft_cap": dict(cap=2.0, bias=True),
    "smoothing_z_loss": dict(smoothing=0.1, z_loss=1e-2),
}


def _sampled(cases, default):
    return [c if c in default else pytest.param(c, marks=pytest.mark.slow) for c in cases]


@pytest.mark.parametrize("case", _sampled(CASES, ("plain", "bias", "smoothing_z_loss")))
def test_loss_and_gradients_match_dense_in_float64(case, rng):
    """In float64 the chunked loss and its derivative equal optax's dense loss to rounding."""
    with jax.enable_x64():
        h, w, b, y = _inputs(rng, jnp.float64)
        kw = dict(CASES[case])
        bias = b if kw.pop("bias", False) else None
        if kw.get("transpose_w"):
            w = w.T
        ct = jnp.asarray(rng.standard_normal((T,)))

        def loss(f):
            return lambda h, w, bias: jnp.sum(f(h, w, y, bias=bias, **kw) * ct)

        np.testing.assert_allclose(jax.jit(lambda h, w, b: fused(h, w, y, bias=b, **kw))(h, w, bias),
                                   dense(h, w, y, bias=bias, **kw), atol=1e-12)
        argnums = (0, 1) if bias is None else (0, 1, 2)
        got = jax.jit(jax.grad(loss(fused), argnums=argnums))(h, w, bias)
        want = jax.jit(jax.grad(loss(dense), argnums=argnums))(h, w, bias)
        for g, wnt in zip(got, want):
            np.testing.assert_allclose(g, wnt, atol=1e-12)


def test_statistics_match_their_definitions_for_every_vocab_size(rng):
    """lse, z[label] and mean(z) per token, for a vocabulary under one block, exactly whole
    blocks, and ragged (padding never enters the log-sum-exp)."""
    with jax.enable_x64():
        for v in (50, 2 * BLOCK, 2 * BLOCK + 1):
            h, w, _, y = _inputs(rng, jnp.float64, v=v)
            lse, zl, zm = logit_statistics(h, w, y, with_mean=True, block_v=BLOCK)
            z = h @ w
            np.testing.assert_allclose(lse, jax.nn.logsumexp(z, axis=-1), atol=1e-12)
            np.testing.assert_allclose(zl, jnp.take_along_axis(z, y[:, None], -1)[:, 0],
                                       atol=1e-12)
            np.testing.assert_allclose(zm, jnp.mean(z, axis=-1), atol=1e-12)


def test_jvp_vmap_and_value_and_grad(rng):
    with jax.enable_x64():
        h, w, b, y = _inputs(rng, jnp.float64)
        dh, dw = (jnp.asarray(rng.standard_normal(a.shape)) for a in (h, w))
        got = jax.jvp(lambda h, w: fused(h, w, y), (h, w), (dh, dw))
        want = jax.jvp(lambda h, w: dense(h, w, y), (h, w), (dh, dw))
        for g, wnt in zip(got, want):
            np.testing.assert_allclose(g, wnt, atol=1e-12)
        hs = jnp.stack([h, 2 * h])
        np.testing.assert_allclose(jax.vmap(lambda h: fused(h, w, y))(hs),
                                   jax.vmap(lambda h: dense(h, w, y))(hs), atol=1e-12)
        mean = lambda f: lambda h, w: jnp.mean(f(h, w, y))
        (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(mean(f), argnums=(0, 1)))(h, w)
                              for f in (fused, dense))
        np.testing.assert_allclose(v1, v2, atol=1e-12)
        for a, c in zip(g1, g2):
            np.testing.assert_allclose(a, c, atol=1e-12)


@pytest.mark.slow
def test_hessian_vector_product(rng):
    """Forward-over-reverse through the nested custom_jvps."""
    with jax.enable_x64():
        h, w, _, y = _inputs(rng, jnp.float64)
        dh = jnp.asarray(rng.standard_normal(h.shape))
        mean = lambda f: lambda h, w: jnp.mean(f(h, w, y))
        hvp = lambda f: jax.jvp(jax.grad(lambda h: mean(f)(h, w)), (h,), (dh,))[1]
        np.testing.assert_allclose(hvp(fused), hvp(dense), atol=1e-12)


def test_leading_dims_and_reductions(rng):
    with jax.enable_x64():
        h, w, _, y = _inputs(rng, jnp.float64, t=24)
        h3, y3 = h.reshape(2, 12, K), y.reshape(2, 12)
        per_token = jfuse.ops.linear_cross_entropy(h3, w, y3)
        assert per_token.shape == (2, 12)
        np.testing.assert_allclose(per_token, dense(h, w, y).reshape(2, 12), atol=1e-12)
        np.testing.assert_allclose(
            jfuse.ops.linear_cross_entropy(h3, w, y3, reduction="sum"), dense(h, w, y).sum(),
            atol=1e-11)
        np.testing.assert_allclose(
            jfuse.ops.linear_cross_entropy(h3, w, y3, reduction="mean"), dense(h, w, y).mean(),
            atol=1e-12)


@pytest.mark.parametrize("vocab", [50, V], ids=["V<100_nan", "V>=100_wraps"])
def test_ignore_labels_masked_with_where_and_unmasked(vocab, rng):
    """A -100 label: masked with `where`, loss and gradients equal the user's masked mean (and
    ignore_index gives the same); unmasked, the per-token loss is what take_along_axis gives:
    NaN when -100 is out of [-V, V), the logit at V - 100 otherwise."""
    with jax.enable_x64():
        h, w, _, y = _inputs(rng, jnp.float64, v=vocab)
        y = y.at[::3].set(-100)
        mask = y != -100

        def masked_mean(f):
            def loss(h, w):
                nll = f(h, w, y)
                return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(mask.sum(), 1)
            return loss

        want = jax.value_and_grad(masked_mean(dense), argnums=(0, 1))(h, w)
        for got in (jax.value_and_grad(masked_mean(fused), argnums=(0, 1))(h, w),
                    jax.value_and_grad(lambda h, w: jfuse.ops.linear_cross_entropy(
                        h, w, y, reduction="mean", ignore_index=-100), argnums=(0, 1))(h, w)):
            np.testing.assert_allclose(got[0], want[0], atol=1e-12)
            for g, wnt in zip(got[1], want[1]):
                np.testing.assert_allclose(g, wnt, atol=1e-12)
        unmasked_got, unmasked_want = fused(h, w, y), dense(h, w, y)
        assert bool(jnp.all(jnp.isnan(unmasked_got[::3]))) == (vocab < 100)
        np.testing.assert_allclose(unmasked_got, unmasked_want, atol=1e-12)  # NaN == NaN
        # The gradient of the unmasked mean: take_along_axis's transpose drops the gather.
        grads = [jax.grad(lambda h: jnp.mean(f(h, w, y)))(h) for f in (fused, dense)]
        np.testing.assert_allclose(grads[0], grads[1], atol=1e-12)


def test_one_hot_label_mode_picks_zero_out_of_range(rng):
    """`label_mode="one_hot"` is a contraction with jax.nn.one_hot: out of range picks 0."""
    with jax.enable_x64():
        h, w, _, y = _inputs(rng, jnp.float64)
        y = y.at[:4].set(jnp.asarray([-1, -100, V, 2 * V], jnp.int32))
        _, zl, _ = logit_statistics(h, w, y, label_mode="one_hot", block_v=BLOCK)
        want = jnp.sum(jax.nn.one_hot(y, V, dtype=h.dtype) * (h @ w), axis=-1)
        np.testing.assert_allclose(zl, want, atol=1e-12)
        _, zl_take, _ = logit_statistics(h, w, y, label_mode="take", block_v=BLOCK)
        np.testing.assert_allclose(zl_take, jnp.take_along_axis(h @ w, y[:, None], -1)[:, 0],
                                   atol=1e-12)


@pytest.mark.parametrize("case", _sampled(["plain", "soft_cap"], ("plain",)))
def test_bf16_no_further_from_the_truth_than_jax_jit(case, rng):
    """bf16 h and W, f32 logits: the loss and gradients are no further from a float64 truth
    than jax.jit's dense loss (which rounds the logits to bf16 before the upcast)."""
    h, w, b, y = _inputs(rng, jnp.bfloat16, t=64, k=64, v=1000)
    cap = 3.0 if case == "soft_cap" else None

    def user(h, w):
        z = (h @ w).astype(jnp.float32)
        if cap is not None:
            z = jnp.tanh(z / cap) * cap
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))

    def ours(h, w):
        return jfuse.ops.linear_cross_entropy(h, w, y, logits_soft_cap=cap, reduction="mean")

    with jax.enable_x64():
        f64 = tuple(a.astype(jnp.float64) for a in (h, w))
        truth = jax.value_and_grad(lambda h, w: jnp.mean(dense(h, w, y, cap=cap)),
                                   argnums=(0, 1))(*f64)
    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(h, w)
    theirs = jax.jit(jax.value_and_grad(user, argnums=(0, 1)))(h, w)
    assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16

    def err(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    for g, j, t in zip(jax.tree.leaves(got), jax.tree.leaves(theirs), jax.tree.leaves(truth)):
        scale = float(np.max(np.abs(np.asarray(t, np.float64))))
        assert err(g, t) <= err(j, t) + 1e-2 * scale, (err(g, t), err(j, t))


def test_f32_accumulation_of_dh_across_blocks(rng):
    """dh sums one term per vocabulary block: summed in f32 it stays close to the truth where a
    bf16 sum across 32 blocks would not (the chunked-loss defect the reference notes)."""
    h, w, _, y = _inputs(rng, jnp.bfloat16, t=16, k=32, v=32 * BLOCK)
    grad = jax.jit(jax.grad(lambda h: jfuse.ops.linear_cross_entropy(h, w, y, reduction="sum")))
    with jax.enable_x64():
        truth = jax.grad(lambda h: jnp.sum(dense(h, w.astype(jnp.float64), y)))(
            h.astype(jnp.float64))
    err = np.max(np.abs(np.asarray(grad(h), np.float64) - np.asarray(truth)))
    # One bf16 rounding of the result: half an ulp of the largest entry (2^-9 relative).
    assert err <= 2.0 ** -8 * float(np.max(np.abs(truth))), err


def test_value_and_grad_memory_far_below_the_dense_loss(monkeypatch):
    """At T=1024, V=32k, K=256 f32 the dense loss keeps (T, V) logits and softmax (256 MiB);
    the chunked one holds a block of logits at a time."""
    monkeypatch.setattr(lce_module, "BLOCK_V", 1024)
    t, k, v = 1024, 256, 32768
    h, w = jax.ShapeDtypeStruct((t, k), jnp.float32), jax.ShapeDtypeStruct((k, v), jnp.float32)
    y = jax.ShapeDtypeStruct((t,), jnp.int32)

    def temp(f):
        step = jax.jit(jax.value_and_grad(lambda h, w, y: jnp.mean(f(h, w, y)), argnums=(0, 1)))
        return step.lower(h, w, y).compile().memory_analysis().temp_size_in_bytes

    ratio = temp(fused) / temp(dense)
    assert ratio <= 0.3, ratio


@pytest.mark.parametrize("call, error, words", [
    (lambda h, w, y: jfuse.ops.linear_cross_entropy(h.astype(jnp.int32), w, y), TypeError, "h must"),
    (lambda h, w, y: jfuse.ops.linear_cross_entropy(h, w[None], y), ValueError, "w must be 2-D"),
    (lambda h, w, y: jfuse.ops.linear_cross_entropy(h, w.T, y), ValueError, "transpose_w=True"),
    (lambda h, w, y: jfuse.ops.linear_cross_entropy(h, w, y[1:]), ValueError, "labels must"),
    (lambda h, w, y: jfuse.ops.linear_cross_entropy(h, w, y.astype(jnp.float32)), ValueError,
     "labels must"),
    (lambda h, w, y: jfuse.ops.linear_cross_entropy(h, w, y, bias=jnp.ones(3)), ValueError,
     "bias must"),
    (lambda h, w, y: jfuse.ops.linear_cross_entropy(h, w, y, reduction="avg"), ValueError,
     "reduction must"),
    (lambda h, w, y: jfuse.ops.linear_cross_entropy(h, w, y, label_smoothing=1.5), ValueError,
     "label_smoothing must"),
    (lambda h, w, y: jfuse.ops.linear_cross_entropy(h, w, y, logits_soft_cap=0.0), ValueError,
     "logits_soft_cap must"),
    (lambda h, w, y: jfuse.ops.linear_cross_entropy(h, w, y, implementation="cuda"), ValueError,
     "implementation"),
])
def test_bad_arguments_name_the_argument(call, error, words, rng):
    h, w, _, y = _inputs(rng)
    with pytest.raises(error, match=words):
        call(h, w, y)


def test_report_says_no_kernel_per_platform():
    from jfuse.ops.linear_cross_entropy import linear_cross_entropy_refusals

    refusals = linear_cross_entropy_refusals(
        jax.ShapeDtypeStruct((8, 4), jnp.float32), jax.ShapeDtypeStruct((4, 16), jnp.float32),
        jax.ShapeDtypeStruct((8,), jnp.int32))
    assert set(refusals) == {"tpu", "cuda"}
    assert all("no Pallas kernel is measured faster" in r for r in refusals.values())
