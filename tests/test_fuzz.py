"""Differential fuzzer: random programs built from every pattern's variants and near-misses (as is,
inside ``jax.checkpoint``, or as a ``lax.scan`` body), on well- and ill-conditioned inputs
(near-constant rows, all-zero padding rows, saturated activations, large magnitudes; f32, bf16 and
mixed bf16/f32), run under jax.jit and under jfuse. Forward results must be identical (on CPU the
fused ops replay the user's equations); f32 gradients must agree with jax.jit's within rounding;
and the accuracy rule holds: against the same program in float64, jfuse's gradients are no
further off than jax.jit's, beyond a small floor of the activations' dtype.

Budget: ``JFUSE_FUZZ_EXAMPLES`` examples (default 12, CI-sized). The long run
(``test_long_run``, a slow case: ``JFUSE_SLOW=1``) draws ``JFUSE_FUZZ_LONG_EXAMPLES`` (default 500).
Every failure it finds becomes a named regression test in this file.
"""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import jfuse

from conftest import tolerance

EXAMPLES = int(os.environ.get("JFUSE_FUZZ_EXAMPLES", "12"))

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
        # As Flax: statistics in at least f32 (so the float64 reference stays float64).
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32)) if upcast else x
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


# How the input is drawn: well-conditioned, or as real models meet trouble.
CONDITIONS = ["normal", "normal", "near-constant rows", "zero padding rows", "saturated", "large"]


def _input(rng, shape, condition):
    x = rng.standard_normal(shape)
    rows = x.reshape(-1, shape[-1])  # a view: edits land in x
    if condition == "near-constant rows":  # variance about a norm's eps: one-pass stats cancel
        rows[::2] = rng.uniform(-3, 3, (len(rows[::2]), 1)) + 1e-3 * rng.standard_normal(
            rows[::2].shape)
    elif condition == "zero padding rows":
        rows[len(rows) // 2:] = 0.0
    elif condition == "saturated":  # tanh/sigmoid/GELU far in their tails
        x = 30.0 * x
    elif condition == "large":
        x = 1e3 * x
    return x


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
    condition = draw(st.sampled_from(CONDITIONS))
    return d, lead, dtype, param_dtype, blocks, seed, wrapper, condition


def _program(blocks, dtype, wrapper):
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
        return jax.checkpoint(body)
    if wrapper == "scan":  # the blocks as the body of a 2-step scan, as layer stacks are written
        def program(params, x):
            return lax.scan(lambda h, _: (body(params, h)[0], None), x, None, length=2)[0]

        return program
    return body


def _build(d, lead, dtype, param_dtype, blocks, seed, wrapper, condition="normal"):
    rng = np.random.default_rng(seed)
    params = [make(rng, param_dtype) for _, _, make in blocks]
    x = jnp.asarray(_input(rng, lead + (d,), condition), dtype)
    return _program(blocks, dtype, wrapper), params, x


def _loss(f, cot):
    return lambda *a: sum(jnp.sum(o.astype(c.dtype) * c)
                          for o, c in zip(jax.tree.leaves(f(*a)), jax.tree.leaves(cot)))


# The accuracy rule's floor, in eps of the activations' dtype times the gradient's scale (at least
# the cotangents' scale, 1): two correct computations of one gradient in that dtype round
# differently, and a gradient that is exactly 0 in float64 (saturated activations) can come out
# as the rounding of O(1) terms (see assert_accurate_as_jax_jit). The scale is the larger of the
# reference's and jax.jit's: where jax.jit's own bf16 gradient is far off (14.6 against a
# reference of 0.3, found by the long run), its values, not the reference's, set the rounding.
FLOOR_EPS = 4


def _draw(program, params, x):
    """``(params, x, jfuse's grads, jax.jit's grads, cotangents)`` of ``sum(program · cot)``
    with fixed f32 cotangents ``cos(0, 1, 2, ...)`` per output."""
    cot = jax.tree.map(lambda o: jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape)),
                       jax.eval_shape(program, params, x))
    got = jax.jit(jax.grad(_loss(jfuse.fuse(program), cot), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(_loss(program, cot), argnums=(0, 1)))(params, x)
    return params, x, got, want, cot


def _accuracy_errors(blocks, dtype, wrapper, draws):
    """Per draw ``(params, x, jfuse's grads, jax.jit's grads, cotangents)``, per gradient leaf:
    ``(path, jfuse's error, jax.jit's error, floor)`` against the same program in float64 (same
    rounded inputs, every dtype float64). The floor is ``FLOOR_EPS`` eps of the activations' dtype
    times the largest magnitude of the reference's or jax.jit's gradient (at least 1, the scale of
    the cotangents). All references are computed in one float64 session."""
    eps = float(jnp.finfo(dtype).eps)
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), t)
        reference = _program(blocks, jnp.float64, wrapper)
        grad = lambda cot: jax.jit(jax.grad(_loss(reference, f64(cot)), argnums=(0, 1)))
        wants = [jax.tree.map(np.asarray, grad(cot)(f64(params), f64(x)))
                 for params, x, _, _, cot in draws]
    errors = []
    for want, (_, _, grads_fused, grads_plain, _) in zip(wants, draws):
        leaves = []
        paths = jax.tree_util.tree_leaves_with_path(want)
        for (path, r), g, u in zip(paths, jax.tree.leaves(grads_fused), jax.tree.leaves(grads_plain)):
            g, u = np.asarray(g, np.float64), np.asarray(u, np.float64)
            scale = max(np.max(np.abs(r)), np.max(np.abs(u)), 1.0)
            leaves.append((jax.tree_util.keystr(path), float(np.max(np.abs(g - r))),
                           float(np.max(np.abs(u - r))), FLOOR_EPS * eps * scale))
        errors.append(leaves)
    return errors


class AccuracyLoss(AssertionError):
    """A miss no second look may excuse: non-finite, or far beyond jax.jit's error."""


def assert_accurate_as_jax_jit(blocks, dtype, wrapper, params, x, grads_fused, grads_plain, cot):
    """The accuracy rule on one draw: each gradient of jfuse is no further off the float64
    reference than jax.jit's, beyond the floor (see :func:`_accuracy_errors`). Raises
    :class:`AccuracyLoss` where jfuse's error is non-finite and jax.jit's is not, or beyond
    ``FIRST_LOOK_LIMIT`` times jax.jit's plus the floor."""
    [leaves] = _accuracy_errors(blocks, dtype, wrapper, [(params, x, grads_fused, grads_plain, cot)])
    for path, err_fused, err_plain, floor in leaves:
        message = (f"gradient {path}: jfuse is {err_fused:.3g} off the float64 reference, jax.jit "
                   f"{err_plain:.3g} (floor {floor:.3g})")
        if (not np.isfinite(err_fused) and np.isfinite(err_plain)) or (
                err_fused > FIRST_LOOK_LIMIT * err_plain + floor):
            raise AccuracyLoss(message)
        assert err_fused <= err_plain + floor, message


# The second look. Where a gradient is ill-conditioned (a one-pass variance over two elements,
# found by the long run), jax.jit's own error on one draw is many eps, and jfuse's, rounded in
# another order (the fused norm returns the residual sum and accumulates its cotangents itself),
# is as often larger as smaller: on 30 draws of that program jfuse was worse on 86 gradient
# leaves, better on 84, equal on 70, with the same total error (0.3780 against 0.3784). One draw
# cannot tell that noise from a systematic loss; the sum over several can: over 8 draws the ratio
# of summed errors stayed within 1.14 for that program, while every systematic loss found so far
# (2-7x, 11x jax.jit's error) is far outside ``SECOND_LOOK_RATIO``.
SECOND_LOOK_DRAWS = 8
SECOND_LOOK_RATIO = 1.25
# A first draw this far beyond jax.jit's error (or non-finite where jax.jit's is finite) is a
# loss outright: rounding order stayed within 2.3x on the 240 leaves above.
FIRST_LOOK_LIMIT = 3.0


def assert_accurate_on_average(program_spec, first_draw, draws: int = SECOND_LOOK_DRAWS):
    """The accuracy rule over ``first_draw`` (the draw that failed the first look) and ``draws``
    fresh inputs of the same program: per gradient leaf, the sum of jfuse's errors is at most
    ``SECOND_LOOK_RATIO`` times jax.jit's plus the floors."""
    d, lead, dtype, param_dtype, blocks, seed, wrapper, condition = program_spec
    runs = [first_draw]
    for k in range(1, draws + 1):
        runs.append(_draw(*_build(d, lead, dtype, param_dtype, blocks, seed + k, wrapper,
                                  condition)))
    assert_sums_within_ratio(_accuracy_errors(blocks, dtype, wrapper, runs))


def assert_sums_within_ratio(per_draw):
    """Per gradient leaf, over the draws of :func:`_accuracy_errors`: the sum of jfuse's errors
    is at most ``SECOND_LOOK_RATIO`` times jax.jit's plus the floors."""
    for leaf, (path, *_) in enumerate(per_draw[0]):
        fused, plain, floor = (sum(leaves[leaf][i] for leaves in per_draw) for i in (1, 2, 3))
        assert fused <= SECOND_LOOK_RATIO * plain + floor, (
            f"gradient {path} over {len(per_draw)} draws: jfuse's errors sum to {fused:.3g}, "
            f"jax.jit's to {plain:.3g} (floors {floor:.3g})")


def check_program(program_spec):
    d, lead, dtype, param_dtype, blocks, seed, wrapper, condition = program_spec
    program, params, x = _build(*program_spec)
    description = (f"{wrapper}: " + " -> ".join(name for name, _, _ in blocks)
                   + f" on {condition} ({np.dtype(dtype).name} activations, "
                   f"{np.dtype(param_dtype).name} params, lead={lead}, d={d}, seed={seed})")
    report = jfuse.explain(program)(params, x)
    assert not report.fallbacks, f"{description}\n{report}"
    try:
        fused = jfuse.jit(program)(params, x)
        chex.assert_trees_all_equal(fused, jax.jit(program)(params, x))
        draw = _draw(program, params, x)
        _, _, got, want, cot = draw
        try:
            if np.dtype(dtype) == np.float32 and condition == "normal":
                # Close to jax.jit's where the program is well conditioned; where it is not
                # (a one-pass variance), rounding order alone can exceed this, and the second
                # look decides, as for the accuracy rule.
                chex.assert_trees_all_close(got, want, **tolerance(dtype))
            assert_accurate_as_jax_jit(blocks, dtype, wrapper, params, x, got, want, cot)
        except AccuracyLoss:
            raise
        except AssertionError as first_look:  # noise or a loss? the sum over more draws decides
            try:
                assert_accurate_on_average(program_spec, draw)
            except AssertionError as second_look:
                raise second_look from first_look
    except AssertionError as error:
        raise AssertionError(f"{description}\n{report}") from error


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 50,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs())
def test_random_programs_never_change_the_answer(program_spec):
    check_program(program_spec)


LONG_EXAMPLES = int(os.environ.get("JFUSE_FUZZ_LONG_EXAMPLES", "500"))


@pytest.mark.slow
@settings(max_examples=LONG_EXAMPLES if os.environ.get("JFUSE_SLOW") == "1" else 3,
          deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs())
def test_long_run(program_spec):
    """The same checks on many more programs (random each run): ``JFUSE_SLOW=1`` draws
    ``JFUSE_FUZZ_LONG_EXAMPLES``; sampled into a default run, a token three."""
    check_program(program_spec)


# --- regression tests: every failure the fuzzer found, by name ---------------------------------


def _drawn(*values):
    """A ``draw`` that returns ``values`` in order: a program spec written out by hand."""
    it = iter(values)
    return lambda _strategy: next(it)


def test_scan_glu_then_gelu_exact_linear_on_large_inputs():
    """Found by the long run on jax 0.10 (a weight gradient 5e-4 off where float64 and jax.jit
    give 0): the same ``1 + erf`` cancellation, fixed by the erfc-based derivative."""
    d = 8
    blocks = [_glu_block(_drawn("silu", "separate", "other input"), d),
              _linear_block(_drawn("gelu_exact", "vector", False, False), d)]
    check_program((d, (1, 5), jnp.float32, jnp.float32, blocks, 44144, "scan", "large"))


def test_bf16_glu_near_miss_on_large_inputs_rounds_like_jax_jit():
    """Found by the long run: on 1e3-scale bf16 inputs the saturated tanh after ``y @ wd`` makes
    jax.jit's ``wd`` gradient 14.6 off a float64 reference of 0.3, and jfuse's 14.7: one bf16
    ulp (0.0625) of those values apart. The floor scales with the values rounded."""
    d = 5
    blocks = [_glu_block(_drawn("sin (not an activation)", "up first", "other input"), d),
              _linear_block(_drawn("relu", "vector", True, False), d),
              _norm_block(_drawn("rms x/sqrt", "add", -1, True), d)]
    check_program((d, (4,), jnp.bfloat16, jnp.bfloat16, blocks, 9805, "none", "large"))


@pytest.mark.xfail(
    jax.__version_info__[:3] == (0, 10, 0), strict=True,  # passes on 0.10.2 and 0.12
    reason="found by the long run; on jax 0.12 the erfc-based GELU derivative fixed it, on jax 0.10 "
           "jfuse's fused-weight gradient is still 2.7e-5 off float64 where jax.jit's is 2.4e-6 "
           "(not yet explained)")
def test_sliced_glu_with_exact_gelu_gate_on_saturated_inputs():
    """Saturated f32 gates: ``1 + erf(z/√2)`` cancelled in the exact-GELU derivative (an f32 eps
    where the CDF is tiny), 11x jax.jit's error; the derivative now uses erfc, as jax.nn does."""
    d = 3
    blocks = [_glu_block(_drawn("gelu_exact", "slice", "none"), d),
              _linear_block(_drawn("none", "none", False, False), d),
              _glu_block(_drawn("relu", "separate", "none"), d)]
    check_program((d, (4,), jnp.float32, jnp.float32, blocks, 149, "none", "saturated"))


@pytest.mark.slow  # 45 s on jax 0.10: the second look runs nine draws
@pytest.mark.xfail(
    jax.__version_info__ < (0, 11), strict=True,  # fails on 0.10.0 and 0.10.2
    reason="found by the long run on jax 0.10 (passes on 0.12): the same saturated exact-GELU "
           "loss as above, through the linear op; over 9 draws the weight gradient's error sums "
           "to 110 against jax.jit's 61.4 (not yet explained)")
def test_linear_with_exact_gelu_on_saturated_bf16_activations():
    d = 37
    blocks = [_linear_block(_drawn("gelu_exact", "full", True, True), d),
              _linear_block(_drawn("gelu_exact", "none", True, False), d),
              _glu_block(_drawn("relu", "separate", "none"), d)]
    check_program((d, (4,), jnp.bfloat16, jnp.float32, blocks, 768, "scan", "saturated"))


@pytest.mark.slow  # the second look runs nine draws
def test_one_pass_variance_with_the_sum_reused_rounds_like_jax_jit():
    """Found by a long run on jax 0.12: ``E[x²]−E[x]²`` LayerNorm after a residual add whose sum
    is reused, in a scan. One weight-gradient element differed from jax.jit's by 2e-4 relative
    (the f32 closeness check allows 2e-5), and the bias gradient was 1.8e-5 off float64 against
    jax.jit's 9.5e-6: the one-pass variance amplifies rounding order. Over nine draws jfuse's
    errors are within the accuracy rule, so it passes on the second look, of which the
    closeness check is now a part (the same code failed it at the start of the session too)."""
    d = 16
    blocks = [_norm_block(_drawn("layer E[x2]-E[x]2", "add, sum reused", -1, True), d),
              _norm_block(_drawn("rms x/sqrt", "add", -1, False), d),
              _glu_block(_drawn("sin (not an activation)", "slice", "other input"), d)]
    spec = (d, (7,), jnp.float32, jnp.float32, blocks, 856, "scan", "normal")
    if jax.__version_info__ >= (0, 11):  # on jax 0.10 this draw rounds as jax.jit's does
        _, _, got, want, _ = _draw(*_build(*spec))
        with pytest.raises(AssertionError):  # refused by the closeness check on one draw
            chex.assert_trees_all_close(got, want, **tolerance(jnp.float32))
    check_program(spec)


def test_one_pass_variance_over_two_elements_rounds_like_jax_jit():
    """Found by the long run: a LayerNorm written as ``E[x²]−E[x]²`` over an axis of two elements
    (axis 0, moved last), fused with the residual add before it. One draw's ``x`` gradient was
    2.86e-6 off float64 against jax.jit's 1.79e-6 (floor 5.9e-7): rounding order, not a loss (see
    the second look above), so the sum over more draws passes."""
    d = 3
    blocks = [_glu_block(_drawn("relu", "separate", "none"), d),
              _norm_block(_drawn("layer E[x2]-E[x]2", "none", 0, False), d),
              _glu_block(_drawn("relu", "split", "none"), d)]
    spec = (d, (2, 3), jnp.float32, jnp.float32, blocks, 0, "none", "normal")
    params, x, got, want, cot = _draw(*_build(*spec))
    with pytest.raises(AssertionError, match="gradient") as first_look:  # refused on one draw
        assert_accurate_as_jax_jit(blocks, jnp.float32, "none", params, x, got, want, cot)
    assert not isinstance(first_look.value, AccuracyLoss)  # but within the first-look limit
    check_program(spec)


def test_second_look_refuses_a_systematic_loss():
    """The second look passes symmetric rounding noise and refuses a gradient that is
    consistently further off than jax.jit's (1.5x on every draw), however small."""
    rng = np.random.default_rng(0)
    plain = rng.uniform(1e-6, 2e-6, size=8)
    noise = [[("[1]", p * f, p, 1e-9)] for p, f in zip(plain, rng.permutation(
        [0.6, 0.8, 1.0, 1.2, 1.4, 1.0, 0.9, 1.1]))]
    assert_sums_within_ratio(noise)
    loss = [[("[1]", 1.5 * p, p, 1e-9)] for p in plain]
    with pytest.raises(AssertionError, match="over 8 draws"):
        assert_sums_within_ratio(loss)


def test_first_look_refuses_outright_what_no_rounding_order_explains():
    """Non-finite where jax.jit is finite, or beyond ``FIRST_LOOK_LIMIT`` x jax.jit's error: a
    loss on that draw, whatever fresh draws would say."""
    d = 3
    blocks = [_linear_block(_drawn("relu", "vector", False, False), d)]
    program, params, x = _build(d, (4,), jnp.float32, jnp.float32, blocks, 0, "none", "normal")
    cot = jax.tree.map(lambda o: jnp.ones(o.shape, jnp.float32), jax.eval_shape(program, params, x))
    want = jax.jit(jax.grad(_loss(program, cot), argnums=(0, 1)))(params, x)
    far = jax.tree.map(lambda g: g + 1e-3, want)  # 1e-3 where jax.jit is within ~1e-7
    with pytest.raises(AccuracyLoss):
        assert_accurate_as_jax_jit(blocks, jnp.float32, "none", params, x, far, want, cot)
    nan = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), want)
    with pytest.raises(AccuracyLoss):
        assert_accurate_as_jax_jit(blocks, jnp.float32, "none", params, x, nan, want, cot)
