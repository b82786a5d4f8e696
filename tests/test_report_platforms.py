"""The report says what really runs on each platform: kernel or XLA, and why.

A fused site records, per lowering platform, whether its op runs the Pallas kernel or XLA (a
kernel that cannot serve the shape, or is expected to lose to XLA there). These tests check the
record against the programs jfuse really lowers for "tpu" and "cuda": the number of kernel calls
in each equals the number of sites the report says run a kernel on that platform.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import count_kernel_calls, lower_for

import jfuse


def _swiglu_block(x, w_gate, w_up, w_down, w_out):
    h = jax.nn.silu(x @ w_gate) * (x @ w_up)      # K = 64: the GPU kernel runs
    h = jax.nn.silu(h @ w_down) * (h @ w_out)     # K = 2048 in bf16: past the GPU threshold
    return h


def _arguments(dtype=jnp.bfloat16):
    rng = np.random.default_rng(0)
    shapes = [(32, 64), (64, 2048), (64, 2048), (2048, 128), (2048, 128)]
    return [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), dtype) for s in shapes]


def test_each_site_records_kernel_or_xla_per_platform():
    report = jfuse.explain(_swiglu_block)(*_arguments())
    assert report.fused == {"glu": 2}, str(report)
    first, second = report.sites
    assert first.platforms == {"tpu": "kernel", "cuda": "kernel"}
    assert second.platforms == {"tpu": "kernel", "cuda": "xla"}
    assert "K=2048" in second.platform_reasons["cuda"], second.platform_reasons
    assert "GPU: XLA (" in str(report) and "TPU: XLA" not in str(report)
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["sites"][1]["platforms"]["cuda"] == "xla"
    assert as_json["sites"][1]["platform_reasons"]["cuda"] == second.platform_reasons["cuda"]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernel_calls_lowered_match_the_report(platform):
    args = _arguments()
    fused = jfuse.fuse(_swiglu_block)
    text = lower_for(fused, *args, platform=platform)
    report = fused.last_report
    expected = sum(site.runs_kernel_on(platform) for site in report.sites)
    assert expected == (2 if platform == "tpu" else 1)
    assert count_kernel_calls(text, platform) == expected


@pytest.mark.parametrize("implementation, runs", [("xla", "xla"), ("interpret", "interpret"),
                                                  ("pallas", "kernel")])
def test_implementation_option_is_what_the_report_says_runs(implementation, runs):
    args = _arguments(jnp.float32)[:3]
    report = jfuse.explain(lambda x, wg, wu: jax.nn.silu(x @ wg) * (x @ wu),
                           implementation=implementation)(*args)
    assert report.fused == {"glu": 1}, str(report)
    assert report.sites[0].platforms == {"tpu": runs, "cuda": runs}
    if implementation == "xla":
        assert "XLA (implementation='xla')" in str(report)


@pytest.mark.parametrize("block", ["glu", "linear"])
def test_f32_matmuls_run_on_xla_on_gpu_and_say_why(block):
    # Measured on an H200: the f32 Triton matmul kernels lost to XLA's TF32 GEMMs at every size.
    # The TPU kernel still runs, and implementation="pallas" still runs the GPU one.
    x, w_gate, w_up = _arguments(jnp.float32)[:3]
    if block == "glu":
        fn, args = (lambda x, wg, wu: jax.nn.silu(x @ wg) * (x @ wu)), (x, w_gate, w_up)
    else:
        fn, args = (lambda x, w: jax.nn.gelu(x @ w)), (x, w_gate)
    report = jfuse.explain(fn)(*args)
    assert report.fused == {block: 1}, str(report)
    site = report.sites[0]
    assert site.platforms == {"tpu": "kernel", "cuda": "xla"}
    assert "float32 on GPU" in site.platform_reasons["cuda"], site.platform_reasons
    assert count_kernel_calls(lower_for(jfuse.fuse(fn), *args, platform="cuda"), "cuda") == 0
    forced = lower_for(jfuse.fuse(fn, implementation="pallas"), *args, platform="cuda")
    assert count_kernel_calls(forced, "cuda") == 1
    # bf16 at the same shapes keeps the kernel.
    half = [a.astype(jnp.bfloat16) for a in args]
    assert jfuse.explain(fn)(*half).sites[0].platforms["cuda"] == "kernel"


def test_pallas_reports_the_glu_kernel_past_its_profitability_rule():
    args = _arguments()
    report = jfuse.explain(_swiglu_block, implementation="pallas")(*args)
    assert [site.platforms["cuda"] for site in report.sites] == ["kernel", "kernel"]
    text = lower_for(jfuse.fuse(_swiglu_block, implementation="pallas"), *args, platform="cuda")
    assert count_kernel_calls(text, "cuda") == 2


def test_pallas_on_one_platform_ignores_another_platforms_refusal(rng):
    # The TPU kernel refuses f16; lowered for the GPU, "pallas" still runs the Triton kernel.
    x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float16)
    w = jnp.asarray(rng.standard_normal((64, 128)) / 8, jnp.float16)
    block = lambda x, w: jax.nn.relu(x @ w)
    report = jfuse.explain(block, implementation="pallas")(x, w)
    assert report.fused == {"linear": 1} and not report.fallbacks
    site = report.sites[0]
    assert site.platforms == {"tpu": "xla", "cuda": "kernel"} and "float16" in site.platform_reasons["tpu"]
    fused = jfuse.fuse(block, implementation="pallas")
    assert count_kernel_calls(lower_for(fused, x, w, platform="cuda"), "cuda") == 1


def _mlp_block(x, w, b, wg, wu):
    h = jax.nn.gelu(x @ w + b)
    return jax.nn.silu(h @ wg) * (h @ wu)


def _mlp_arguments():
    rng = np.random.default_rng(1)
    shapes = [(16, 64), (64, 128), (128,), (128, 64), (128, 64)]
    return [jnp.asarray(rng.standard_normal(s) / 8, jnp.float32) for s in shapes]


@pytest.mark.parametrize("precision", ["highest", "float32"])
def test_matmul_precision_reaches_the_kernels(precision):
    """With a default matmul precision set, every site still runs its kernel on both platforms,
    the report says so exactly, and the kernels (interpret mode) compute what jax.jit does."""
    args = _mlp_arguments()
    with jax.default_matmul_precision(precision):
        report = jfuse.explain(_mlp_block)(*args)
        assert report.fused == {"linear": 1, "glu": 1} and not report.fallbacks
        assert all(site.platforms == {"tpu": "kernel", "cuda": "kernel"} for site in report.sites)
        for platform in ("tpu", "cuda"):
            text = lower_for(jfuse.fuse(_mlp_block), *args, platform=platform)
            assert count_kernel_calls(text, platform) == 2
        got = jfuse.jit(_mlp_block, implementation="interpret")(*args)
        want = jax.jit(_mlp_block)(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_a_precision_mosaic_lacks_runs_xla_on_tpu_only_and_says_so():
    args = _mlp_arguments()
    with jax.default_matmul_precision("high"):  # bf16_3x: Triton honours it, Mosaic does not
        report = jfuse.explain(_mlp_block)(*args)
        assert report.fused == {"linear": 1, "glu": 1}
        for site in report.sites:
            assert site.platforms == {"tpu": "xla", "cuda": "kernel"}
            assert "precision" in site.platform_reasons["tpu"]
        assert "TPU: XLA (precision" in str(report)
        assert count_kernel_calls(lower_for(jfuse.fuse(_mlp_block), *args, platform="tpu"),
                                  "tpu") == 0
        assert count_kernel_calls(lower_for(jfuse.fuse(_mlp_block), *args, platform="cuda"),
                                  "cuda") == 2


def _attention_block(q, k, v, cap=None):
    s = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) / 8.0
    if cap is not None:
        s = jnp.tanh(s / cap) * cap
    t = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)


def test_attention_names_the_gpu_kernel_or_both_refusals():
    """GPU attention picks cuDNN, then Triton, per call: the report names the one that runs
    (here, with no cuDNN on this machine, Triton) or, where neither serves, gives both reasons;
    the kernel calls lowered for "cuda" agree. (With cuDNN: tests/test_attention_cudnn.py.)"""
    q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
    report = jfuse.explain(_attention_block)(q, q, q)
    (site,) = report.sites
    assert site.platforms == {"tpu": "kernel", "cuda": "kernel"}
    assert site.kernels == {"cuda": "Pallas Triton flash kernel"}
    assert "[GPU: Pallas Triton flash kernel]" in str(report)
    assert json.loads(json.dumps(report.to_dict()))["sites"][0]["kernels"] == site.kernels
    assert count_kernel_calls(lower_for(jfuse.fuse(_attention_block), q, q, q,
                                        platform="cuda"), "cuda") == 1

    capped = lambda q, k, v: _attention_block(q, k, v, cap=30.0)  # noqa: E731
    (site,) = jfuse.explain(capped)(q, q, q).sites
    assert site.platforms["cuda"] == "xla" and site.kernels == {}
    assert site.platform_reasons["cuda"] == (
        "cuDNN flash attention has no logit soft-cap; the Triton flash kernel has no logit "
        "soft-cap")
    assert count_kernel_calls(lower_for(jfuse.fuse(capped), q, q, q, platform="cuda"),
                              "cuda") == 0
