"""GPU attention through cuDNN, checked on a CPU-only machine: the adapter, the lowering, the refusals.

cuDNN's flash attention cannot run here (no GPU), and JAX's entry point cannot even be traced
without a CUDA jaxlib (its version check raises). So:

* **plumbing, numerically**: the entry point (``fused_attention_stablehlo.dot_product_attention``)
  is replaced by a small XLA function with the same contract (either layout, K heads read by
  ``n // G``, top-left causal mask, ``sliding_window_length`` keeping keys ``i - w < j <= i``,
  an f32 natural-log log-sum-exp ``(B, N, T)``), the version check is told cuDNN 9.10 is there
  and the op's GPU branch is forced. What is checked is jfuse's side: which arguments reach
  cuDNN (layout, unrepeated K/V heads, mask type, window), and that the output, the
  log-sum-exp and the gradients jfuse's derivative computes from it match float64.
* **lowering**: with only the version check told cuDNN 9.10 is there, the real entry point lowers
  for "cuda" from the CPU (JAX registers its lowering for every machine): one
  ``__cudnn$fmhaSoftmax`` custom call per site, no Triton call, and the report names the kernel.
* **refusals**: each case cuDNN is not asked to serve, with its reason; the GPU then runs the
  Triton kernel or, where that refuses too, XLA with both reasons.

What only a GPU can show (that cuDNN computes this contract: the causal alignment for T != S,
the log-sum-exp's base) is in the device check (``benchmarks/kernel_checks.py``), which has not
run on a GPU yet.
"""

from __future__ import annotations

import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfuse
from jfuse._jax import cudnn
from jfuse.benchmarking import kernel_calls
from jfuse._jax import kernel_transpose as _kernel_transpose
from jfuse.ops import _dispatch
from jfuse.ops.attention import ATTENTION, AttentionSpec, fused_attention
from jfuse.pallas import attention as kernels

from conftest import structural_mask
from lowering import lower_for

CUDNN_VERSION = 91000  # 9.10, what a current CUDA jaxlib reports


def _jax_cudnn_module():
    from jax._src.cudnn import fused_attention_stablehlo

    return fused_attention_stablehlo


@pytest.fixture
def cudnn_here(monkeypatch):
    """This machine "has" cuDNN 9.10: jfuse's check and JAX's own (which its entry point calls
    while tracing). Kernel traces are cached by call, not by machine: cleared around the test."""
    monkeypatch.setattr(cudnn, "version", lambda: CUDNN_VERSION)
    monkeypatch.setattr(_jax_cudnn_module(), "check_cudnn_version", lambda: CUDNN_VERSION)
    _dispatch._TRACES.clear()
    yield
    _dispatch._TRACES.clear()


def _fake_cudnn_attention(calls):
    """cuDNN's contract in XLA (f32 inside): what jfuse may rely on, nothing more."""

    def fake(query, key, value, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, *, scale,
             mask_type, qkv_layout, sliding_window_length=None, return_residual=False, **rest):
        assert bias is None and mask is None and q_seqlen is None and kv_seqlen is None
        assert not rest, rest
        calls.append(dict(layout=qkv_layout, mask=mask_type.name, window=sliding_window_length,
                          q=query.shape, k=key.shape, dtype=np.dtype(query.dtype), scale=scale,
                          residual=return_residual))
        to_bnth = (lambda a: a) if qkv_layout == "BNTH" else (lambda a: jnp.swapaxes(a, 1, 2))
        q, k, v = (to_bnth(a).astype(jnp.float32) for a in (query, key, value))
        g = q.shape[1] // k.shape[1]
        k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
        s = jnp.einsum("bnth,bnsh->bnts", q, k) * scale
        i = jnp.arange(s.shape[2])[:, None]
        j = jnp.arange(s.shape[3])[None, :]
        keep = jnp.ones(s.shape[2:], bool)
        if mask_type.name == "CAUSAL":
            keep &= j <= i  # top-left: row i attends keys 0..i, whatever S is
        if sliding_window_length is not None:
            assert mask_type.name == "CAUSAL"  # cuDNN's frontend accepts a window only so
            keep &= j > i - sliding_window_length
        s = jnp.where(keep, s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1)
        out = jnp.einsum("bnts,bnsh->bnth", jnp.exp(s - lse[..., None]), v).astype(query.dtype)
        # Without the residual: what cuDNN differentiates (here by XLA, as its backward graph).
        return (to_bnth(out), lse) if return_residual else to_bnth(out)

    return fake


@pytest.fixture
def fake_cudnn(cudnn_here, monkeypatch):
    """cuDNN "runs" here (the XLA stand-in above) and the op's GPU branch is the one that runs:
    ``lax.platform_dependent`` in dispatch picks ``cuda``. Returns the calls cuDNN received."""
    calls: list[dict] = []
    monkeypatch.setattr(_jax_cudnn_module(), "dot_product_attention", _fake_cudnn_attention(calls))
    forced = types.SimpleNamespace(
        platform_dependent=lambda *args, cuda, **_: cuda(*args))
    monkeypatch.setattr(_dispatch, "lax", forced)
    monkeypatch.setattr(_kernel_transpose, "lax", forced)  # the backward's choice too
    return calls


# --- the adapter's plumbing, numerically ------------------------------------------------------

B, N, T, S, H = 2, 4, 64, 64, 32

CASES = {
    # name: (kv heads, q length, kv length, causal, window)
    "causal GQA": (2, T, S, True, None),
    "unmasked": (4, T, S, False, None),
    "causal window GQA": (1, T, S, True, (9, None)),
    "window (l, 0)": (2, T, S, False, (5, 0)),
    "causal T > S": (2, T, S // 2, True, None),
    "causal T < S": (2, T // 2, S, True, None),
}


def _dense64(q, k, v, *, is_causal, window, scale):
    """Float64 dense attention in jfuse's conventions (BTNH, GQA by n // G, tril causal)."""
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    keep = structural_mask(q.shape[1], k.shape[1], is_causal=is_causal, window=window)
    s = np.where(keep, s, -np.inf)
    lse = np.log(np.sum(np.exp(s - s.max(-1, keepdims=True)), -1)) + s.max(-1)
    out = np.einsum("bnts,bsnh->btnh", np.exp(s - lse[..., None]), v)
    return out, lse  # lse (B, N, T)


def _inputs(rng, case, dtype):
    kv, t, s, _, _ = CASES[case]
    shapes = [(B, t, N, H), (B, s, kv, H), (B, s, kv, H)]
    return [jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes]


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("layout", ["BTNH", "BNTH"])
@pytest.mark.parametrize("case", list(CASES))
def test_cudnn_path_matches_float64_forward_lse_and_gradients(case, layout, fake_cudnn, rng):
    dtype = jnp.float16 if case == "unmasked" else jnp.bfloat16
    kv, t, s, is_causal, window = CASES[case]
    q, k, v = _inputs(rng, case, dtype)
    scale = 1 / math.sqrt(H)
    exact = [np.asarray(a.astype(jnp.float32), np.float64) for a in (q, k, v)]
    want_out, want_lse = _dense64(*exact, is_causal=is_causal, window=window, scale=scale)
    swap = (lambda a: a) if layout == "BTNH" else (lambda a: jnp.swapaxes(a, 1, 2))
    args = [swap(a) for a in (q, k, v)]
    fields = dict(scale=scale, layout=layout, is_causal=is_causal, window=window)

    def op(q, k, v):
        return swap(fused_attention(q, k, v, **fields))

    # What reached cuDNN: the user's layout as it is, K/V heads not repeated, top-left causal.
    out = jax.jit(op)(*args)
    (call,) = fake_cudnn
    assert call["layout"] == layout and call["dtype"] == np.dtype(dtype)
    assert call["k"] == args[1].shape and call["q"] == args[0].shape  # K heads, unrepeated
    assert call["mask"] == ("CAUSAL" if is_causal or window else "NO_MASK")
    assert call["window"] == (None if window is None or window[0] is None else window[0] + 1)
    assert call["scale"] == pytest.approx(scale)
    # The output: one rounding to the 16-bit dtype away from float64.
    eps = float(jnp.finfo(dtype).eps)
    assert _err(out, want_out) <= 2 * eps * np.max(np.abs(want_out))

    # The log-sum-exp the derivative reads: f32 and unrounded (a bf16 one is 1e-2 off), per head.
    spec = AttentionSpec(**fields)
    _, m, l = jax.jit(lambda *a: ATTENTION.kernel(spec, (*a,) + (None,) * 5, "triton", False,
                                                  True))(*args)
    assert m.dtype == jnp.float32 and m.shape == (B, kv, N // kv, t)
    np.testing.assert_allclose(np.reshape(m, (B, N, t)), want_lse, atol=2e-5, rtol=2e-6)
    np.testing.assert_array_equal(l, 1.0)

    # Gradients through jfuse's derivative from cuDNN's forward: no further from float64 than
    # dense attention under jax.jit (the project's rule), in the same dtype.
    ct = jnp.asarray(rng.standard_normal(want_out.shape), dtype)

    def loss(f):
        return lambda *a: jnp.sum((f(*a) * ct).astype(jnp.float32))

    def dense(q, k, v):
        g = N // kv
        kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        sc = jnp.einsum("btnh,bsnh->bnts", q, kr).astype(jnp.float32) * scale
        keep = structural_mask(t, s, is_causal=is_causal, window=window)
        p = jax.nn.softmax(jnp.where(keep, sc, -1e30), axis=-1).astype(v.dtype)
        return jnp.einsum("bnts,bsnh->btnh", p, vr)

    del fake_cudnn[:]
    ours = jax.jit(jax.grad(loss(op), argnums=(0, 1, 2)))(*args)
    # The gradient's forward ran cuDNN (with the log-sum-exp), and its backward cuDNN's own
    # (the VJP of a forward without it).
    assert [call["residual"] for call in fake_cudnn] == [True, False]
    theirs = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    ct64 = np.asarray(ct.astype(jnp.float32), np.float64)
    truth = _dense64_grads(exact, ct64, is_causal=is_causal, window=window, scale=scale)
    for o, th, r in zip(ours, theirs, truth):
        o = np.asarray(swap(o).astype(jnp.float32), np.float64)
        assert _err(o, r) <= 2 * _err(th, r) + 1e-2 * np.max(np.abs(r)), case


def _dense64_grads(exact, ct, *, is_causal, window, scale):
    """Gradients of sum(attention(q, k, v) * ct) in float64 (jax with x64, on the host)."""

    def f(q, k, v):
        g = q.shape[2] // k.shape[2]
        kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("btnh,bsnh->bnts", q, kr) * scale
        keep = structural_mask(q.shape[1], k.shape[1], is_causal=is_causal, window=window)
        p = jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1)
        return jnp.sum(jnp.einsum("bnts,bsnh->btnh", p, vr) * ct)

    with jax.enable_x64():
        grads = jax.grad(f, argnums=(0, 1, 2))(*(jnp.asarray(a, jnp.float64) for a in exact))
        return [np.asarray(g) for g in grads]


def test_interpret_mode_never_asks_cudnn(fake_cudnn, rng):
    """cuDNN has no interpreter: in interpret mode the GPU kernel is the Triton one."""
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in _inputs(rng, "causal GQA", jnp.bfloat16))
    spec = AttentionSpec(scale=0.125, layout="BNTH", is_causal=True)
    operands = (q, k, v) + (None,) * 5
    assert ATTENTION._choice(spec, "cuda", [jax.typeof(a) if a is not None else None
                                             for a in operands], interpret=True)[0] == "triton"
    ATTENTION.kernel(spec, operands, "triton", True, False)
    assert fake_cudnn == []
    with pytest.raises(NotImplementedError, match="interpret"):
        kernels.flash_cudnn(q, k, v, scale=0.125, is_causal=True, interpret=True)


# --- lowering for "cuda" from the CPU ---------------------------------------------------------

def _bf16(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16)


def test_lowers_to_one_cudnn_call_per_call(cudnn_here):
    q, kv = _bf16(2, 256, 8, 64), _bf16(2, 256, 2, 64)
    text = lower_for(lambda q, k, v: jfuse.ops.attention(q, k, v, is_causal=True), q, kv, kv,
                     platform="cuda")
    assert kernel_calls(text) == {"cudnn-fmha": 1}
    # GQA read natively: the custom call takes the 2 K/V heads, in the user's BTNH layout.
    call = re.search(r"custom_call @__cudnn\$fmhaSoftmax\((.*)$", text, re.MULTILINE).group(1)
    assert "tensor<2x256x2x64xbf16>" in call and "CAUSAL" in call
    # Either layout, a causal window (its length in the backend config) and f16 lower the same way.
    bnth = [jax.ShapeDtypeStruct((2, a.shape[2], a.shape[1], 64), jnp.float16) for a in (q, kv)]
    text = lower_for(lambda q, k, v: jfuse.ops.attention(
        q, k, v, local_window_size=(64, 0), layout="BNTH"), bnth[0], bnth[1], bnth[1],
        platform="cuda")
    assert kernel_calls(text) == {"cudnn-fmha": 1}
    assert re.search(r"sliding_window_length\\22: \\2265\\22|sliding_window_length\\22: 65",
                     text), "the window of 64 keys back is cuDNN's length 65"


def test_gradients_lower_to_cudnns_own_backward(cudnn_here):
    # jax.grad runs cuDNN's backward: the forward (with the log-sum-exp), the forward it
    # differentiates and its backward graph; no Triton call, and nothing left to XLA's
    # blockwise derivative (no exponential of recomputed scores).
    q, kv = _bf16(2, 256, 8, 64), _bf16(2, 256, 2, 64)
    loss = lambda q, k, v: jnp.sum(  # noqa: E731
        jfuse.ops.attention(q, k, v, is_causal=True).astype(jnp.float32))
    text = lower_for(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, platform="cuda")
    assert kernel_calls(text) == {"cudnn-fmha": 2, "cudnn-fmha-backward": 1}
    assert "stablehlo.exponential" not in text
    call = re.search(r"custom_call @__cudnn\$fmhaSoftmaxBackward\((.*)$", text,
                     re.MULTILINE).group(1)
    assert "tensor<2x256x2x64xbf16>" in call  # K/V heads read natively, dK and dV per K head


def test_where_cudnn_refuses_the_gpu_lowers_triton_or_xla(cudnn_here):
    f32 = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.float32)
    text = lower_for(lambda q, k, v: jfuse.ops.attention(q, k, v, is_causal=True), f32, f32, f32,
                     platform="cuda")
    assert kernel_calls(text) == {"pallas-triton": 1}
    q = _bf16(1, 256, 4, 64)
    text = lower_for(lambda q, k, v: jfuse.ops.attention(q, k, v, is_causal=True,
                                                         logits_soft_cap=30.0), q, q, q,
                     platform="cuda")
    assert kernel_calls(text) == {}


def _two_layer_attention(x, wq, wk, wv):
    """Two causal attention blocks as Llama-style code writes them (GQA by jnp.repeat)."""
    for _ in range(2):
        q = jnp.einsum("btd,dnh->btnh", x, wq)
        k = jnp.einsum("btd,dkh->btkh", x, wk)
        v = jnp.einsum("btd,dkh->btkh", x, wv)
        k, v = (jnp.repeat(a, 2, axis=2) for a in (k, v))
        s = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) / 8.0
        t = x.shape[1]
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        x = x + jnp.einsum("bnqk,bknh->bqnh", p, v).reshape(x.shape)
    return x


def _model_args():
    return (_bf16(2, 256, 256), _bf16(256, 4, 64), _bf16(256, 2, 64), _bf16(256, 2, 64))


def test_a_fused_model_lowers_one_cudnn_call_per_site_as_the_report_says(cudnn_here):
    fused = jfuse.fuse(_two_layer_attention)
    text = lower_for(fused, *_model_args(), platform="cuda")
    report = fused.last_report
    assert report.fused == {"attention": 2}, str(report)
    assert kernel_calls(text) == {"cudnn-fmha": 2}
    assert all(site.kernels == {"cuda": "cuDNN flash attention"} for site in report.sites)
    assert "[GPU: cuDNN flash attention]" in str(report)


# --- refusals ---------------------------------------------------------------------------------

def _reason(q=(1, 4, 256, 64), k=None, v=None, dtype=jnp.bfloat16, **kw):
    k = k or (q[0], q[1], q[2], q[3])
    v = v or k
    flags = dict(is_causal=True, window=None, soft_cap=None, has_bias=False, has_mask=False,
                 has_segments=False, has_lengths=False)
    flags.update(kw)
    return kernels.cudnn_unsupported_reason(q, k, v, dtype, **flags)


@pytest.mark.parametrize("change,words", [
    (dict(dtype=jnp.float32), "takes float16 or bfloat16, not float32"),
    (dict(soft_cap=30.0), "no logit soft-cap"),
    (dict(has_bias=True), "no additive bias to cuDNN"),
    (dict(has_mask=True), "no dense mask to cuDNN"),
    (dict(has_segments=True), "segment ids"),
    (dict(has_lengths=True), "key lengths"),
    (dict(is_causal=False, window=(8, 8)), "needs is_causal or a right bound of 0"),
    (dict(is_causal=False, window=(8, None)), "needs is_causal or a right bound of 0"),
    (dict(q=(1, 4, 256, 64), k=(1, 4, 128, 64), window=(8, 0)), "more queries than keys"),
    (dict(q=(1, 4, 256, 60)), "head dim 60: cuDNN takes multiples of 8 up to 128"),
    (dict(q=(1, 4, 256, 192)), "up to 128 (256 on Hopper or newer)"),
    (dict(v=(1, 4, 256, 32)), "value head dim differs"),
])
def test_each_declined_case_names_its_reason(change, words, cudnn_here):
    assert words in _reason(**change)


def test_served_cases_and_the_machine_dependent_reasons(cudnn_here, monkeypatch):
    # Top-left causal is jfuse's convention, so T != S is served; so is a window with causal.
    assert _reason() is None
    assert _reason(q=(1, 4, 256, 64), k=(1, 2, 128, 64)) is None  # T > S, GQA
    assert _reason(q=(1, 4, 128, 64), k=(1, 4, 256, 64)) is None  # T < S
    assert _reason(is_causal=False) is None
    assert _reason(window=(31, None)) is None and _reason(is_causal=False, window=(31, 0)) is None
    monkeypatch.setattr(cudnn, "version", lambda: 90100)
    assert "no sliding window (9.2 or newer)" in _reason(window=(31, 0))
    monkeypatch.setattr(cudnn, "version", lambda: None)
    assert _reason() == "cuDNN is not available on this machine"


def test_a_gpu_older_than_ampere_runs_triton_not_cudnn(cudnn_here, monkeypatch):
    """cuDNN's flash attention needs sm80: on an older GPU the call is refused with the reason
    before lowering (a failed compile would run the whole program on XLA instead of Triton)."""
    assert cudnn.gpu_below("8.0") is False  # no GPU here: lowering assumes a current one
    monkeypatch.setattr(cudnn, "gpu_below", lambda capability: capability == "8.0")
    assert _reason() == "cuDNN flash attention needs compute capability 8.0 (Ampere) or newer"
    q = _bf16(1, 256, 4, 64)
    text = lower_for(lambda q, k, v: jfuse.ops.attention(q, k, v, is_causal=True), q, q, q,
                     platform="cuda")
    assert kernel_calls(text) == {"pallas-triton": 1}


def test_jax_own_checks_back_jfuse_up():
    """The last word is JAX's (on shapes only): what it refuses, jfuse reports as refused."""
    assert cudnn.refusal((1, 4, 256, 64), (1, 2, 256, 64), (1, 2, 256, 64), jnp.bfloat16,
                         cudnn_version=CUDNN_VERSION) is None
    reason = cudnn.refusal((1, 4, 256, 60), (1, 4, 256, 60), (1, 4, 256, 60), jnp.bfloat16,
                           cudnn_version=CUDNN_VERSION)
    assert "head dim" in reason and "60" in reason
    assert "fp16/bf16" in cudnn.refusal((1, 4, 256, 64), (1, 4, 256, 64), (1, 4, 256, 64),
                                        jnp.float32, cudnn_version=CUDNN_VERSION)


def test_this_machine_has_no_cudnn_and_says_so():
    """Unpatched, on the CPU-only machine the suite runs on: the GPU runs Triton, or XLA with
    both kernels' reasons."""
    assert cudnn.version() is None
    assert _reason() == "cuDNN is not available on this machine"
    aval = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    operands = [aval, aval, aval] + [None] * 5
    spec = AttentionSpec(scale=0.125, is_causal=True)
    assert ATTENTION.refusals(spec, operands) == {}
    assert ATTENTION.kernel_names(spec, operands) == {"cuda": "Pallas Triton flash kernel"}
    window = AttentionSpec(scale=0.125, is_causal=True, window=(16, 0))
    assert ATTENTION.refusals(window, operands)["cuda"] == (
        "cuDNN is not available on this machine; the Triton flash kernel has no local window")


def test_a_small_masking_constant_keeps_the_gpu_kernels_off():
    """cuDNN and Triton mask with -inf: where the user's constant is small enough to weigh
    (``where(mask, s, -10)``), their softmax would differ, so the GPU runs XLA; -1e9 serves."""
    aval = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    operands = [aval, aval, aval] + [None] * 5
    small = AttentionSpec(scale=0.125, is_causal=True, mask_value=-10.0)
    assert "a masked score of -10 still weighs" in ATTENTION.refusals(small, operands)["cuda"]
    assert "tpu" not in ATTENTION.refusals(small, operands)  # splash takes the value itself
    large = AttentionSpec(scale=0.125, is_causal=True, mask_value=-1e9)
    assert ATTENTION.refusals(large, operands) == {}
    unmasked = AttentionSpec(scale=0.125, mask_value=-10.0)  # nothing is masked: no difference
    assert ATTENTION.refusals(unmasked, operands) == {}
