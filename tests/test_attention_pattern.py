"""The attention pattern on real library code and hand-written styles: each fuses with the right
site count and detail, its output and gradients are no further from a float64 truth than
jax.jit's own (f32 and bf16), and the near misses are reported with their reason and leave the
answer identical to jax.jit's."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfuse
from jfuse import MissReason

# The default run takes the first cases of these parametrized tests; the rest are slow
# cases, sampled (tests/conftest.py) and all run with JFUSE_SLOW=1.
DEFAULT_CASES = {
    "test_near_misses_are_reported_and_exact": 4,
    "test_penzai_llamalike_attention": 1,
    "test_flax_nnx_multi_head_attention": 1,
    "test_jax_nn_dot_product_attention": 2,
}


B, T, N, K, H = 2, 12, 4, 2, 8


def _r(rng, *shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _as(tree, dtype):
    def cast(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree.map(cast, tree)


def _max_err(a, b) -> float:
    return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


def _scale(tree) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree))


def assert_accurate(f, *args, dtype=jnp.float32, truth_fn=None):
    """Output and gradients (w.r.t. every floating argument: inputs and params) of jfuse.jit(f)
    are no further from the same program run in float64 (``truth_fn``, by default ``f``, for a
    module whose dtype is fixed) than jax.jit's, up to a dtype floor."""
    truth_fn = truth_fn or f
    floor = 1e-6 if np.dtype(dtype) == np.float32 else 4e-3
    argnums = tuple(i for i, a in enumerate(args)
                    if any(jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
                           for x in jax.tree.leaves(a)))
    out_shapes = jax.eval_shape(f, *args)
    cot = jax.tree.map(lambda o: np.cos(np.arange(o.size).reshape(o.shape)), out_shapes)

    def outputs_and_grads(fn):
        def loss(*a):
            return sum(jnp.sum(o.astype(jnp.promote_types(o.dtype, jnp.float32)) * c)
                       for o, c in zip(jax.tree.leaves(fn(*a)), jax.tree.leaves(cot)))
        # One compiled program per variant: the outputs and the gradients of a cotangent loss.
        return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=argnums)(*a)))

    got, g_fused = outputs_and_grads(jfuse.fuse(f))(*args)
    want, g_jit = outputs_and_grads(f)(*args)
    with jax.enable_x64(True):
        truth, g_truth = jax.tree.map(np.asarray, outputs_and_grads(truth_fn)(
            *_as(args, jnp.float64)))
    assert _max_err(got, truth) <= 1.5 * _max_err(want, truth) + floor * _scale(truth), (
        _max_err(got, truth), _max_err(want, truth))
    # The floor is relative to the largest gradient: a parameter whose exact gradient is 0 (a
    # key bias, which the softmax cancels) gets rounding noise from either program.
    g_scale = _scale(g_truth)
    for g, u, r in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_jit), jax.tree.leaves(g_truth)):
        err, ref = _max_err(g, r), _max_err(u, r)
        assert err <= 1.5 * ref + floor * g_scale, (err, ref, g_scale)


# --- hand-written styles ------------------------------------------------------------------------

def _causal_tril():
    return jnp.tril(jnp.ones((T, T), bool))


def llama(q, k, v):
    """Llama/GPT: einsum, scale by divide, tril, where(-inf), f32 softmax, cast back."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(H).astype(q.dtype)
    s = jnp.where(_causal_tril(), s, -jnp.inf)
    p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def gpt_iota_finfo(q, k, v):
    """Scale on q, iota comparison, finfo.min, manual softmax without stop_gradient."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q * H**-0.5, k)
    i = jnp.arange(T)
    s = jnp.where(i[:, None] >= i[None, :], s, jnp.finfo(s.dtype).min)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return jnp.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdims=True), v)


def gemma_softcap_repeat(q, k, v):
    """Gemma-2: jnp.repeat GQA, soft-cap, -1e10 mask, scale on the scores as a multiply."""
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * H**-0.5
    s = jnp.tanh(s / 50.0) * 50.0
    s = jnp.where(_causal_tril(), s, -1e10)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s.astype(jnp.float32)).astype(v.dtype), v)


def additive_mask_bnth(q, k, v):
    """(b, h, t, d) layout, additive -inf mask, -1e9 window via where on a bias."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / 3.0
    s = s + jnp.where(_causal_tril(), 0.0, -jnp.inf).astype(s.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s), v)


def sliding_window(q, k, v):
    i = jnp.arange(T)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 4)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    s = jnp.where(keep, s, -0.7 * float(jnp.finfo(jnp.float32).max))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)


_DEFAULT_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def maxtext_normalized_after_pv(q, k, v):
    """MaxText's apply_attention_dot: q split into (kv heads, groups), 5-D einsum, an additive
    mask read back through where(mask >= DEFAULT_MASK_VALUE / 2), a manual softmax without
    stop_gradient, normalized after the PV product (local_out / local_sum)."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    logits = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, kv, n // kv, d), k)
    i = jnp.arange(t)
    mask = jnp.where(i[:, None] >= i[None, :], 0.0, _DEFAULT_MASK_VALUE)
    logits = jnp.where(mask >= _DEFAULT_MASK_VALUE * 0.5, logits, _DEFAULT_MASK_VALUE)
    local_max = jnp.max(logits, axis=-1, keepdims=True)
    local_exps = jnp.exp(logits - local_max)
    local_sum = jnp.sum(local_exps, axis=-1, keepdims=True)
    local_out = jnp.einsum("bkgts,bskd->btkgd", local_exps, v)
    local_sum = jnp.moveaxis(local_sum, -2, 1)
    return local_out.reshape(b, t, n, d) / local_sum.reshape(b, t, n, 1)


def normalized_after_pv(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
    return jnp.einsum("bhqk,bkhd->bhqd", e, v) / e.sum(-1)[..., None]


def single_head_2d(q, k, v):
    return jax.nn.softmax(q[0, :, 0] @ k[0, :, 0].T / 4.0) @ v[0, :, 0]


STYLES = {
    "llama": (llama, "causal, mask value -inf", False),
    "gpt iota finfo.min": (gpt_iota_finfo, "causal", False),
    "gemma soft-cap repeat": (gemma_softcap_repeat, "soft-cap 50, GQA 4/2 heads (K/V repeat", True),
    "additive -inf, BNTH": (additive_mask_bnth, "bias", False),
    "sliding window": (sliding_window, "causal, window (3, None)", False),
    "single head 2-D": (single_head_2d, "B=1 N=1", False),
    "maxtext normalized after PV": (maxtext_normalized_after_pv,
                                    "causal, GQA 4/2 heads, mask value -2.38e+38, normalized "
                                    "after the PV product", True),
    "normalized after PV": (normalized_after_pv, "normalized after the PV product", False),
}
# Run by default (the rest are sampled with the slow cases; JFUSE_SLOW=1 runs them all).
_DEFAULT_STYLES = ("llama", "gemma soft-cap repeat", "sliding window",
                   "maxtext normalized after PV")


def _qkv(rng, dtype, gqa=False, layout="BTNH"):
    kv_heads = K if gqa else N
    if layout == "BNTH":
        return _r(rng, B, N, T, H, dtype=dtype), _r(rng, B, kv_heads, T, H, dtype=dtype), _r(
            rng, B, kv_heads, T, H, dtype=dtype)
    return _r(rng, B, T, N, H, dtype=dtype), _r(rng, B, T, kv_heads, H, dtype=dtype), _r(
        rng, B, T, kv_heads, H, dtype=dtype)


@pytest.mark.parametrize("style", [s if s in _DEFAULT_STYLES else pytest.param(
    s, marks=pytest.mark.slow) for s in STYLES])
@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)],
                         ids=["f32", "bf16"])
def test_hand_written_styles_fuse(style, dtype, rng):
    f, fragment, gqa = STYLES[style]
    args = _qkv(rng, dtype, gqa, "BNTH" if "BNTH" in style else "BTNH")
    report = jfuse.explain(f)(*args)
    assert report.fused == {"attention": 1}, str(report)
    assert fragment in report.sites[0].detail, report.sites[0].detail
    assert_accurate(f, *args, dtype=dtype)


def test_bf16_softmax_is_named_in_the_detail(rng):
    def bf16_softmax(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)

    args = _qkv(rng, jnp.bfloat16)
    report = jfuse.explain(bf16_softmax)(*args)
    assert report.fused == {"attention": 1}, str(report)
    assert "softmax computed in bfloat16 by the user; the kernel computes it in f32" in (
        report.sites[0].detail)
    assert_accurate(bf16_softmax, *args, dtype=jnp.bfloat16)


def test_padding_lengths_and_segment_ids_are_structure(rng):
    lengths = jnp.array([5, T], jnp.int32)
    ids = jnp.array([[0] * 4 + [1] * 5 + [2] * 3, [0] * 7 + [1] * 5], jnp.int32)

    def padded(q, k, v, lengths):
        valid = jnp.arange(T)[None, :] < lengths[:, None]
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
        s = jnp.where(valid[:, None, None, :], s, -1e9)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)

    def packed(q, k, v, ids):
        same = ids[:, None, :, None] == ids[:, None, None, :]
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
        s = jnp.where(same & _causal_tril(), s, jnp.finfo(s.dtype).min)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)

    q, k, v = _qkv(rng, jnp.float32)
    for f, extra, label in ((padded, lengths, "key lengths"), (packed, ids, "segment ids")):
        report = jfuse.explain(f)(q, k, v, extra)
        assert report.fused == {"attention": 1}, str(report)
        assert label in report.sites[0].detail, report.sites[0].detail
        assert_accurate(f, q, k, v, extra)


def test_a_mask_jfuse_cannot_classify_is_passed_dense(rng):
    mask = jnp.asarray(rng.random((B, 1, T, T)) > 0.3).at[..., 0].set(True)

    def masked(q, k, v, mask):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(mask, s, -1e30)), v)

    q, k, v = _qkv(rng, jnp.float32)
    report = jfuse.explain(masked)(q, k, v, mask)
    assert report.fused == {"attention": 1} and "dense mask" in report.sites[0].detail
    assert_accurate(masked, q, k, v, mask)


# --- libraries ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["causal gqa", pytest.param("mask bias", marks=pytest.mark.slow),
                                     pytest.param("lengths", marks=pytest.mark.slow), "plain"])
def test_jax_nn_dot_product_attention(variant, rng):
    gqa = variant == "causal gqa"
    q, k, v = _qkv(rng, jnp.float32, gqa)
    extra = ()
    if variant == "causal gqa":
        f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
        fragment = "causal, GQA 4/2 heads"
    elif variant == "mask bias":
        extra = (jnp.asarray(rng.random((B, 1, T, T)) > 0.3).at[..., 0].set(True),
                 _r(rng, 1, N, T, T))
        f = lambda q, k, v, m, b: jax.nn.dot_product_attention(q, k, v, bias=b, mask=m)
        fragment = "dense mask, bias"
    elif variant == "lengths":
        extra = (jnp.array([4, T], jnp.int32),)
        f = lambda q, k, v, l: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=l)
        fragment = "key lengths"
    else:
        f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
        fragment = "scale=0.3536"
    report = jfuse.explain(f)(q, k, v, *extra)
    assert report.fused == {"attention": 1}, str(report)
    assert fragment in report.sites[0].detail, report.sites[0].detail
    assert_accurate(f, q, k, v, *extra)


def test_masks_from_the_jaxprs_constants_are_structure(rng):
    """A mask built from arrays captured at trace time is a constvar of the jaxpr (jax.nn's
    local_window_size indexes, a numpy tril): jfuse reads the constants' values and passes the
    mask as a window / causal structure, not as a dense mask."""
    tril = np.tril(np.ones((T, T), bool))

    def constvar_causal(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(tril, s, -1e9)), v)

    window = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, local_window_size=(3, 0))
    q, k, v = _qkv(rng, jnp.float32)
    for f, fragment in ((constvar_causal, "causal"), (window, "causal, window (3, None)")):
        assert jax.make_jaxpr(f)(q, k, v).jaxpr.constvars  # the mask's inputs are constants
        report = jfuse.explain(f)(q, k, v)
        assert report.fused == {"attention": 1}, str(report)
        detail = report.sites[0].detail
        assert fragment in detail and "dense mask" not in detail, detail
        assert_accurate(f, q, k, v)


def test_jax_nn_softmax_as_custom_jvp(rng):
    q, k, v = _qkv(rng, jnp.float32, gqa=True)
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    with jax.softmax_custom_jvp(True):
        report = jfuse.explain(f)(q, k, v)
        assert report.fused == {"attention": 1}, str(report)
        assert_accurate(f, q, k, v)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)],
                         ids=["f32", "bf16"])
def test_flax_linen_multi_head_attention(dtype, rng):
    nn = pytest.importorskip("flax.linen")
    # dtype=None computes in the inputs' dtype (float64 for the truth); bf16 is fixed by the
    # module, so its truth is the same module with dtype=None.
    make = lambda dt: nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H, dtype=dt)
    module = make(None if dtype == jnp.float32 else dtype)
    x = _r(rng, B, T, 24)
    params = module.init(jax.random.key(0), x, x)
    apply = lambda m: lambda params, x: m.apply(params, x, x, mask=nn.make_causal_mask(x[..., 0]))
    f = apply(module)
    report = jfuse.explain(f)(params, x)
    assert report.fused == {"attention": 1}, str(report)
    assert "causal" in report.sites[0].detail, report.sites[0].detail
    assert_accurate(f, params, x, dtype=dtype, truth_fn=apply(make(None)))


@pytest.mark.slow
def test_flax_linen_dot_product_attention_function(rng):
    nn = pytest.importorskip("flax.linen")
    q, k, v = _qkv(rng, jnp.float32)
    f = lambda q, k, v: nn.dot_product_attention(q, k, v, mask=nn.make_causal_mask(q[..., 0, 0]))
    report = jfuse.explain(f)(q, k, v)
    assert report.fused == {"attention": 1} and "causal" in report.sites[0].detail, str(report)
    assert_accurate(f, q, k, v)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)],
                         ids=["f32", "bf16"])
def test_haiku_multi_head_attention(dtype, rng):
    """Haiku divides the scores after the QK product, masks with -1e30 and runs the softmax in
    the input dtype."""
    hk = pytest.importorskip("haiku")

    def forward(x):
        attend = hk.MultiHeadAttention(num_heads=N, key_size=H,
                                       w_init=hk.initializers.VarianceScaling(1.0))
        return attend(x, x, x, mask=jnp.tril(jnp.ones((T, T)))[None, None])

    f = hk.without_apply_rng(hk.transform(forward))
    x = _r(rng, B, T, 24)
    params, x = _as((f.init(jax.random.key(0), x), x), dtype)
    report = jfuse.explain(f.apply)(params, x)
    assert report.fused == {"attention": 1, "linear": 4}, str(report)  # + the projections
    [site] = [site for site in report.sites if site.pattern == "attention"]
    assert "causal, mask value -1e+30" in site.detail, site.detail
    assert_accurate(f.apply, params, x, dtype=dtype)


@pytest.mark.parametrize("kv_heads", [None, pytest.param(K, marks=pytest.mark.slow)],
                         ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)],
                         ids=["f32", "bf16"])
def test_flax_nnx_multi_head_attention(dtype, kv_heads, rng):
    """NNX calls jax.nn.dot_product_attention (no dropout, no sown weights); a mask captured by
    the function is a constvar of the jaxpr, classified as causal."""
    nnx = pytest.importorskip("flax.nnx")
    import inspect
    kw = {}
    if kv_heads is not None:
        if "num_kv_heads" not in inspect.signature(nnx.MultiHeadAttention.__init__).parameters:
            pytest.skip("this flax's nnx.MultiHeadAttention has no num_kv_heads")
        kw["num_kv_heads"] = kv_heads
    module = nnx.MultiHeadAttention(num_heads=N, in_features=24, qkv_features=N * H,
                                    decode=False, rngs=nnx.Rngs(0), **kw)
    graphdef, state = nnx.split(module)
    x = _r(rng, B, T, 24)
    mask = nnx.make_causal_mask(x[..., 0])

    def f(state, x):
        return nnx.merge(graphdef, state)(x, mask=mask)

    state, x = _as((state, x), dtype)
    report = jfuse.explain(f)(state, x)
    assert report.fused == {"attention": 1}, str(report)
    detail = report.sites[0].detail
    assert "causal" in detail and "dense mask" not in detail, detail
    if kv_heads is not None:
        assert f"GQA {N}/{kv_heads} heads" in detail, detail
    assert_accurate(f, state, x, dtype=dtype)


def _penzai_attention(activation_dtype):
    """penzai's llamalike attention (named axes, copies, 5-D einsum GQA, a ``ge`` mask on token
    positions, -2.38e38 held as a constant array) as f(params, x[, positions])."""
    pz = pytest.importorskip("penzai.pz", reason="penzai is not installed (test extra)")
    from penzai.models.transformer.variants import llamalike_common

    config = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=K, query_head_multiplier=N // K, embedding_dim=24, projection_dim=H,
        mlp_hidden_dim=32, num_decoder_blocks=1, vocab_size=16, mlp_variant="swiglu",
        tie_embedder_and_logits=False, activation_dtype=activation_dtype)
    attention = llamalike_common.build_llamalike_attention("attn", jax.random.key(0), config)
    unbound, params = pz.unbind_params(attention, freeze=True)

    def f(params, x, positions=None):
        positions = (pz.nx.arange("seq", T) if positions is None
                     else pz.nx.wrap(positions).tag("batch", "seq"))
        out = pz.bind_variables(unbound, params)(
            pz.nx.wrap(x).tag("batch", "seq", "embedding"), token_positions=positions)
        return out.untag("batch", "seq", "embedding").unwrap()

    return f, params


@pytest.mark.parametrize("positions", ["iota", pytest.param("input", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)],
                         ids=["f32", "bf16"])
def test_penzai_llamalike_attention(dtype, positions, rng):
    f, params = _penzai_attention(dtype)
    truth_fn, _ = _penzai_attention(jnp.float32)
    x = _r(rng, B, T, 24)
    args = (params, x) if positions == "iota" else (
        params, x, jnp.broadcast_to(jnp.arange(T), (B, T)))
    args = _as(args, dtype)
    report = jfuse.explain(f)(*args)
    assert report.fused == {"attention": 1}, str(report)
    detail = report.sites[0].detail
    # Positions given at run time make the mask data-dependent: passed dense.
    assert ("causal" if positions == "iota" else "dense mask") in detail, detail
    assert f"GQA {N}/{K} heads" in detail and "mask value -2.38e+38" in detail, detail
    assert_accurate(f, *args, dtype=dtype, truth_fn=truth_fn)


def test_equinox_multihead_attention_vmapped(rng):
    eqx = pytest.importorskip("equinox")
    module = eqx.nn.MultiheadAttention(N, 24, key=jax.random.key(0), inference=True)
    params, static = eqx.partition(module, eqx.is_array)

    def f(params, x):
        m = eqx.combine(params, static)
        return jax.vmap(lambda xx: m(xx, xx, xx, mask=_causal_tril()))(x)

    x = _r(rng, B, T, 24)
    report = jfuse.explain(f)(params, x)
    assert report.fused == {"attention": 1} and "causal" in report.sites[0].detail, str(report)
    assert_accurate(f, params, x)


def test_transformer_block_attention_wins_its_matmuls(rng):
    """Norms, projections, attention and a SwiGLU in one block: the QK and PV products go to
    attention, the rest to their own patterns, two layers give two attention sites."""
    d = N * H

    def rms(x, w):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w

    def block(x, p):
        h = rms(x, p["n1"])
        q, k, v = (jnp.reshape(h @ p[w], (B, T, N, H)) for w in ("wq", "wk", "wv"))
        x = x + jnp.reshape(llama(q, k, v), (B, T, d)) @ p["wo"]
        h = rms(x, p["n2"])
        return x + (jax.nn.silu(h @ p["wg"]) * (h @ p["wu"])) @ p["wd"]

    def model(x, layers):
        for p in layers:
            x = block(x, p)
        return x

    def layer():
        p = {w: _r(rng, d, d, scale=d**-0.5) for w in ("wq", "wk", "wv", "wo")}
        p.update(wg=_r(rng, d, 64, scale=d**-0.5), wu=_r(rng, d, 64, scale=d**-0.5),
                 wd=_r(rng, 64, d, scale=0.125), n1=1 + _r(rng, d, scale=0.1),
                 n2=1 + _r(rng, d, scale=0.1))
        return p

    layers = [layer(), layer()]
    x = _r(rng, B, T, d)
    report = jfuse.explain(model)(x, layers)
    assert report.fused == {"attention": 2, "glu": 2, "rms_norm": 1, "add_rms_norm": 3}, str(
        report)
    assert not [m for m in report.missed if m.pattern == "attention"], str(report)
    if os.environ.get("JFUSE_SLOW") == "1":  # the accuracy of each part is tested above
        assert_accurate(model, x, layers[:1])


# --- near misses --------------------------------------------------------------------------------

def _probs_returned(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v), p


def _probs_in_loss(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v).sum() + jnp.sum(p * jnp.log(p + 1e-9))


def _dropout(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3)
    keep = jax.random.bernoulli(jax.random.key(0, impl="rbg"), 0.9, p.shape)  # quick to compile
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, p / 0.9, 0.0), v)


def _softmax_over_queries(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3, axis=-2)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _exp_without_max_normalized_after_pv(q, k, v):
    # exp(s) overflows where softmax(s) does not: not the same quantity in floating point.
    e = jnp.exp(jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3)
    return jnp.einsum("bhqk,bkhd->bhqd", e, v) / e.sum(-1)[..., None]


def _divided_by_other_rows(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return jnp.einsum("bhqk,bkhd->bhqd", e, v) / e.sum(-1)[:, :, ::-1, None]


def _multiplicative_mask(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    m = jnp.tril(jnp.ones((T, T)))
    s = s * m - 1e9 * (1 - m)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)


def _scale_after_mask(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    s = jnp.where(_causal_tril(), s, -1e9) * 0.3
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)


def _two_mask_constants(q, k, v, lengths):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    s = jnp.where(_causal_tril(), s, -jnp.inf)
    s = jnp.where((jnp.arange(T) < lengths[:, None])[:, None, None, :], s, -1e9)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)


NEAR_MISSES = {
    "probabilities returned": (_probs_returned, MissReason.PROBABILITIES_ESCAPE, "function's outputs"),
    "probabilities in a loss": (_probs_in_loss, MissReason.PROBABILITIES_ESCAPE, "also read by"),
    "dropout": (_dropout, MissReason.DROPOUT, "random masking"),
    "softmax over queries": (_softmax_over_queries, MissReason.SOFTMAX_AXIS, "softmax over axis 2"),
    "exp without max, normalized after PV": (_exp_without_max_normalized_after_pv,
                                             MissReason.NORMALIZED_AFTER_PV, "exp(scores)"),
    "divided by other rows": (_divided_by_other_rows, MissReason.NORMALIZED_AFTER_PV,
                              "divided by something other than the sum"),
    "multiplicative mask": (_multiplicative_mask, MissReason.SCORE_FUNCTION, "sub"),
    "scale after mask": (_scale_after_mask, MissReason.SCORE_FUNCTION, "scaled after"),
    "two mask constants": (_two_mask_constants, MissReason.SCORE_FUNCTION,
                           "different masking constants"),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_near_misses_are_reported_and_exact(case, rng):
    f, reason, fragment = NEAR_MISSES[case]
    args = _qkv(rng, jnp.float32)
    if case == "two mask constants":
        args += (jnp.array([5, T], jnp.int32),)
    report = jfuse.explain(f)(*args)
    assert "attention" not in report.fused, str(report)
    misses = [m for m in report.missed if m.pattern == "attention"]
    assert [m.reason for m in misses] == [reason], str(report)
    assert fragment in misses[0].detail, misses[0].detail
    assert "test_attention_pattern.py" in misses[0].where, misses[0].where
    assert misses[0].hint
    chex.assert_trees_all_equal(jfuse.jit(f)(*args), jax.jit(f)(*args))


def test_disabled_pattern_is_a_named_miss_and_exact(rng):
    args = _qkv(rng, jnp.float32)
    report = jfuse.explain(llama, patterns=("glu", "linear", "norm"))(*args)
    assert "attention" not in report.fused
    assert [m.reason for m in report.missed] == [MissReason.PATTERN_DISABLED], str(report)
    fused = jfuse.jit(llama, patterns=("glu", "linear", "norm"))
    chex.assert_trees_all_equal(fused(*args), jax.jit(llama)(*args))
