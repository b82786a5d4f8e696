"""The shared base of the Pallas kernel tests (``tests/test_pallas_<op>.py``).

What every kernel test needs, written once: the backends and the platform each lowers for, the
dtypes, float64 references of the activations, the refusal checks every kernel's
``*_unsupported_reason`` must pass, and :class:`MatmulKernelTests`, the tests every
matmul-epilogue op (``jfuse.pallas.matmul``: linear, glu, ...) must pass. A matmul op's test
file subclasses it and says what differs: its kernels, how many weights it has, its keyword
names, its float64 epilogue and its lowering cases; pytest then runs the whole contract for that
op, and the file adds only the op's own tests.

Numerics run the kernels in interpret mode on CPU against float64 numpy references computed
from the same (dtype-rounded) inputs. Lowering tests lower the real kernels for "tpu" and
"cuda" from this CPU machine (``tests/lowering.py``): interpret mode accepts primitives the
backends reject, so every numerics case has a lowering twin.

Matmul tolerances: the kernels accumulate in f32 and round once to the output dtype, so an f32
output is within ~1e-5 of the output's magnitude, and a bf16 output within half a bf16 ulp
(2**-8 relative) of the exact value, plus the same f32 noise. An op whose output is a product of
its matmuls widens the absolute scale (see :meth:`MatmulKernelTests.assert_output_close`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:  # tests/ as a package or as a rootdir on sys.path
    from tests.lowering import count_kernel_calls, lower_for
except ImportError:  # pragma: no cover
    from lowering import count_kernel_calls, lower_for

BACKENDS = ["tpu", "triton"]
PLATFORM = {"tpu": "tpu", "triton": "cuda"}  # what each backend's kernel is lowered for
DTYPES = [jnp.float32, jnp.bfloat16]
DTYPE_IDS = ["f32", "bf16"]

# ----------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------

# None is the identity (linear) or the bilinear gate (glu).
ACTIVATIONS = [None, "relu", "relu_max", "gelu_tanh", "gelu", "silu", "sigmoid", "tanh"]

_erf64 = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid64(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form


ACTIVATIONS_64 = {
    None: lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "relu_max": lambda z: np.maximum(z, 0.0),
    "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "gelu": lambda z: 0.5 * z * (1 + _erf64(z / math.sqrt(2))),
    "silu": lambda z: z * _sigmoid64(z),
    "sigmoid": _sigmoid64,
    "tanh": np.tanh,
}


def as64(a):
    """``a`` (any float dtype) as float64 numpy, exactly; None stays None."""
    return None if a is None else np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


# ----------------------------------------------------------------------------------------------
# Checks every kernel's refusals pass
# ----------------------------------------------------------------------------------------------


def assert_refuses_dtypes(reason: Callable[..., str | None], backend: str, *problem: int):
    """``reason(*problem, dtype)`` accepts f32 and bf16, refuses int32 and float64 by name, and
    takes f16 on Triton only."""
    assert reason(*problem, jnp.float32) is None
    assert reason(*problem, jnp.bfloat16) is None
    for bad in (jnp.int32, np.float64):
        text = reason(*problem, bad)
        assert text and jnp.dtype(bad).name in text
    f16 = reason(*problem, jnp.float16)
    assert (f16 is None) == (backend == "triton"), f16


# ----------------------------------------------------------------------------------------------
# Matmul-epilogue kernels
# ----------------------------------------------------------------------------------------------

# (rtol, atol as a fraction of the output's scale)
TOLERANCE = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2**-7, 1e-5)}

# Block sizes forced small enough that M and N have ragged edge blocks and K takes several
# steps with a remainder; each kernel's own legality rules (TPU: 8/16-row and 128-lane tiles;
# Triton: powers of two >= 16).
SMALL_BLOCKS = {
    "tpu": dict(block_m=16, block_n=128, block_k=128),
    "triton": dict(block_m=16, block_n=32, block_k=64),
}

# (name, M, K, N, blocks): default blocks on odd and aligned shapes; K > 512 so the TPU default
# zero-pads K (1000 -> 1024) and Triton's K loop ends on a remainder; forced small blocks for
# ragged M/N edges and several K steps with a remainder (700 = 5 x 128 + 60 on TPU after
# padding to 768; 10 x 64 + 60 on Triton).
SHAPES = [
    ("odd", 37, 45, 53, None),
    ("aligned", 128, 256, 128, None),
    ("long_k_default_blocks", 24, 1000, 40, None),
    ("ragged_small_blocks", 37, 700, 150, "small"),
]


def assert_close(got, want, dtype, scale=None):
    """``|got - want| <= atol + rtol |want|`` elementwise, with (rtol, atol fraction) from
    :data:`TOLERANCE` and atol scaled by ``max(max|want|, scale or 1)``."""
    rtol, atol_fraction = TOLERANCE[dtype]
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    atol = atol_fraction * max(np.max(np.abs(want)), 1.0 if scale is None else scale)
    err = np.abs(got - want)
    bound = atol + rtol * np.abs(want)
    assert np.all(np.isfinite(got)), "non-finite output"
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"max error {err.max():.3g}; worst at {worst}: got {got[worst]!r}, want {want[worst]!r}"
    )


class MatmulKernelTests:
    """The contract of a matmul-epilogue op's two kernels; subclass it as ``Test<Op>Kernels``.

    A subclass sets:
      KERNELS: ``{"tpu": <op>_tpu, "triton": <op>_triton}``, each called as
        ``fn(x, *weights, *biases, activation=..., <TRANSPOSED>=..., <EXTRAS>=..., ...)``.
      REASONS: ``{"tpu": tpu_unsupported_reason, "triton": triton_unsupported_reason}``.
      N_WEIGHTS: how many weights (and bias slots) the op takes.
      BIASES: named bias layouts, each a tuple of N_WEIGHTS bools; "all" and "none" at least.
      TRANSPOSED, EXTRAS: the op's keyword names for ``(N, K)`` weights and for returning the
        epilogue's extra outputs.
      LOWERING_CASES: ``(id, M, K, N, dtype, kwargs)``; kwargs may use ``biases``,
        ``transposed``, ``extras`` and ``small`` (the backend's SMALL_BLOCKS).
    and implements :meth:`epilogue64` (and :meth:`unfused`, the op in plain jnp).
    """

    KERNELS: dict[str, Callable[..., Any]]
    REASONS: dict[str, Callable[..., str | None]]
    N_WEIGHTS: int
    BIASES: dict[str, tuple[bool, ...]]
    TRANSPOSED: str
    EXTRAS: str
    LOWERING_CASES: list[tuple]

    # -- what a subclass says about its op --------------------------------------------------

    @staticmethod
    def epilogue64(zs, activation) -> tuple:
        """``(y, *extras)`` in float64 from ``zs = [x @ W_i + b_i]``."""
        raise NotImplementedError

    @staticmethod
    def unfused(x, *weights):
        """The op in plain jnp (no bias, its default activation), which lowers to no kernel."""
        raise NotImplementedError

    def assert_output_close(self, y, want, dtype):
        """The main output against ``want = epilogue64(...)``; by default as any output."""
        assert_close(y, want[0], dtype)

    # -- shared machinery -------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc):
        # The subclass's lowering cases, one test each (a base-class decorator cannot see them).
        if "lowering_case" in metafunc.fixturenames:
            metafunc.parametrize("lowering_case", self.LOWERING_CASES,
                                 ids=[case[0] for case in self.LOWERING_CASES])

    def operands(self, m, k, n, dtype, *, biases="all", transposed=False, seed=0):
        """Random kernel arguments ``(x, *weights, *biases)`` in ``dtype`` (kernel layout) and
        their exact float64 values, with the weights always as (K, N) in the float64 copy."""
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        ws = [jnp.asarray(rng.standard_normal((k, n)) / math.sqrt(k), dtype)
              for _ in range(self.N_WEIGHTS)]
        bs = [jnp.asarray(rng.standard_normal(n), dtype) if has else None
              for has in self.BIASES[biases]]
        kernel_ws = [w.T for w in ws] if transposed else ws
        return (x, *kernel_ws, *bs), tuple(as64(a) for a in (x, *ws, *bs))

    def reference(self, args64, activation):
        """``(y, *extras)`` in float64."""
        x64, ws64, bs64 = args64[0], args64[1:1 + self.N_WEIGHTS], args64[1 + self.N_WEIGHTS:]
        zs = [x64 @ w + (0.0 if b is None else b) for w, b in zip(ws64, bs64)]
        return self.epilogue64(zs, activation)

    def run_and_check(self, kernel, m, k, n, dtype, *, activation, biases="all",
                      transposed=False, extras=True, **blocks):
        args, args64 = self.operands(m, k, n, dtype, biases=biases, transposed=transposed)
        out = self.KERNELS[kernel](
            *args, activation=activation, interpret=True,
            **{self.TRANSPOSED: transposed, self.EXTRAS: extras}, **blocks,
        )
        want = self.reference(args64, activation)
        if extras:
            assert isinstance(out, tuple) and len(out) == len(want)
            y, *extra_outs = out
            for got, expected in zip(extra_outs, want[1:]):
                assert got.shape == (m, n) and got.dtype == dtype
                assert_close(got, expected, dtype)
        else:
            y = out
        assert y.shape == (m, n) and y.dtype == dtype
        self.assert_output_close(y, want, dtype)

    def lower_kernel(self, kernel, m, k, n, dtype, *, biases="all", transposed=False,
                     extras=False, **kwargs):
        x = jax.ShapeDtypeStruct((m, k), dtype)
        w = jax.ShapeDtypeStruct((n, k) if transposed else (k, n), dtype)
        b = jax.ShapeDtypeStruct((n,), dtype)
        layout = self.BIASES[biases]

        def f(x, *rest):
            weights, given = rest[:self.N_WEIGHTS], list(rest[self.N_WEIGHTS:])
            bs = [given.pop(0) if has else None for has in layout]
            return self.KERNELS[kernel](x, *weights, *bs, **kwargs,
                                        **{self.TRANSPOSED: transposed, self.EXTRAS: extras})

        args = (x,) + (w,) * self.N_WEIGHTS + (b,) * sum(layout)
        return lower_for(f, *args, platform=PLATFORM[kernel])

    # -- numerics (interpret mode) ----------------------------------------------------------

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("kernel", BACKENDS)
    def test_every_activation_odd_shape(self, kernel, dtype, activation):
        self.run_and_check(kernel, 37, 45, 53, dtype, activation=activation)

    @pytest.mark.parametrize("biases,transposed", [("all", False), ("none", True)],
                             ids=["biases", "nobias-wT"])
    @pytest.mark.parametrize("name,m,k,n,blocks", SHAPES, ids=[s[0] for s in SHAPES])
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("kernel", BACKENDS)
    def test_shapes_and_layouts(self, kernel, dtype, name, m, k, n, blocks, biases, transposed):
        blocks = SMALL_BLOCKS[kernel] if blocks == "small" else {}
        self.run_and_check(kernel, m, k, n, dtype, activation="silu", biases=biases,
                           transposed=transposed, **blocks)

    # -- block sizes and refusals -----------------------------------------------------------

    @pytest.mark.parametrize("kernel", BACKENDS)
    def test_unsupported_reasons(self, kernel):
        reason = self.REASONS[kernel]
        assert_refuses_dtypes(reason, kernel, 37, 45, 53)
        assert reason(0, 45, 53, jnp.float32)
        assert reason(37, 45, 0, jnp.float32)
        huge = reason(2**16, 2**15, 64, jnp.bfloat16)
        assert (huge is None) == (kernel == "tpu"), huge  # Triton's int32 offsets

    def test_tpu_refuses_precisions_mosaic_lacks(self):
        x = jnp.ones((16, 128), jnp.float32)
        weights = (x.T,) * self.N_WEIGHTS
        for ok in (None, "highest", jax.lax.Precision.DEFAULT):
            self.KERNELS["tpu"](x, *weights, activation="silu", precision=ok, interpret=True)
        for bad in (jax.lax.Precision.HIGH,
                    (jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT),
                    jax.lax.DotAlgorithmPreset.BF16_BF16_F32):
            with pytest.raises(NotImplementedError, match="precision"):
                self.KERNELS["tpu"](x, *weights, activation="silu", precision=bad,
                                    interpret=True)

    def test_tpu_bf16_rows_come_in_sixteens(self):
        x, w = jnp.ones((64, 256), jnp.bfloat16), jnp.ones((256, 256), jnp.bfloat16)
        with pytest.raises(ValueError, match="multiple of 16"):
            self.KERNELS["tpu"](x, *(w,) * self.N_WEIGHTS, activation="silu", interpret=True,
                                block_m=8)
        # 8-row tiles are fine in f32
        self.KERNELS["tpu"](x.astype(jnp.float32), *(w.astype(jnp.float32),) * self.N_WEIGHTS,
                            activation="silu", interpret=True, block_m=8)

    # -- lowering for the real backends (from this CPU machine) -----------------------------

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("kernel", BACKENDS)
    def test_lowers_every_activation(self, kernel, activation):
        # Exact gelu is the interesting one: erf on TPU, the in-kernel approximation on Triton.
        text = self.lower_kernel(kernel, 37, 45, 53, jnp.bfloat16, activation=activation,
                                 extras=True)
        assert count_kernel_calls(text, PLATFORM[kernel]) == 1

    @pytest.mark.parametrize("kernel", BACKENDS)
    def test_lowers_shapes_and_options(self, kernel, lowering_case):
        _, m, k, n, dtype, kwargs = lowering_case
        kwargs = dict(kwargs)
        if kwargs.pop("small", False):
            kwargs.update(SMALL_BLOCKS[kernel])
        text = self.lower_kernel(kernel, m, k, n, dtype, **kwargs)
        assert count_kernel_calls(text, PLATFORM[kernel]) == 1

    def test_triton_f16_lowers(self):
        text = self.lower_kernel("triton", 100, 200, 300, jnp.float16, activation="gelu")
        assert count_kernel_calls(text, "cuda") == 1

    @pytest.mark.parametrize("kernel", BACKENDS)
    def test_one_kernel_call_per_op(self, kernel):
        fn, platform = self.KERNELS[kernel], PLATFORM[kernel]
        x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
        w = jax.ShapeDtypeStruct((128, 128), jnp.float32)

        def two_ops(x, *ws):
            return fn(fn(x, *ws, activation="silu"), *ws, activation="gelu")

        weights = (w,) * self.N_WEIGHTS
        assert count_kernel_calls(lower_for(two_ops, x, *weights, platform=platform),
                                  platform) == 2
        plain = lower_for(self.unfused, x, *weights, platform=platform)
        assert count_kernel_calls(plain, platform) == 0
