"""The sharding layer's pieces, on one device: propagation rules and the per-op layout rule.
(Whole programs on 8 devices are in test_multi_device.py.)"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest

from jfuse.ops import _partitionable as roles
from jfuse.core.markers import PartitionableCall
from jfuse.sharding import propagate
from jfuse.sharding.rules import Layout, plan

MESH = types.SimpleNamespace(shape={"data": 4, "model": 2}, axis_names=("data", "model"))
DATA = ("data",)
MODEL = ("model",)


def _out_spec(fn, in_specs, *shapes):
    closed = jax.make_jaxpr(fn)(*[jnp.zeros(s) for s in shapes])
    return propagate.propagate(closed, in_specs)[1]


def test_reshape_keeps_a_split_on_the_major_dim_of_a_group():
    merge = _out_spec(lambda x: x.reshape(32, 16), [(DATA, (), ())], (8, 4, 16))
    assert merge == [(DATA, ())]
    split_minor = _out_spec(lambda x: x.reshape(32, 16), [((), DATA, ())], (8, 4, 16))
    assert split_minor == [None]  # not a contiguous block per device: unknown, never guessed
    heads = _out_spec(lambda x: x.reshape(8, 4, 2, 8)[..., None], [(DATA, (), ())], (8, 4, 16))
    assert heads == [(DATA, (), (), (), ())]


def test_matmul_keeps_batch_and_free_dims_and_drops_the_contraction():
    out = _out_spec(lambda x, w: x @ w, [(DATA, MODEL), (MODEL, ())], (8, 16), (16, 4))
    assert out == [(DATA, ())]
    out = _out_spec(lambda x, w: x @ w, [(DATA, ()), (DATA, MODEL)], (8, 16), (16, 4))
    assert out == [(DATA, MODEL)]


def test_reductions_and_unknown_operands():
    out = _out_spec(lambda x: jnp.mean(x * x, -1, keepdims=True) + 1.0, [(DATA, MODEL)], (8, 16))
    assert out == [(DATA, ())]
    out = _out_spec(lambda x, y: x + y, [(DATA, ()), None], (8, 16), (8, 16))
    assert out == [None]


def _aval(*shape):
    return jax.typeof(jax.ShapeDtypeStruct(shape, jnp.float32))  # what tracing records


def _call(roles_, avals, contracts=True):
    return PartitionableCall("linear", tuple(roles_), tuple(avals), contracts, None, None, None,
                             None)


def test_rule_tensor_parallel_and_fsdp_weights():
    x, w, b = _aval(8, 16, 32), _aval(32, 64), _aval(64)
    call = _call((roles.X, roles.WEIGHT_KN, roles.BIAS), (x, w, b))
    out = [_aval(8, 16, 64)]
    layout = plan(call, [(DATA, (), ()), (DATA, MODEL), ((),)], out, MESH)
    assert isinstance(layout, Layout)
    assert layout.in_specs == ((DATA, (), ()), ((), MODEL), (MODEL,))  # W gathered on K
    assert layout.out_specs == ((DATA, (), MODEL),)
    assert "gathered over 'data'" in layout.description


@pytest.mark.parametrize("contracts, expected", [(True, "contraction dim K"),
                                                 (False, "normalized dim")])
def test_rule_declines_a_split_contracted_or_normalized_dim(contracts, expected):
    x = _aval(8, 32)
    call = _call((roles.X,), (x,), contracts)
    reason = plan(call, [(DATA, MODEL)], [x], MESH)
    assert isinstance(reason, str) and expected in reason and "'model'" in reason


def test_rule_declines_unknown_layouts_and_uneven_rows():
    x = _aval(6, 32)
    call = _call((roles.X,), (x,), False)
    assert "not known" in plan(call, [None], [x], MESH)
    assert "does not divide" in plan(call, [(DATA, ())], [x], MESH)
