"""Every op declares beside itself what the rest of jfuse needs, so adding one touches no other file.

An op module in ``jfuse/ops/`` (a name without a leading underscore) must export its public
functions (``__all__``), hold one :class:`~jfuse.ops._op.FusedOp` that implements the op
(reference, kernel, derivative, operand roles for the sharding rules, or its own layout rule)
and declare its benchmarks (``BENCHMARKS``), which ``benchmarks/ops.py`` reads. The pattern
passes are found the same way, ordered by their declared priority.
"""

from __future__ import annotations

import importlib
import pkgutil

import jax
import jax.numpy as jnp
import pytest

import jfuse.ops
import jfuse.passes
from jfuse.core.markers import ROWS_AND_FEATURES_ROLES
from jfuse.ops._op import FusedOp

OP_MODULES = [importlib.import_module(f"jfuse.ops.{info.name}")
              for info in pkgutil.iter_modules(jfuse.ops.__path__) if not info.name.startswith("_")]
REQUIRED = ("reference", "kernel", "tangents", "roles")


def test_the_known_ops_are_found():
    assert {m.__name__.rsplit(".", 1)[1] for m in OP_MODULES} >= {"linear", "glu", "norm"}
    assert {op.name for op in jfuse.ops.OPS} >= {"linear", "glu", "norm"}
    assert {"linear", "glu", "rms_norm", "layer_norm"} <= set(jfuse.ops.__all__)


@pytest.mark.parametrize("module", OP_MODULES, ids=lambda m: m.__name__)
def test_each_op_module_declares_what_the_rest_needs(module):
    ops = [v for v in vars(module).values() if isinstance(v, FusedOp)]
    assert len(ops) == 1, f"{module.__name__}: one FusedOp instance expected, got {ops}"
    op = ops[0]
    missing = [name for name in REQUIRED if getattr(type(op), name) is getattr(FusedOp, name)]
    assert not missing, f"{module.__name__}: {type(op).__name__} does not implement {missing}"
    assert module.__all__ and all(callable(getattr(module, name)) for name in module.__all__)
    assert module.BENCHMARKS, f"{module.__name__} declares no benchmark"
    for benchmark in module.BENCHMARKS:
        assert {"quick", "cpu", "accelerator", "device"} <= set(benchmark.sizes), benchmark.name


@pytest.mark.parametrize("benchmark", jfuse.ops.BENCHMARKS, ids=lambda b: b.name)
def test_each_benchmark_declaration_runs_and_its_op_partitions(benchmark, monkeypatch):
    """The quick declaration builds inputs the op accepts; the call's operand roles are ones the
    shared layout rule knows, unless the op brings its own rule."""
    shape, variant = benchmark.sizes["quick"][0]
    keys = iter(jax.random.split(jax.random.key(0), 8))
    normal = lambda s, scale=1.0: jax.random.normal(next(keys), s) * scale
    args = benchmark.inputs(shape, jnp.float32, normal)
    seen = []
    from jfuse.ops import _op

    original = _op.dispatch

    def record(implementation, call):
        seen.append(call)
        return original(implementation, call)

    monkeypatch.setattr(_op, "dispatch", record)
    out = benchmark.call("xla", variant)(*args)
    assert all(jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(out))
    assert seen and all(call.pattern == benchmark.name for call in seen)
    for call in seen:
        if call.layout_rule is None:
            assert set(call.roles) <= ROWS_AND_FEATURES_ROLES, call.roles
        assert len(call.roles) == len(call.operands)


def test_passes_are_found_in_priority_order():
    names = [pattern.name for pattern in jfuse.passes.PIPELINE]
    assert names.index("glu") < names.index("linear") and "norm" in names  # glu claims its gate
    # attention claims QK/PV before glu; linear_cross_entropy claims the logits matmul before linear
    assert names.index("attention") < names.index("glu")
    assert names.index("linear_cross_entropy") < names.index("linear")
    priorities = [pattern.priority for pattern in jfuse.passes.PIPELINE]
    assert priorities == sorted(priorities)
