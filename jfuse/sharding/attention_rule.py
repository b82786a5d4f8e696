"""The per-shard layout of an attention call: batch and heads split, sequences whole.

Attention is independent per example and per head, so a call whose operands are split over the
batch or the heads runs the kernel on each shard with no communication. Grouped-query heads split
too when the kv heads divide into the same shards (query head ``n`` reads kv head ``n // G``, so
contiguous shards of query heads read contiguous shards of kv heads). A split sequence is
declined: queries split need their positions for a causal mask, and keys split need the other
shards' keys (ring attention, a later step).

Operand roles are ``"<operand>/<layout>"`` (``"query/BTNH"``), see :mod:`jfuse.ops.attention`.
"""

from __future__ import annotations

from typing import Any, Sequence

from jfuse.core.markers import PartitionableCall
from jfuse.sharding.rules import Layout
from jfuse.sharding.specs import MaybeSpec, describe, shard_count

# Which dim of each operand is the batch, the heads, and the sequence(s), per layout.
_DIMS = {
    "BTNH": {"query": (0, 2, (1,)), "key": (0, 2, (1,)), "value": (0, 2, (1,))},
    "BNTH": {"query": (0, 1, (2,)), "key": (0, 1, (2,)), "value": (0, 1, (2,))},
}
_SHARED = {  # layout-independent operands: (batch, heads, sequence dims)
    "bias": (0, 1, (2, 3)), "mask": (0, 1, (2, 3)), "query_segment_ids": (0, None, (1,)),
    "key_segment_ids": (0, None, (1,)), "key_value_seq_lengths": (0, None, ()),
}


def _axes(axes: Sequence[str]) -> str:
    return "'" + "', '".join(axes) + "'"


def attention_layout(call: PartitionableCall, specs: Sequence[MaybeSpec],
                     out_avals: Sequence[Any], mesh: Any) -> Layout | str:
    """The layout for an attention call, or the reason it is declined."""
    names = [role.split("/")[0] for role in call.roles]
    layout = call.roles[0].split("/")[1]
    dims = {**_DIMS[layout], **_SHARED}
    for name, spec, aval in zip(names, specs, call.operand_avals):
        if spec is None:
            return f"the layout of its {name} operand {aval.str_short()} is not known to jfuse"
    q_spec = specs[0]
    batch_axes, heads_axes = q_spec[dims["query"][0]], q_spec[dims["query"][1]]
    for name, spec, aval in zip(names, specs, call.operand_avals):
        batch, heads, seqs = dims[name]
        for d in seqs:
            if spec[d]:
                need = ("each query needs every shard's keys and values (ring attention is not "
                        "supported yet)") if name in ("key", "value") or name.endswith("ids") \
                    else "per-shard queries would need their global positions (not supported yet)"
                return f"its {name} is split along the sequence over {_axes(spec[d])}: {need}"
        if name in ("query", "key", "value") and spec[-1]:
            return f"its {name}'s head dim is split over {_axes(spec[-1])}"
        if spec[batch] and spec[batch] != batch_axes and aval.shape[batch] != 1:
            return (f"its {name} is split over the batch as {describe(spec)}, the query as "
                    f"{describe(q_spec)}")
        if heads is not None and spec[heads] and spec[heads] != heads_axes \
                and aval.shape[heads] != 1:
            return (f"its {name} is split over the heads as {describe(spec)}, the query as "
                    f"{describe(q_spec)}")
    kv_heads = call.operand_avals[1].shape[dims["key"][1]]
    if heads_axes and kv_heads % shard_count(heads_axes, mesh):
        return (f"its {kv_heads} kv heads do not divide into {shard_count(heads_axes, mesh)} "
                f"shards over {_axes(heads_axes)}")
    batch = call.operand_avals[0].shape[0]
    if batch_axes and batch % shard_count(batch_axes, mesh):
        return f"a batch of {batch} does not divide into {shard_count(batch_axes, mesh)} shards"

    in_specs = []
    for name, aval in zip(names, call.operand_avals):
        b, h, _ = dims[name]
        spec = [()] * len(aval.shape)
        if aval.shape[b] != 1:
            spec[b] = batch_axes
        if h is not None and aval.shape[h] != 1:
            spec[h] = heads_axes
        in_specs.append(tuple(spec))
    out_specs = [in_specs[0]]  # the output has the query's layout
    for _ in out_avals[1:]:  # per-query statistics, (B, K, G, T)
        out_specs.append((batch_axes, heads_axes, (), ()))
    parts = [f"{what} over {_axes(axes)}" for what, axes in
             (("batch", batch_axes), ("heads", heads_axes)) if axes]
    return Layout(tuple(in_specs), tuple(out_specs),
                  ", ".join(parts) or "replicated (every device runs the whole call)")
