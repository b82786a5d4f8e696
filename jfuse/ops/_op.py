"""A fused op, declared once: what it computes, what each platform refuses, how it differentiates.

In the spirit of tokamax's ``Op``: an op is a subclass of :class:`FusedOp` that says

* ``reference``: the XLA implementation (inside a rewrite, a replay of the user's equations);
* ``kernel``: the Pallas implementation for a backend (``"tpu"``: Mosaic, ``"triton"``: GPU);
* ``unsupported_reason``: why a platform's kernel cannot serve a call, or None; and
  ``unprofitable_reason``: why it should not (it is expected to lose to XLA there), which only
  ``implementation=None`` heeds. The same answers serve dispatch (the kernel is not traced; XLA
  runs there) and the fusion report (the site says which platform runs XLA and why), so the two
  never disagree; ``kernel_name``, where an op has several kernels on one platform and picks
  one per call (attention on GPU: cuDNN or Triton), says which for the report;
* ``tangents``: the derivative, in plain JAX primitives, from the operands and the forward's
  *full* outputs (the user's outputs plus what the derivative needs: a pre-activation, the GLU
  products, a norm's statistics);
* ``roles``: what each operand is to the sharding rules (rows, a weight, a feature vector).

The wiring is shared (:func:`apply`): two nested ``jax.custom_jvp``\\ s, a *lean* one that writes
only the user's outputs when nothing differentiates the op, whose JVP calls a *full* one, so
derivatives of any order never differentiate a kernel; dispatch per platform; one kernel trace per
(op, spec, backend, operand types), keyed by :meth:`OpSpec.trace_key`.

A spec is a frozen dataclass of everything about a call that is not an array. Its fields are the
trace key unless marked ``not_in_key`` (the implementation choice and the replay are not part of
what the kernel computes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jfuse.ops._dispatch import OpCall, cached_trace, dispatch

# Lowering platforms whose kernels a report describes, and the kernel backend each one runs.
KERNEL_BACKENDS = {"tpu": "tpu", "cuda": "triton"}


def not_in_key(default: Any = None) -> Any:
    """A spec field that does not change what the kernel computes (left out of the trace key)."""
    return dataclasses.field(default=default, metadata={"trace_key": False})


@dataclasses.dataclass(frozen=True, eq=False)
class OpSpec:
    """Base of every op's spec. ``replay`` is the user's own equations (the XLA implementation
    inside a rewrite, so CPU answers are bit-for-bit jax.jit's); ``implementation`` as for the
    public ops (None, "xla", "pallas", "interpret")."""

    implementation: str | None = not_in_key()
    replay: Callable[..., Any] | None = not_in_key()

    def trace_key(self) -> tuple:
        """The fields that define the kernel, as a hashable tuple (dtypes by name)."""
        return tuple(
            (f.name, str(v) if isinstance(v, (np.dtype, type)) or hasattr(v, "dtype") else v)
            for f in dataclasses.fields(self)
            if f.metadata.get("trace_key", True)
            for v in [getattr(self, f.name)]
        )

    def generic(self) -> "OpSpec":
        """The spec without the replay: the XLA implementation for any shapes (one shard's)."""
        return dataclasses.replace(self, replay=None)


def is_zero(tangent: Any) -> bool:
    """True for a tangent that is known to be zero (absent, or JAX's symbolic zero)."""
    return tangent is None or isinstance(tangent, SymbolicZero)


def as_vector(v: Any, n: int) -> Any:
    """A per-feature operand as ``(n,)``: the rewrite may pass ``(1, n)``, ``(1, 1, n)`` or a
    scalar broadcast to every feature. None stays None."""
    if v is None:
        return None
    return jnp.broadcast_to(jnp.reshape(v, (-1,)), (n,)) if v.size == 1 else jnp.reshape(v, (n,))


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """How to measure one public op, declared beside it: ``benchmarks/ops.py`` times every
    declaration against the op's XLA implementation and the tests enumerate them.

    ``inputs(shape, dtype, normal)`` builds the arguments (``normal(shape, scale)`` draws a
    random array in ``dtype``); ``call(implementation, variant)`` is the op as a function of them;
    ``flops(shape, variant)`` is the forward's matmul work (0 for a memory-bound op: bytes moved
    are counted from the shapes); ``sizes`` maps a preset (``quick``, ``cpu``, ``accelerator``,
    ``device``) to ``(shape, variant)`` pairs, the variant being e.g. an activation.
    """

    name: str  # the report's pattern name: "linear", "add_rms_norm", ...
    dims: str  # what ``shape`` means, e.g. "(M, K, N)"
    inputs: Callable[[tuple, Any, Callable], tuple]
    call: Callable[[str | None, str | None], Callable[..., Any]]
    sizes: dict[str, tuple[tuple[tuple, str | None], ...]]
    flops: Callable[[tuple, str | None], float] = lambda shape, variant: 0.0
    # Variants timed only in some dtypes (a baseline that refuses the others, e.g. cuDNN's f32).
    variant_dtypes: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # False for an op with no Pallas kernel (XLA everywhere): a kernel check has nothing to time.
    has_kernel: bool = True

    def times(self, variant: str | None, dtype: str) -> bool:
        """Whether ``variant`` is timed in ``dtype`` (every dtype unless restricted)."""
        return dtype in self.variant_dtypes.get(variant, (dtype,))

    @property
    def bound(self) -> str:
        """What limits the op on a chip: ``compute`` (matmul work declared) or ``memory``."""
        shape, variant = next(iter(self.sizes.values()))[0]
        return "compute" if self.flops(shape, variant) else "memory"


def matmul_benchmark(name: str, products: int, inputs: Callable, call: Callable,
                     sizes: dict) -> Benchmark:
    """The declaration of a matmul-shaped op: shapes ``(M, K, N)``, ``products`` GEMMs of
    ``2·M·K·N`` flops each in the forward."""
    return Benchmark(name=name, dims="(M, K, N)", inputs=inputs, call=call, sizes=sizes,
                     flops=lambda shape, variant: 2.0 * products * math.prod(shape))


class FusedOp:
    """One fused op. Subclasses set ``name``, ``contracts_features`` and implement the methods
    below; :func:`apply` runs it. ``operands`` is always a tuple (entries may be None)."""

    name: str = ""
    # True for matmuls (their last operand dim is contracted), False for norms (normalized):
    # either way a kernel needs whole rows, which the sharding rules respect.
    contracts_features: bool = True
    # How a call is laid out per shard on a mesh: None for the rows x features rule
    # (jfuse.sharding.rules.plan), which serves operands whose roles it knows (rows, weights,
    # biases, feature vectors: see :meth:`roles`); an op whose operands play other roles gives its
    # own ``(call, operand specs, output avals, mesh) -> Layout | reason``.
    layout_rule: Callable[..., Any] | None = None

    def layout_rule_for(self, spec: OpSpec) -> Callable[..., Any] | None:
        """The layout rule of one call (default: :attr:`layout_rule`). An op whose per-shard
        program depends on its spec (the LM-head loss builds its collectives from it) binds the
        spec here."""
        return self.layout_rule

    def pattern(self, spec: OpSpec) -> str:
        """The report's name for a call (a norm with a residual is ``add_rms_norm``)."""
        return self.name

    def reference(self, spec: OpSpec, operands: tuple, full: bool) -> tuple:
        """The XLA implementation: the full outputs, or the user's outputs padded with None."""
        raise NotImplementedError

    def kernel(self, spec: OpSpec, inputs: tuple, backend: str, interpret: bool,
               full: bool) -> tuple:
        """The Pallas implementation on :meth:`kernel_inputs`, same outputs as :meth:`reference`."""
        raise NotImplementedError

    def kernel_inputs(self, spec: OpSpec, operands: tuple) -> tuple:
        """The arrays the kernel is traced on (default: the operands). An op that selects its
        kernel's inputs from the operands (a GLU slicing a fused weight) does it here, so the
        kernel trace is shared by every call with the same spec and input types."""
        return operands

    def unsupported_reason(self, spec: OpSpec, platform: str, avals: Sequence[Any]) -> str | None:
        """Why ``platform``'s kernel ("tpu" or "cuda") cannot serve kernel inputs of ``avals``
        (see :meth:`kernel_inputs`), or None."""
        return None

    def unprofitable_reason(self, spec: OpSpec, platform: str,
                            avals: Sequence[Any]) -> str | None:
        """Why ``platform``'s kernel is expected to lose to XLA here (heeded only when the
        implementation is left to jfuse, ``implementation=None``), or None."""
        return None

    def kernel_name(self, spec: OpSpec, platform: str, avals: Sequence[Any]) -> str | None:
        """Which of ``platform``'s kernels serves kernel inputs of ``avals``, for an op that picks
        one of several per call (the choice :meth:`kernel` makes, by the same rule); None for an
        op with one kernel per platform, or none serving."""
        return None

    def outputs(self, spec: OpSpec, full_outputs: tuple) -> Any:
        """The user's outputs from the full ones (by default the first)."""
        return full_outputs[0]

    def tangents(self, spec: OpSpec, operands: tuple, tangents: tuple, full_outputs: tuple) -> tuple:
        """Tangents of the full outputs, in plain primitives (zero tangents are None/symbolic)."""
        raise NotImplementedError

    def primal_and_tangents(self, spec: OpSpec, operands: tuple,
                            tangents: tuple) -> tuple[tuple, tuple] | None:
        """(full outputs, their tangents) computed together, for an op whose derivative
        evaluates its forward anyway where the forward is XLA's (a norm differentiating the
        user's equations), so the program does not compute the forward twice; None (the
        default) computes the forward and :meth:`tangents` apart."""
        return None

    def roles(self, spec: OpSpec, operands: tuple) -> tuple[str, ...]:
        """Each operand's role for the sharding rules (see :mod:`jfuse.ops._partitionable`)."""
        raise NotImplementedError

    # -- derived ----------------------------------------------------------------------------

    def refusal(self, spec: OpSpec, platform: str, kernel_avals: Sequence[Any]) -> str | None:
        """Why ``platform`` runs XLA for this call under ``spec.implementation``, or None."""
        reason = self.unsupported_reason(spec, platform, kernel_avals)
        if reason is None and spec.implementation is None:
            reason = self.unprofitable_reason(spec, platform, kernel_avals)
        return reason

    def _kernel_avals(self, spec: OpSpec, operand_avals: Sequence[Any]) -> Sequence[Any]:
        if type(self).kernel_inputs is FusedOp.kernel_inputs:
            return operand_avals
        structs = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)
                   for a in operand_avals]
        return jax.eval_shape(lambda *o: self.kernel_inputs(spec, o), *structs)

    def refusals(self, spec: OpSpec, operand_avals: Sequence[Any]) -> dict[str, str]:
        """Per lowering platform, why its kernel will not run this call (absent: it will): what
        the fusion report says, from the rules dispatch applies."""
        avals = self._kernel_avals(spec, operand_avals)
        reasons = {platform: self.refusal(spec, platform, avals) for platform in KERNEL_BACKENDS}
        return {platform: reason for platform, reason in reasons.items() if reason}

    def kernel_names(self, spec: OpSpec, operand_avals: Sequence[Any]) -> dict[str, str]:
        """Per lowering platform whose kernel runs this call, which kernel, where the op names
        it (:meth:`kernel_name`); what the fusion report prints beside the site."""
        avals = self._kernel_avals(spec, operand_avals)
        names = {platform: self.kernel_name(spec, platform, avals)
                 for platform in KERNEL_BACKENDS if self.refusal(spec, platform, avals) is None}
        return {platform: name for platform, name in names.items() if name}


def _avals(operands: tuple) -> tuple:
    return tuple(None if o is None else jax.typeof(o) for o in operands)


def _traced_kernel(op: FusedOp, spec: OpSpec, backend: str, interpret: bool, full: bool):
    """The kernel as a function of the operands, refusing first, traced once per key."""
    platform = {backend_: platform for platform, backend_ in KERNEL_BACKENDS.items()}[backend]

    def run(*operands):
        inputs = op.kernel_inputs(spec, operands)
        # In interpret mode the kernels check what they can serve themselves (no platform's
        # compiler is involved, and no profitability applies).
        reason = None if interpret else op.refusal(spec, platform, _avals(inputs))
        if reason:
            raise NotImplementedError(reason)
        key = (op.name, backend, interpret, full, spec.trace_key())
        return cached_trace(
            key, lambda *i: tuple(op.kernel(spec, i, backend, interpret, full)), *inputs)

    return run


def _internal(fn: Callable) -> Callable:
    """``fn`` traced under jfuse's own numpy settings: an op's internals broadcast feature
    vectors against rows by rank promotion, which a user's ``jax_numpy_rank_promotion="raise"``
    (Haiku users set it) must not turn into an error inside jfuse."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with jax.numpy_rank_promotion("allow"):
            return fn(*args, **kwargs)

    return run


@_internal
def _forward(op: FusedOp, spec: OpSpec, operands: tuple, full: bool) -> tuple:
    def reference_with(spec_):
        return lambda *o: tuple(op.reference(spec_, o, full))

    return dispatch(spec.implementation, OpCall(
        pattern=op.pattern(spec),
        operands=operands,
        roles=op.roles(spec, operands),
        contracts_features=op.contracts_features,
        reference=reference_with(spec),
        # The replay is written for the global shapes; one shard runs the generic reference.
        local_reference=reference_with(spec.generic()),
        kernel=lambda backend, interpret: _traced_kernel(op, spec, backend, interpret, full),
        layout_rule=op.layout_rule_for(spec),
    ))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _full(op: FusedOp, spec: OpSpec, operands: tuple) -> tuple:
    return _forward(op, spec, operands, full=True)


@_internal
def _full_jvp(op: FusedOp, spec: OpSpec, primals, tangents):
    (operands,), (d_operands,) = primals, tangents
    if isinstance(d_operands, SymbolicZero):
        d_operands = (None,) * len(operands)
    joint = op.primal_and_tangents(spec, operands, tuple(d_operands))
    if joint is not None:
        full, d_full = joint
        return tuple(full), tuple(d_full)
    full = _full(op, spec, operands)
    return full, tuple(op.tangents(spec, operands, tuple(d_operands), full))


_full.defjvp(_full_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _lean(op: FusedOp, spec: OpSpec, operands: tuple) -> Any:
    return op.outputs(spec, _forward(op, spec, operands, full=False))


def _lean_jvp(op: FusedOp, spec: OpSpec, primals, tangents):
    full, d_full = _full_jvp(op, spec, primals, tangents)
    return op.outputs(spec, full), op.outputs(spec, d_full)


_lean.defjvp(_lean_jvp, symbolic_zeros=True)


def apply(op: FusedOp, spec: OpSpec, *operands: Any) -> Any:
    """Run ``op``: the user's outputs, differentiable to any order (see the module docstring)."""
    return _lean(op, spec, tuple(operands))
