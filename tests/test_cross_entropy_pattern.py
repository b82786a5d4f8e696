"""The linear_cross_entropy pattern on the ways users write an LM head's loss: each fuses (one
site), its value and gradients match jax.jit's (f32) or are no further from a float64 truth (bf16),
out-of-range and ignore labels give jax.jit's answer (NaN, wrap, clamp, where-masked), the near
misses are reported with their reason and leave the answer identical, and a Llama-style training
step fuses its head with a smaller compiled temp memory."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfuse
from jfuse import MissReason

# The default run takes the first cases of these parametrized tests; the rest are slow
# cases, sampled (tests/conftest.py) and all run with JFUSE_SLOW=1.
DEFAULT_CASES = {
    "test_unmasked_out_of_range_labels_give_jits_answer": 3,
    "test_each_form_fuses_and_matches_jit": 4,
    "test_near_misses_are_reported_and_exact": 3,
    "test_bf16_is_no_less_accurate_than_jit": 1,
}


B, T, K, V = 2, 6, 8, 40
IGNORE = -100


def _inputs(rng, dtype=jnp.float32, ignore=True):
    h = jnp.asarray(rng.standard_normal((B, T, K)), dtype)
    w = jnp.asarray(rng.standard_normal((K, V)) * K ** -0.5 * 3, dtype)
    y = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    if ignore:
        y = y.at[0, 1].set(IGNORE).at[1, 4].set(IGNORE)
    return h, w, y


def _masked_mean(per_token, y):
    valid = y != IGNORE
    return jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.maximum(valid.sum(), 1)


# --- the forms -----------------------------------------------------------------------------------

def optax_integer(h, w, y):
    return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(h @ w, y), y)


def optax_one_hot(h, w, y):
    return _masked_mean(optax.softmax_cross_entropy(h @ w, jax.nn.one_hot(y, V)), y)


def log_softmax_take(h, w, y):
    logp = jax.nn.log_softmax(h @ w, axis=-1)
    return _masked_mean(-jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0], y)


def logsumexp_index(h, w, y):
    z = (h @ w).reshape(-1, V)
    yy = y.reshape(-1)
    return _masked_mean(jax.nn.logsumexp(z, axis=-1) - z[jnp.arange(z.shape[0]), yy], yy)


def one_hot_contraction(h, w, y):
    z = h @ w
    return _masked_mean(jax.nn.logsumexp(z, -1) - jnp.sum(z * jax.nn.one_hot(y, V), -1), y)


def tied_embeddings(h, e, y):
    return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(h @ e.T, y), y)


def bias_soft_cap(h, w, y):
    z = h @ w + jnp.linspace(-1.0, 1.0, V)
    z = jnp.tanh(z / 5.0) * 5.0
    return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(z, y), y)


def einsum_z_loss_smoothing(h, w, y):
    z = jnp.einsum("btk,kv->btv", h, w)
    lse = jax.nn.logsumexp(z, axis=-1)
    z_label = jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    loss = 0.9 * (lse - z_label) + 0.1 * (lse - z.mean(-1)) + 1e-4 * lse ** 2
    return _masked_mean(loss, y)


def per_token_multiply_mask(h, w, y):
    nll = optax.softmax_cross_entropy_with_integer_labels(h @ w, jnp.where(y < 0, 0, y))
    return nll * (y != IGNORE), jnp.sum(nll)


FORMS = {f.__name__: f for f in (optax_integer, optax_one_hot, log_softmax_take,
                                 logsumexp_index, one_hot_contraction, tied_embeddings,
                                 bias_soft_cap, einsum_z_loss_smoothing,
                                 per_token_multiply_mask)}


def _args(name, rng, dtype=jnp.float32):
    h, w, y = _inputs(rng, dtype)
    if name == "tied_embeddings":
        w = w.T
    return h, w, y


def _assert_matches_jit(f, *args):
    chex.assert_trees_all_close(jfuse.jit(f)(*args), jax.jit(f)(*args), rtol=2e-5, atol=2e-5)

    def loss(fn):
        return lambda h, w: sum(jnp.sum(jnp.cos(jnp.arange(o.size).reshape(o.shape)) * o)
                                for o in jax.tree.leaves(fn(h, w, args[2])))

    got = jax.jit(jax.grad(loss(jfuse.fuse(f)), argnums=(0, 1)))(*args[:2])
    want = jax.jit(jax.grad(loss(f), argnums=(0, 1)))(*args[:2])
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", list(FORMS))
def test_each_form_fuses_and_matches_jit(name, rng):
    f, args = FORMS[name], _args(name, rng)
    report = jfuse.explain(f)(*args)
    assert report.fused.get("linear_cross_entropy") == 1, str(report)
    assert not [m for m in report.missed if m.pattern == "linear_cross_entropy"], str(report)
    _assert_matches_jit(f, *args)


def test_detail_names_what_was_read(rng):
    report = jfuse.explain(bias_soft_cap)(*_inputs(rng))
    (site,) = [s for s in report.sites if s.pattern == "linear_cross_entropy"]
    assert site.detail.startswith(f"({B * T}x{K})@({K}x{V}) float32")
    assert "bias" in site.detail and "soft-cap 5" in site.detail, site.detail


@pytest.mark.parametrize("label", [IGNORE, pytest.param(-3, marks=pytest.mark.slow), V,
                                   pytest.param(V + 7, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["optax_integer", "logsumexp_index",
                                  pytest.param("log_softmax_take", marks=pytest.mark.slow),
                                  pytest.param("optax_one_hot", marks=pytest.mark.slow)])
def test_unmasked_out_of_range_labels_give_jits_answer(name, label, rng):
    """No masking: take_along_axis wraps -3 and gives NaN for -100 or V (value NaN, gradient
    finite), z[arange, y] clamps, a one-hot of them is zero. jfuse reproduces each."""
    f = FORMS[name]
    h, w, y = _inputs(rng, ignore=False)
    y = y.at[1, 2].set(label)
    unmasked = lambda h, w, y: f(h, w, jnp.where(y == IGNORE, IGNORE + 1, y))  # noqa: E731
    for fn in (unmasked,) if label == IGNORE else (f,):
        assert jfuse.explain(fn)(h, w, y).fused.get("linear_cross_entropy") == 1
        _assert_matches_jit(fn, h, w, y)


def _assert_accurate_bf16(f, h, w, y):
    """bf16: value and gradients no further from a float64 run than jax.jit's (plus a floor)."""
    def both(fn):
        return jax.jit(lambda h, w: (fn(h, w, y), jax.grad(lambda h, w: fn(h, w, y).astype(
            jnp.float32), argnums=(0, 1))(h, w)))

    got, want = both(jfuse.fuse(f))(h, w), both(f)(h, w)
    with jax.enable_x64(True):
        truth = jax.tree.map(np.asarray, both(f)(h.astype(jnp.float64), w.astype(jnp.float64)))
    for g, u, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(truth)):
        g, u = np.asarray(g, np.float64), np.asarray(u, np.float64)
        scale = np.max(np.abs(r)) + 1e-6
        assert np.max(np.abs(g - r)) <= 1.5 * np.max(np.abs(u - r)) + 4e-3 * scale, (
            np.max(np.abs(g - r)), np.max(np.abs(u - r)), scale)


def bf16_upcast(h, w, y):
    z = (h @ w).astype(jnp.float32)
    return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(z, y), y)


@pytest.mark.parametrize("f", [bf16_upcast, pytest.param(optax_one_hot, marks=pytest.mark.slow),
                               pytest.param(log_softmax_take, marks=pytest.mark.slow)])
def test_bf16_is_no_less_accurate_than_jit(f, rng):
    args = _inputs(rng, jnp.bfloat16)
    assert jfuse.explain(f)(*args).fused.get("linear_cross_entropy") == 1
    _assert_accurate_bf16(f, *args)


# --- near misses ---------------------------------------------------------------------------------

def _argmax_accuracy(h, w, y):
    z = h @ w
    return (optax.softmax_cross_entropy_with_integer_labels(z, y).mean(),
            jnp.mean(jnp.argmax(z, -1) == y))


def _logits_returned(h, w, y):
    z = h @ w
    return optax.softmax_cross_entropy_with_integer_labels(z, y).mean(), z


def _log_probs_returned(h, w, y):
    logp = jax.nn.log_softmax(h @ w)
    return -jnp.take_along_axis(logp, y[..., None], -1).mean(), logp


def _soft_labels(h, w, y):
    targets = jax.nn.softmax(jnp.sin(jnp.arange(V, dtype=jnp.float32)))
    return optax.softmax_cross_entropy(h @ w, jnp.broadcast_to(targets, (B, T, V))).mean()


def _vocab_first(h, w, y):
    z = jnp.einsum("kv,tk->vt", w, h[0])
    logp = jax.nn.log_softmax(z, axis=0)
    return -jnp.take_along_axis(logp, y[:1], axis=0).mean()


def _max_read_elsewhere(h, w, y):
    z = h @ w
    m = jnp.max(z, -1)
    return jnp.mean(jnp.log(jnp.sum(jnp.exp(z - m[..., None]), -1)) + m
                    - jnp.take_along_axis(z, y[..., None], -1)[..., 0]), m


NEAR_MISSES = {
    "argmax": (_argmax_accuracy, MissReason.LOGITS_ESCAPE, "argmax"),
    "logits returned": (_logits_returned, MissReason.LOGITS_ESCAPE, "function's outputs"),
    "log-probs returned": (_log_probs_returned, MissReason.LOGITS_ESCAPE, "function's outputs"),
    "soft labels": (_soft_labels, MissReason.SOFT_LABELS, "not a one-hot"),
    "vocab first": (_vocab_first, MissReason.VOCAB_AXIS, "axis 0"),
    "row max returned": (_max_read_elsewhere, MissReason.LOSS_FORM, "row maximum"),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_near_misses_are_reported_and_exact(case, rng):
    f, reason, fragment = NEAR_MISSES[case]
    args = _inputs(rng, ignore=False)
    report = jfuse.explain(f)(*args)
    assert "linear_cross_entropy" not in report.fused, str(report)
    misses = [m for m in report.missed if m.pattern == "linear_cross_entropy"]
    assert [m.reason for m in misses] == [reason], str(report)
    assert fragment in misses[0].detail, misses[0].detail
    assert "test_cross_entropy_pattern.py" in misses[0].where, misses[0].where
    assert misses[0].hint
    if reason is MissReason.LOGITS_ESCAPE:
        assert "logits must exist" in misses[0].hint
    chex.assert_trees_all_equal(jfuse.jit(f)(*args), jax.jit(f)(*args))


def test_a_gradient_taken_outside_jfuse_names_the_backward_pass(rng):
    """``jfuse.jit(jax.value_and_grad(loss))``: jfuse sees the joint forward and backward, whose
    softmax-minus-one-hot reads the logits. The miss says so and how to fix it; it is not
    mistaken for soft labels (the backward multiplies the probabilities by a cotangent)."""
    optax = pytest.importorskip("optax")
    h, w, y = _inputs(rng, ignore=False)

    def loss(h, w):
        return optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()

    report = jfuse.explain(jax.value_and_grad(loss, argnums=(0, 1)))(h, w)
    misses = [m for m in report.missed if m.pattern == "linear_cross_entropy"]
    assert [m.reason for m in misses] == [MissReason.LOGITS_ESCAPE], str(report)
    assert "backward pass" in misses[0].detail and "jax.grad(jfuse.fuse(loss))" in misses[0].hint
    # Differentiated inside the traced function, as the hint says, it fuses.
    inside = jfuse.explain(lambda h, w: jax.value_and_grad(loss, argnums=(0, 1))(h, w))(h, w)
    assert inside.fused == {"linear_cross_entropy": 1}, str(inside)


def test_a_plain_matmul_is_not_a_miss(rng):
    h, w, _ = _inputs(rng)
    report = jfuse.explain(lambda h, w: jax.nn.softmax(h @ w).sum())(h, w)
    assert not [m for m in report.missed if m.pattern == "linear_cross_entropy"], str(report)


# --- a training step -----------------------------------------------------------------------------

def test_llama_step_fuses_its_head_and_uses_less_memory():
    from benchmarks.models import init_llama, llama_rope_loss, sgd_step

    params = init_llama(jax.random.PRNGKey(0), n_layers=1, d_model=32, d_ff=86, vocab=2048)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 65), 0, 2048)
    step = sgd_step(llama_rope_loss)
    report = jfuse.explain(step)(params, tokens)
    assert report.fused.get("linear_cross_entropy") == 1, str(report)
    fused, plain = jfuse.jit(step), jax.jit(step)

    def temp(fn):
        return fn.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

    ratio = temp(fused) / temp(plain)
    assert ratio < 0.5, ratio
    (loss, new), (want_loss, want_new) = fused(params, tokens), plain(params, tokens)
    chex.assert_trees_all_close((loss, new), (want_loss, want_new), rtol=2e-5, atol=2e-5)


def test_a_batch_of_one_fuses(rng):
    """With a batch of one, ``take_along_axis`` makes the size-1 batch axis an offset dim of its
    gather rather than a batching dim; the label pick is the same and must fuse."""

    def loss(h, w, labels):
        logp = jax.nn.log_softmax((h @ w).astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, :, None], axis=-1))

    h = jnp.asarray(rng.standard_normal((1, 16, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 40)) / 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 40, (1, 16)), jnp.int32)
    assert jfuse.explain(loss)(h, w, labels).fused == {"linear_cross_entropy": 1}
    got = jax.jit(jax.value_and_grad(jfuse.fuse(loss), argnums=(0, 1)))(h, w, labels)
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, w, labels)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)
