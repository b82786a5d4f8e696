"""Sharding propagation: from a jaxpr's input layouts to the layout of every value.

A forward walk, one rule per primitive, in the spirit of GSPMD's propagation but far smaller: it
only has to say how the operands of jfuse's fused ops are laid out. Elementwise ops keep the
layout, ``dot_general`` keeps batch and free dimensions (a split contraction becomes a partial
sum, which the output does not carry), reductions drop the reduced dimensions, reshapes keep a
split on the major dimension of a merged or split group, and ``with_sharding_constraint`` sets
the layout outright. Nested jaxprs (jit, scan, while, cond, checkpoint, custom_jvp) are walked
with their operands' layouts.

Where a rule does not know, the result is ``None`` and the partition rules decline: a wrong
guess would cost collectives, never correctness (a ``shard_map`` reshards what it is given), but
an unknown is reported rather than guessed.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from jfuse._jax import compat
from jfuse._jax import jaxpr as jx
from jfuse.sharding.specs import MaybeSpec, from_partition_spec, replicated, without_repeats

Rule = Callable[[jx.JaxprEqn, Sequence[MaybeSpec]], "list[MaybeSpec] | MaybeSpec"]


def _shape(atom) -> tuple[int, ...]:
    return tuple(getattr(atom.aval, "shape", ()))


def _elementwise(eqn, specs):
    shape = _shape(eqn.outvars[0])
    merged = [()] * len(shape)
    for atom, spec in zip(eqn.invars, specs):
        if len(_shape(atom)) != len(shape):
            continue  # a scalar operand
        if spec is None:
            return None
        merged = [m or s for m, s in zip(merged, spec)]
    return without_repeats(merged)


def _broadcast_in_dim(eqn, specs):
    (spec, *_), operand = specs, eqn.invars[0]
    if spec is None:
        return None
    out_shape = _shape(eqn.outvars[0])
    dims = [()] * len(out_shape)
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if _shape(operand)[i] == out_shape[d]:
            dims[d] = spec[i]
    return tuple(dims)


def _reshape_groups(old: Sequence[int], new: Sequence[int]):
    """Pairs (old dims, new dims) whose sizes multiply to the same number, in order. Size-1
    dims belong to no group (they cannot be split)."""
    old_dims = [d for d, n in enumerate(old) if n != 1]
    new_dims = [d for d, n in enumerate(new) if n != 1]
    groups, i, j = [], 0, 0
    while i < len(old_dims) and j < len(new_dims):
        gi, gj = [old_dims[i]], [new_dims[j]]
        pi, pj = old[old_dims[i]], new[new_dims[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(old_dims):
                gi.append(old_dims[i])
                pi *= old[old_dims[i]]
                i += 1
            elif pj < pi and j < len(new_dims):
                gj.append(new_dims[j])
                pj *= new[new_dims[j]]
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups if i == len(old_dims) and j == len(new_dims) else None


def _reshape(eqn, specs):
    spec = specs[0]
    if spec is None:
        return None
    old, new = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    groups = _reshape_groups(old, new)
    if groups is None:
        return None
    dims = [()] * len(new)
    for gi, gj in groups:
        split = [i for i in gi if spec[i]]
        if not split:
            continue
        # Only a split on the group's major dimension stays a contiguous block per device.
        if split != [gi[0]]:
            return None
        dims[gj[0]] = spec[gi[0]]
    return tuple(dims)


def _transpose(eqn, specs):
    spec = specs[0]
    return None if spec is None else tuple(spec[p] for p in eqn.params["permutation"])


def _dot_general(eqn, specs):
    lhs, rhs = specs
    if lhs is None or rhs is None:
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_free = [d for d in range(len(lhs)) if d not in lc and d not in lb]
    rhs_free = [d for d in range(len(rhs)) if d not in rc and d not in rb]
    dims = [lhs[a] or rhs[b] for a, b in zip(lb, rb)]
    dims += [lhs[d] for d in lhs_free] + [rhs[d] for d in rhs_free]
    return without_repeats(dims)


def _reduce(eqn, specs):
    spec = specs[0]
    if spec is None:
        return None
    axes = set(eqn.params.get("axes", ()))
    return tuple(s for d, s in enumerate(spec) if d not in axes)


def _squeeze(eqn, specs):
    spec = specs[0]
    if spec is None:
        return None
    drop = {d % len(spec) for d in eqn.params["dimensions"]}
    return tuple(s for d, s in enumerate(spec) if d not in drop)


def _cumulative(eqn, specs):
    spec = specs[0]
    if spec is None:
        return None
    axis = eqn.params["axis"]
    return tuple(() if d == axis else s for d, s in enumerate(spec))


def _slice_like(eqn, specs):
    """Slices keep the layout of the dimensions they take whole."""
    spec = specs[0]
    if spec is None:
        return None
    old, new = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    if len(old) != len(new):
        return None
    return tuple(s if o == n else () for s, o, n in zip(spec, old, new))


def _concatenate(eqn, specs):
    if any(s is None for s in specs):
        return None
    axis = eqn.params["dimension"]
    merged = [()] * len(specs[0])
    for spec in specs:
        merged = [m or s for m, s in zip(merged, spec)]
    merged[axis] = ()
    return without_repeats(merged)


def _sharding_constraint(eqn, specs):
    sharding = eqn.params.get("sharding")
    return from_partition_spec(getattr(sharding, "spec", None), len(_shape(eqn.outvars[0])))


def _gather(eqn, specs):
    """A gather that takes whole slices (``x[..., 0]``, what ``jnp.take`` of a constant index
    lowers to): each operand dim it keeps whole keeps its layout. Other gathers: unknown."""
    spec, operand, out = specs[0], eqn.invars[0], eqn.outvars[0]
    dn = eqn.params["dimension_numbers"]
    if spec is None or len(dn.offset_dims) != len(_shape(out)):
        return None
    kept = [d for d in range(len(_shape(operand))) if d not in dn.collapsed_slice_dims]
    dims = []
    for d in kept:
        whole = eqn.params["slice_sizes"][d] == _shape(operand)[d]
        if spec[d] and not whole:
            return None
        dims.append(spec[d])
    return tuple(dims)


def _scatter_add(eqn, specs):
    """The transpose of :func:`_gather`: whole-slice updates into an operand."""
    (spec, _, updates_spec), operand = specs, eqn.invars[0]
    dn = eqn.params["dimension_numbers"]
    updates = eqn.invars[2]
    if spec is None or updates_spec is None or len(dn.update_window_dims) != len(_shape(updates)):
        return None
    window = [d for d in range(len(_shape(operand))) if d not in dn.inserted_window_dims]
    dims = list(spec)
    for i, d in enumerate(window):
        if updates_spec[i]:
            if _shape(updates)[i] != _shape(operand)[d] or (dims[d] and dims[d] != updates_spec[i]):
                return None
            dims[d] = updates_spec[i]
    return without_repeats(dims)


def _reshard(eqn, specs):
    # jax.sharding.reshard; autodiff emits one for the seed cotangent of a sharded output
    sharding = eqn.params.get("dst_sharding")
    return from_partition_spec(getattr(sharding, "spec", None), len(_shape(eqn.outvars[0])))


def _device_put(eqn, specs):
    outs = []
    for spec, device, var in zip(specs, eqn.params.get("devices", ()), eqn.outvars):
        pspec = getattr(device, "spec", None)
        outs.append(from_partition_spec(pspec, len(_shape(var))) if pspec is not None else spec)
    return outs


def _identity(eqn, specs):
    return list(specs)


def _replicated_output(eqn, specs):
    return [replicated(len(_shape(v))) for v in eqn.outvars]


_RULES: dict[str, Rule] = {
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "transpose": _transpose,
    "dot_general": _dot_general,
    "squeeze": _squeeze,
    "slice": _slice_like,
    "dynamic_slice": _slice_like,
    "pad": _slice_like,
    "rev": _slice_like,
    "concatenate": _concatenate,
    "sharding_constraint": _sharding_constraint,
    "device_put": _device_put,
    "reshard": _reshard,
    "gather": _gather,
    "scatter-add": _scatter_add,
    "scatter_add": _scatter_add,
    "iota": _replicated_output,
    "optimization_barrier": _identity,
    **{name: _reduce for name in compat.REDUCTION_PRIMITIVES},
    **{name: _cumulative for name in compat.CUMULATIVE_PRIMITIVES},
}

def body_input_specs(eqn: jx.JaxprEqn, specs: Sequence[MaybeSpec]) -> dict[str, Any]:
    """For each body param of a nested equation, the layouts of that body's inputs."""
    name = eqn.primitive.name
    if name in compat.CALL_BODY_PARAMS:  # calls, remat and custom_jvp/vjp regions
        return {compat.CALL_BODY_PARAMS[name]: list(specs)}
    if name == "scan":
        consts, carry, xs = compat.scan_operand_groups(eqn, list(specs))
        return {"jaxpr": consts + carry + [None if s is None else s[1:] for s in xs]}
    if name == "while":
        cond_n, body_n = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        carry = list(specs[cond_n + body_n:])
        return {"body_jaxpr": list(specs[cond_n:cond_n + body_n]) + carry,
                "cond_jaxpr": list(specs[:cond_n]) + carry}
    if name == "cond":
        return {"branches": list(specs[1:])}
    return {}


def _nested_output_specs(eqn, specs) -> list[MaybeSpec]:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    inputs = body_input_specs(eqn, specs)
    if not inputs:
        return [None] * n_out
    if name == "cond":
        outs = None
        for branch in eqn.params["branches"]:
            branch_outs = propagate(branch, inputs["branches"])[1]
            outs = branch_outs if outs is None else [
                a if a == b else None for a, b in zip(outs, branch_outs)]
        return outs or [None] * n_out
    key = "body_jaxpr" if name == "while" else next(iter(inputs))
    body_outs = propagate(eqn.params[key], inputs[key])[1]
    if name == "scan":
        carry = compat.scan_num_carry(eqn)
        ys = [None if s is None else ((),) + tuple(s) for s in body_outs[carry:]]
        return list(body_outs[:carry]) + ys
    if compat.is_call(eqn):
        declared = eqn.params.get("out_shardings", ())
        for i, (sharding, var) in enumerate(zip(declared, eqn.outvars)):
            pspec = getattr(sharding, "spec", None)
            if pspec is not None:
                body_outs[i] = from_partition_spec(pspec, len(_shape(var)))
    return list(body_outs)


def output_specs(eqn: jx.JaxprEqn, specs: Sequence[MaybeSpec]) -> list[MaybeSpec]:
    """The layouts of ``eqn``'s outputs from its operands' layouts (None where unknown)."""
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if name in compat.ELEMENTWISE_PRIMITIVES:
        rule = _elementwise
    else:
        rule = _RULES.get(name)
    try:
        if rule is None:
            return _nested_output_specs(eqn, specs)
        out = rule(eqn, specs)
    except Exception:  # an unexpected param layout: unknown, never an error
        return [None] * n_out
    if isinstance(out, list):
        return out
    return [out] * n_out if n_out == 1 else [None] * n_out


def atom_spec(atom, env: dict) -> MaybeSpec:
    if isinstance(atom, jx.Literal):
        return replicated(len(_shape(atom)))
    return env.get(atom)


def propagate(body, in_specs: Sequence[MaybeSpec]) -> tuple[dict, list[MaybeSpec]]:
    """(layout of every var, layouts of the outputs) of a Jaxpr or ClosedJaxpr."""
    jaxpr, consts = jx.open_and_consts(body)
    env: dict = {v: replicated(len(_shape(v))) for v in jaxpr.constvars}
    env.update(zip(jaxpr.invars, in_specs))
    for eqn in jaxpr.eqns:
        outs = output_specs(eqn, [atom_spec(a, env) for a in eqn.invars])
        env.update(zip(eqn.outvars, outs))
    return env, [atom_spec(v, env) for v in jaxpr.outvars]
