"""The per-shard layout of an LM-head loss call: tokens split, the vocabulary split, ``K`` whole.

The op (:mod:`jfuse.ops.linear_cross_entropy`) reduces the logits ``h·W`` over the vocabulary to
per-token statistics, so:

- tokens (``h``'s rows, the labels, the per-token statistics and cotangents) split over some mesh
  axes: every shard runs the op on its tokens, no communication;
- ``W``'s vocabulary dim split over other axes (tensor parallel over the vocabulary, also a tied
  embedding table ``E`` split over its rows): every shard reduces its own vocabulary slice, and
  the op's per-shard program combines the partial statistics exactly across those axes (a
  ``pmax`` then a ``psum`` for the log-sum-exp, a ``psum`` for the label's logit);
- ``W``'s contraction dim ``K`` split alone (FSDP): gathered on entry, as XLA gathers it;
- ``h``'s ``K`` split: declined, every logit would need an all-reduced sum first.

Operand roles are ``"<operand>/linear_cross_entropy"`` with operands ``h``, ``w``, ``labels``,
``bias`` and, for the backward, the forward's ``lse`` and the cotangents ``ct_*``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jfuse.sharding.specs import MaybeSpec, describe, shard_count

# Per-token operands: split like h's rows.
_PER_TOKEN = ("labels", "lse", "ct_lse", "ct_z_label", "ct_z_mean")


def _axes(axes: Sequence[str]) -> str:
    return "'" + "', '".join(axes) + "'"


@dataclasses.dataclass(frozen=True)
class VocabularySplit:
    """How one call splits: mesh axes over the tokens, over the vocabulary, and gathered."""

    tokens: tuple[str, ...]
    vocabulary: tuple[str, ...]
    gathered: tuple[str, ...]
    vocab_size: int  # the whole vocabulary, V

    def describe(self, backward: bool = False) -> str:
        parts = []
        if self.tokens:
            parts.append(f"tokens over {_axes(self.tokens)}")
        if self.vocabulary:
            combine = ("each shard's gradients summed across shards" if backward else
                       "partial log-sum-exps combined exactly: pmax, then psum")
            parts.append(f"vocabulary-parallel over {_axes(self.vocabulary)} ({combine})")
        if self.gathered:
            parts.append(f"parameters gathered over {_axes(self.gathered)} (as XLA gathers them)")
        text = ", ".join(parts) or "replicated (every device runs the whole call)"
        return ("backward: " + text) if backward else text


def vocabulary_split(names: Sequence[str], specs: Sequence[MaybeSpec], avals: Sequence[Any],
                     mesh: Any, transpose_w: bool) -> VocabularySplit | str:
    """The split of a call whose flat operands are ``names`` (see the module docstring), or the
    reason it is declined."""
    axis_names = set(mesh.axis_names)
    for name, spec, aval in zip(names, specs, avals):
        if spec is None:
            return f"the layout of its {name} operand {aval.str_short()} is not known to jfuse"
        stray = {a for axes in spec for a in axes} - axis_names
        if stray:
            return (f"its {name} operand is laid out over mesh axes {sorted(stray)} that are not "
                    f"on the mesh {tuple(mesh.axis_names)}")
    by_name = {name: (spec, aval) for name, spec, aval in zip(names, specs, avals)}
    h_spec, h_aval = by_name["h"]
    if h_spec[1]:
        return (f"h's contraction dim K ({h_aval.shape[1]}) is split over {_axes(h_spec[1])}: "
                "every logit would need the all-reduced sum first")
    tokens = tuple(h_spec[0])
    t = h_aval.shape[0]
    if tokens and t % shard_count(tokens, mesh):
        return f"its {t} tokens do not divide into {shard_count(tokens, mesh)} shards"
    w_spec, w_aval = by_name["w"]
    v_dim, k_dim = (0, 1) if transpose_w else (1, 0)
    vocab_size = w_aval.shape[v_dim]
    vocabulary = tuple(a for a in w_spec[v_dim] if a not in tokens)
    if vocabulary and vocab_size % shard_count(vocabulary, mesh):
        return (f"its vocabulary of {vocab_size} does not divide into "
                f"{shard_count(vocabulary, mesh)} shards over {_axes(vocabulary)}")
    gathered = [a for a in w_spec[k_dim] if a not in vocabulary]
    if "bias" in by_name:  # a bias split other than like W's vocabulary is gathered
        b_spec = by_name["bias"][0]
        gathered += [a for a in b_spec[0] if a not in vocabulary and a not in gathered]
    for name in _PER_TOKEN:
        if name in by_name and by_name[name][0][0] and tuple(by_name[name][0][0]) != tokens:
            spec = by_name[name][0]
            return (f"its {name} is split as {describe(spec)}, the tokens of h as "
                    f"{describe(h_spec)}")
    return VocabularySplit(tokens, vocabulary, tuple(dict.fromkeys(gathered)), vocab_size)


def operand_spec(name: str, ndim: int, split: VocabularySplit, transpose_w: bool) -> tuple:
    """The per-shard spec of operand (or cotangent) ``name`` under ``split``."""
    if name in ("h", "dh"):
        return (split.tokens, ())
    if name in ("w", "dw"):
        return (split.vocabulary, ()) if transpose_w else ((), split.vocabulary)
    if name in ("bias", "db"):
        return (split.vocabulary,)
    assert ndim == 1, name
    return (split.tokens,)
