"""Fused ops under sharding: propagate the inputs' shardings, lay each kernel out per shard.

``specs``: the layout of one array (which mesh axes split each dimension).
``propagate``: shardings from a jaxpr's inputs to every value, primitive by primitive.
``rules``: per fused-op call, the ``shard_map`` layout that needs no collective the unfused
program does not, or the reason it declines.
``partition``: the pass that replaces each fused op's marker with its per-shard kernels.
"""
