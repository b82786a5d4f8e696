"""Does each fused op's kernel compile on this machine and compute the right answer?

One :class:`KernelCheck` is one block as users write it (a matmul with a bias and an activation, a
gated linear unit in one of its weight layouts, an RMSNorm or LayerNorm with or without the
residual add in front) at one shape and dtype, in one of two passes: ``fwd`` (the block alone)
or ``fwd+bwd`` (``jax.vjp`` of the block with a random cotangent, as a training step runs it).
:func:`run_check` compiles it under ``jfuse.jit`` with ``implementation="pallas"`` (the kernels
natively, no XLA fallback at trace time) or ``"interpret"`` (the CPU dry run), runs it, and
compares every output and gradient with the same function evaluated in float64 on the host.

Going through ``jfuse.jit`` rather than calling ``jfuse.ops`` exercises what users run: the match,
the rewrite, the kernel and, under ``vjp``, the op's derivative. It also reaches code paths the
public ops do not take (torch-style ``(N, K)`` weights, fused gate/up weights).

Attention has two GPU kernels, picked per call: cuDNN's flash attention (f16/bf16, where the
jaxlib has cuDNN) and the Pallas Triton flash kernel (f32 there); each row records which kernels
the compiled program calls (``kernel_kinds``, e.g. ``cudnn-fmha x1``), so the grid checks both
against float64, the causal ``S = T/2`` cases included (top-left alignment, which only a GPU can
confirm for cuDNN).

The verdict, per output: forward values must be within the interpret-mode kernel tests'
elementwise bound (``atol + rtol * |want|``, tolerances by dtype below), gradients within a small
dtype floor of the largest gradient; either way a result is also accepted when it is no further
from float64 than ``jax.jit``'s own program on the same chip (twice its error), which is the
project's rule ("never further from the reference than jax.jit") and what TF32 matmuls on a GPU
need. A compile error, a declined kernel or a pattern that did not fuse is a row, never a crash.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jfuse
from jfuse.benchmarking import implementation_label, pass_of
from jfuse.core.kernel_calls import kernel_calls

MODES = ("fwd", "fwd+bwd")
DTYPES = ("float32", "bfloat16", "float16")
_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}

# Forward (rtol, atol as a fraction of the output's largest magnitude), as the interpret-mode
# kernel tests use them (tests/test_pallas_linear.py, test_pallas_glu.py): f32 accumulation and
# epilogue, one rounding to the output dtype (a bf16 ulp is 2**-7 relative, f16's 2**-10).
MATMUL_TOLERANCE = {"float32": (1e-5, 1e-5), "bfloat16": (2**-7, 1e-5), "float16": (2**-9, 1e-5)}
# Norms (tests/test_pallas_norm.py): f32 statistics over H terms err like eps_f32 * sqrt(H); a
# 16-bit output adds one rounding.
NORM_RTOL = {"float32": 2**-22, "bfloat16": 2**-8, "float16": 2**-10}
# Gradients come from the ops' derivatives in plain JAX (XLA) fed by the kernel's forward; the
# floor is relative to the largest gradient, a few roundings of the dtype.
GRAD_FLOOR = {"float32": 1e-4, "bfloat16": 2**-6, "float16": 2**-8}
# A result no further from float64 than this many times jax.jit's own is accepted.
JAX_JIT_FACTOR = 2.0

ACTIVATIONS: dict[str | None, Callable] = {
    None: lambda z: z,
    "relu": jax.nn.relu,
    "relu_max": lambda z: jnp.maximum(z, 0),
    "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True),
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
}
GATES = ("silu", "gelu_tanh", "gelu", "relu", "sigmoid", "tanh")
GLU_LAYOUTS = ("(K, N) x2", "(N, K) x2", "(K, 2N)", "(K, 2, N)")


@dataclasses.dataclass(frozen=True)
class KernelCheck:
    """One block, shape, dtype and pass. ``block(compute_dtype)`` returns the user's function;
    ``shapes`` are its arguments' shapes; ``pattern`` the report key it must fuse to."""

    pattern: str
    variant: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    shapes: tuple[tuple[int, ...], ...]
    block: Callable[[Any], Callable[..., Any]] = dataclasses.field(compare=False, repr=False)
    scales: tuple[float, ...] = ()  # std of each argument (default 1; weights 1/sqrt(fan-in))
    offsets: tuple[float, ...] = ()  # mean of each argument (norm scales sit around 1)

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{self.pattern} {self.variant} {dims} {_SHORT[self.dtype]} {self.mode}"

    @property
    def is_norm(self) -> bool:
        return self.pattern.endswith("norm")


# ------------------------------------------------------------------------------------------------
# The blocks, as users write them
# ------------------------------------------------------------------------------------------------

def _linear_block(activation: str | None, bias: bool, nk: bool):
    act = ACTIVATIONS[activation]

    def block(_compute_dtype):
        def linear(x, w, *b):
            z = x @ (w.T if nk else w)
            return act(z + b[0] if bias else z)

        return linear

    return block


def _glu_block(gate: str, layout: str, bias: bool):
    act = ACTIVATIONS[gate]

    def block(_compute_dtype):
        def glu(x, *weights):
            if layout == "(K, 2N)":
                h = x @ weights[0]
                if bias:
                    h = h + weights[1]
                g, u = jnp.split(h, 2, axis=-1)
            elif layout == "(K, 2, N)":
                h = jnp.einsum("mk,kcn->mcn", x, weights[0])
                g, u = h[:, 0], h[:, 1]
            else:
                wg, wu = (w.T for w in weights[:2]) if layout == "(N, K) x2" else weights[:2]
                g, u = x @ wg, x @ wu
                if bias:
                    g, u = g + weights[2], u + weights[3]
            return act(g) * u

        return glu

    return block


def _norm_block(subtract_mean: bool, residual: bool, scale_offset: float, eps: float):
    def block(compute_dtype):
        def norm(x, *params):
            if residual:
                r, *params = params
                x = x + r
            h = x.astype(compute_dtype)
            if subtract_mean:
                h = h - jnp.mean(h, axis=-1, keepdims=True)
            y = h * lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
            y = y * (params[0].astype(compute_dtype) + scale_offset)
            if subtract_mean:
                y = y + params[1].astype(compute_dtype)
            y = y.astype(x.dtype)
            return (y, x) if residual else y

        return norm

    return block


def _attention_block(variant: str):
    """Causal (or unmasked) multi-head attention as Llama-style code writes it: scores in f32,
    ``where``-masked with ``finfo.min`` (``jnp.tril`` of ``(T, S)``: top-left when S != T),
    softmax, probabilities cast back; GQA by ``jnp.repeat``."""

    def block(_compute_dtype):
        def attention(q, k, v):
            if k.shape[2] != q.shape[2]:
                k, v = (jnp.repeat(a, q.shape[2] // k.shape[2], axis=2) for a in (k, v))
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
            s = s.astype(jnp.float32)
            if variant != "no mask":
                t, s_len = q.shape[1], k.shape[1]
                s = jnp.where(jnp.tril(jnp.ones((t, s_len), bool)), s,
                              jnp.finfo(jnp.float32).min)
            p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
            return jnp.einsum("bhqk,bkhd->bqhd", p, v)

        return attention

    return block


def _attention_check(variant, shape, dtype, mode) -> KernelCheck:
    b, t, n, h = shape
    kv_heads = n // 4 if variant.startswith("causal GQA") else n
    s = t // 2 if variant.endswith("S=T/2") else t
    shapes = ((b, t, n, h), (b, s, kv_heads, h), (b, s, kv_heads, h))
    return KernelCheck("attention", variant, shape, dtype, mode, shapes, _attention_block(variant))


def _linear_check(activation, bias, nk, shape, dtype, mode) -> KernelCheck:
    m, k, n = shape
    variant = "+".join([activation or "identity"] + (["bias"] if bias else []))
    variant += ", W (N, K)" if nk else ", W (K, N)"
    shapes = ((m, k), (n, k) if nk else (k, n)) + (((n,),) if bias else ())
    return KernelCheck("linear", variant, shape, dtype, mode, shapes,
                       _linear_block(activation, bias, nk), scales=(1.0, 1 / math.sqrt(k), 0.1))


def _glu_check(gate, layout, bias, shape, dtype, mode) -> KernelCheck:
    m, k, n = shape
    bias = bias and layout in ("(K, N) x2", "(K, 2N)")
    variant = f"{gate} gate, W {layout}" + (", biases" if bias else "")
    w = 1 / math.sqrt(k)
    if layout == "(K, 2N)":
        shapes, scales = ((m, k), (k, 2 * n)) + (((2 * n,),) if bias else ()), (1.0, w, 0.1)
    elif layout == "(K, 2, N)":
        shapes, scales = ((m, k), (k, 2, n)), (1.0, w)
    else:
        weight = (n, k) if layout == "(N, K) x2" else (k, n)
        shapes = ((m, k), weight, weight) + (((n,), (n,)) if bias else ())
        scales = (1.0, w, w, 0.1, 0.1)
    return KernelCheck("glu", variant, shape, dtype, mode, shapes, _glu_block(gate, layout, bias),
                       scales=scales)


def _norm_check(kind, residual, scale_offset, shape, dtype, mode) -> KernelCheck:
    rows, hidden = shape
    subtract_mean = kind == "layer_norm"
    pattern = ("add_" if residual else "") + kind
    variant = "(1 + w) scale" if scale_offset else "scale"
    variant += ", bias" if subtract_mean else ""
    x_shapes = ((rows, hidden),) * (2 if residual else 1)
    params = ((hidden,), (hidden,)) if subtract_mean else ((hidden,),)
    n_x = len(x_shapes)
    # x around 0.3 with unit spread (a non-zero mean exercises LayerNorm's centering), scales
    # around 1 (or 0 with Gemma's offset), biases small.
    offsets = (0.3,) * n_x + ((0.0 if scale_offset else 1.0,) + ((0.0,) if subtract_mean else ()))
    scales = (1.0,) * n_x + (0.1, 0.1)
    eps = 1e-5 if subtract_mean else 1e-6
    return KernelCheck(pattern, variant, shape, dtype, mode, x_shapes + params,
                       _norm_block(subtract_mean, residual, scale_offset, eps), scales=scales,
                       offsets=offsets)


def checks(size: str = "device") -> list[KernelCheck]:
    """The grid: every kernel code path at least once, dtypes and passes spread over it.

    ``device``: shapes with ragged edges for every tile size (M = 1000; N = 1000 in some linear
    cases; hidden 4095 and 8193 besides 4096), small enough that compiling dominates. ``tiny``:
    one forward and one forward+backward case per pattern, tiny shapes, for the CPU dry run.
    """
    if size == "tiny":
        out = []
        for i, mode in enumerate(MODES):
            dtype = "float32"
            out.append(_linear_check("gelu_tanh" if i else "relu", True, bool(i), (20, 32, 48),
                                     dtype, mode))
            out.append(_glu_check("silu", GLU_LAYOUTS[i], True, (20, 32, 40), dtype, mode))
            for kind in ("rms_norm", "layer_norm"):
                out.append(_norm_check(kind, bool(i), 0.0, (12, 100), dtype, mode))
            out.append(_attention_check("causal GQA" if i else "causal", (1, 128, 4, 32), dtype,
                                        mode))
        return out
    if size != "device":
        raise ValueError(f"size={size!r}; expected 'device' or 'tiny'")
    out: list[KernelCheck] = []
    # linear: every activation in every dtype; the pass, the bias and the weight layout cycle so
    # that each activation meets both passes and both layouts across the three dtypes.
    for d, dtype in enumerate(DTYPES):
        for a, activation in enumerate(ACTIVATIONS):
            i = a + d
            shape = (1000, 768, 1000) if a == 2 else (1000, 768, 1536)
            out.append(_linear_check(activation, activation is None or i % 2 == 0, i % 4 in (1, 2),
                                     shape, dtype, MODES[i % 2]))
    # glu: every gate in every dtype, cycling through the four weight layouts and both passes;
    # K under and over the GPU profitability threshold (implementation="pallas" runs it anyway).
    for d, dtype in enumerate(DTYPES):
        for g, gate in enumerate(GATES):
            i = g + d
            shape = (1000, 384 if i % 3 else 1024, 1536)
            out.append(_glu_check(gate, GLU_LAYOUTS[i % 4], i % 2 == 0, shape, dtype,
                                  MODES[(i // 2) % 2]))
    # norms: RMS and Layer, with and without the residual, Gemma's (1 + w), widths that fill
    # the lanes exactly, miss by one, and spill past a power of two.
    configs = [(kind, residual, offset)
               for kind in ("rms_norm", "layer_norm") for residual in (False, True)
               for offset in ((0.0, 1.0) if kind == "rms_norm" else (0.0,))]
    for c, (kind, residual, offset) in enumerate(configs):
        for h, hidden in enumerate((4096, 4095, 8193)):
            i = c + h
            out.append(_norm_check(kind, residual, offset, (1000, hidden), DTYPES[i % 3],
                                   MODES[i % 2]))
    # attention: causal, unmasked and grouped-query (kv heads repeated by the user's code), in
    # every dtype and both passes (on GPU, cuDNN serves f16/bf16 and Triton f32; splash serves
    # f32/bf16 on TPU); causal with half as many keys as queries, on each GPU kernel.
    for d, dtype in enumerate(DTYPES):
        for v, variant in enumerate(("causal", "no mask", "causal GQA")):
            out.append(_attention_check(variant, (2, 1024, 8, 128), dtype, MODES[(v + d) % 2]))
    out.append(_attention_check("causal S=T/2", (2, 1024, 8, 128), "bfloat16", "fwd+bwd"))
    out.append(_attention_check("causal S=T/2", (2, 1024, 8, 128), "float32", "fwd"))
    return _round_robin(out)


def _round_robin(grid: list[KernelCheck]) -> list[KernelCheck]:
    """The grid reordered to take one case of each pattern in turn, so a run cut short by its
    budget still covers every kernel."""
    families: dict[str, list[KernelCheck]] = {}
    for check in grid:
        families.setdefault(check.pattern, []).append(check)
    queues = list(families.values())
    ordered = []
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    return ordered


# ------------------------------------------------------------------------------------------------
# Running one check
# ------------------------------------------------------------------------------------------------

def _inputs(check: KernelCheck, seed: int = 0) -> tuple[list[jax.Array], list[np.ndarray]]:
    """The block's arguments in the check's dtype, and their exact values in float64."""
    rng = np.random.default_rng(seed)
    device, exact = [], []
    for i, shape in enumerate(check.shapes):
        scale = check.scales[i] if i < len(check.scales) else 1.0
        offset = check.offsets[i] if i < len(check.offsets) else 0.0
        value = jnp.asarray(rng.standard_normal(shape) * scale + offset, check.dtype)
        device.append(value)
        exact.append(np.asarray(value.astype(jnp.float32), np.float64))
    return device, exact


def _program(check: KernelCheck, compute_dtype) -> Callable[..., Any]:
    """The function compiled: the block, or ``jax.vjp`` of it with a given cotangent."""
    return pass_of(check.block(compute_dtype), check.mode)


def _arguments(check: KernelCheck, device_args, exact_args):
    """What :func:`_program` takes, on the device and in float64 (with a random cotangent)."""
    if check.mode == "fwd":
        return tuple(device_args), tuple(exact_args)
    out = jax.eval_shape(check.block(jnp.float32), *device_args)
    leaves, treedef = jax.tree.flatten(out)
    rng = np.random.default_rng(1)
    cot = [jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
    cot64 = [np.asarray(c.astype(jnp.float32), np.float64) for c in cot]
    return ((tuple(device_args), treedef.unflatten(cot)),
            (tuple(exact_args), treedef.unflatten(cot64)))


def _float64_reference(check: KernelCheck, exact_args) -> list[np.ndarray]:
    """The block in float64 on the host CPU, the same code the device ran."""
    cpu = jax.devices("cpu")[0]
    with jax.enable_x64(True):
        args = jax.device_put(exact_args, cpu)
        out = jax.jit(_program(check, jnp.float64))(*args)
        return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(out)]


def _as64(tree) -> list[np.ndarray]:
    return [np.asarray(jnp.asarray(leaf).astype(jnp.float32), np.float64)
            for leaf in jax.tree.leaves(tree)]


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|; inf where got is not finite and want is."""
    finite = np.isfinite(want)
    if np.any(~np.isfinite(got[finite])):
        return math.inf
    scale = max(float(np.max(np.abs(want[finite]), initial=0.0)), 1e-30)
    return float(np.max(np.abs(got[finite] - want[finite]), initial=0.0)) / scale


def _bound_excess(check: KernelCheck, got: np.ndarray, want: np.ndarray) -> float:
    """max err / (atol + rtol |want|) with the interpret tests' forward tolerances (<= 1 passes)."""
    if check.is_norm:
        rtol, atol_fraction = NORM_RTOL[check.dtype], 5e-7 * math.sqrt(check.shape[-1])
    else:
        rtol, atol_fraction = MATMUL_TOLERANCE[check.dtype]
    finite = np.isfinite(want)
    if np.any(~np.isfinite(got[finite])):
        return math.inf
    atol = atol_fraction * max(float(np.max(np.abs(want[finite]), initial=0.0)), 1.0)
    bound = atol + rtol * np.abs(want[finite])
    return float(np.max(np.abs(got[finite] - want[finite]) / bound, initial=0.0))


def compare_outputs(check: KernelCheck, got: list, want: list, jax_jit: list) -> dict[str, Any]:
    """The verdict on every output leaf (forward values first, then gradients)."""
    n_forward = len(want) if check.mode == "fwd" else len(jax.tree.leaves(
        jax.eval_shape(check.block(jnp.float32),
                       *[jax.ShapeDtypeStruct(s, check.dtype) for s in check.shapes])))
    worst: dict[str, Any] = {"err": 0.0, "jax_jit_err": 0.0, "worst_output": "", "ok": True}
    for i, (g, w, j) in enumerate(zip(got, want, jax_jit)):
        what = f"out{i}" if i < n_forward else f"grad{i - n_forward}"
        err, reference_err = _relative_error(g, w), _relative_error(j, w)
        if i < n_forward:
            ok = _bound_excess(check, g, w) <= 1.0
        else:
            ok = err <= GRAD_FLOOR[check.dtype]
        ok = ok or err <= JAX_JIT_FACTOR * reference_err
        if err >= worst["err"]:
            worst.update(err=err, jax_jit_err=reference_err, worst_output=what)
        worst["ok"] = worst["ok"] and ok
        if not ok:
            worst["worst_output"] = what + " (out of bound)"
    return worst


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def run_check(check: KernelCheck, implementation: str) -> dict[str, Any]:
    """Compile, run and verify one check; a CSV row. Never raises for the check's own failures."""
    row: dict[str, Any] = {
        "section": "correctness", "case": check.name, "op": check.pattern,
        "variant": check.variant, "shape": "x".join(map(str, check.shape)), "dtype": check.dtype,
        "mode": check.mode, "implementation": implementation, "backend": jax.default_backend(),
    }
    start = time.perf_counter()
    try:
        device_args, exact_args = _inputs(check)
        args, args64 = _arguments(check, device_args, exact_args)
        fused = jfuse.jit(_program(check, jnp.float32), implementation=implementation)
        lowered = fused.lower(*args)
        report = fused.report
        row["fused_sites"] = ", ".join(f"{k}={v}" for k, v in sorted(report.fused.items()))
        calls = kernel_calls(lowered.as_text())
        row["kernels"] = sum(calls.values())
        row["kernel_kinds"] = implementation_label(calls)  # which kernels: "cudnn-fmha x1"
        if report.fallbacks or report.fused.get(check.pattern, 0) < 1:
            row["status"] = "declined" if report.fallbacks else "not fused"
            row["detail"] = "; ".join(report.fallbacks) or str(report).splitlines()[-1]
            return row
        compile_start = time.perf_counter()
        compiled = lowered.compile()
        row["compile_s"] = time.perf_counter() - compile_start
        got = _as64(compiled(*args))
        jax_jit = _as64(jax.jit(_program(check, jnp.float32))(*args))
        want = _float64_reference(check, args64)
        verdict = compare_outputs(check, got, want, jax_jit)
        row.update(err=verdict["err"], jax_jit_err=verdict["jax_jit_err"],
                   worst_output=verdict["worst_output"])
        row["status"] = "ok" if verdict["ok"] else "mismatch"
    except NotImplementedError as error:  # a kernel refused the shape (JFUSE_RAISE=1 raises it)
        row.update(status="declined", detail=_first_line(error))
    except Exception as error:  # noqa: BLE001 (a compile or runtime error is a row)
        row.update(status="error", detail=_first_line(error),
                   traceback=traceback.format_exc(limit=-3)[-1500:])
    finally:
        row["seconds"] = time.perf_counter() - start
    return row
