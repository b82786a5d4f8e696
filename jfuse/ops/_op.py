"""A fused op, declared once: what it computes, what each platform refuses, how it differentiates.

In the spirit of tokamax's ``Op``: an op is a subclass of :class:`FusedOp` that says

* ``reference``: the XLA implementation (inside a rewrite, a replay of the user's equations);
* ``kernel``: the Pallas implementation for a backend (``"tpu"``: Mosaic, ``"triton"``: GPU);
* ``unsupported_reason``: why a platform's kernel cannot (or should not) serve a call, or None.
  The same answer serves dispatch (the kernel is not traced; XLA runs there) and the fusion
  report (the site says which platform runs XLA and why), so the two never disagree;
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


class FusedOp:
    """One fused op. Subclasses set ``name``, ``contracts_features`` and implement the methods
    below; :func:`apply` runs it. ``operands`` is always a tuple (entries may be None)."""

    name: str = ""
    # True for matmuls (their last operand dim is contracted), False for norms (normalized):
    # either way a kernel needs whole rows, which the sharding rules respect.
    contracts_features: bool = True

    def pattern(self, spec: OpSpec) -> str:
        """The report's name for a call (a norm with a residual is ``add_rms_norm``)."""
        return self.name

    def reference(self, spec: OpSpec, operands: tuple, full: bool) -> tuple:
        """The XLA implementation: the full outputs, or the user's outputs padded with None."""
        raise NotImplementedError

    def kernel(self, spec: OpSpec, operands: tuple, backend: str, interpret: bool,
               full: bool) -> tuple:
        """The Pallas implementation, same outputs as :meth:`reference`."""
        raise NotImplementedError

    def unsupported_reason(self, spec: OpSpec, platform: str, avals: Sequence[Any]) -> str | None:
        """Why ``platform``'s kernel ("tpu" or "cuda") will not serve operands of ``avals``."""
        return None

    def outputs(self, spec: OpSpec, full_outputs: tuple) -> Any:
        """The user's outputs from the full ones (by default the first)."""
        return full_outputs[0]

    def tangents(self, spec: OpSpec, operands: tuple, tangents: tuple, full_outputs: tuple) -> tuple:
        """Tangents of the full outputs, in plain primitives (zero tangents are None/symbolic)."""
        raise NotImplementedError

    def roles(self, spec: OpSpec, operands: tuple) -> tuple[str, ...]:
        """Each operand's role for the sharding rules (see :mod:`jfuse.ops._partitionable`)."""
        raise NotImplementedError

    # -- derived ----------------------------------------------------------------------------

    def refusals(self, spec: OpSpec, avals: Sequence[Any]) -> dict[str, str]:
        """Per lowering platform, why its kernel will not run this call (absent: it will)."""
        reasons = {platform: self.unsupported_reason(spec, platform, avals)
                   for platform in KERNEL_BACKENDS}
        return {platform: reason for platform, reason in reasons.items() if reason}


def _avals(operands: tuple) -> tuple:
    return tuple(None if o is None else jax.typeof(o) for o in operands)


def _traced_kernel(op: FusedOp, spec: OpSpec, backend: str, interpret: bool, full: bool):
    """The kernel as a function of the operands, refusing first, traced once per key."""
    platform = {backend_: platform for platform, backend_ in KERNEL_BACKENDS.items()}[backend]

    def run(*operands):
        if not interpret:
            reason = op.unsupported_reason(spec, platform, _avals(operands))
            if reason:
                raise NotImplementedError(reason)
        key = (op.name, backend, interpret, full, spec.trace_key())
        return cached_trace(
            key, lambda *o: tuple(op.kernel(spec, o, backend, interpret, full)), *operands)

    return run


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
    ))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _full(op: FusedOp, spec: OpSpec, operands: tuple) -> tuple:
    return _forward(op, spec, operands, full=True)


def _full_jvp(op: FusedOp, spec: OpSpec, primals, tangents):
    (operands,), (d_operands,) = primals, tangents
    if isinstance(d_operands, SymbolicZero):
        d_operands = (None,) * len(operands)
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
