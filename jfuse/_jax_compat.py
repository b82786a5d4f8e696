"""The few private JAX internals jfuse needs, behind one small surface.

JAX's jaxpr internals drift between releases (jfuse supports jax 0.10 through 0.12). Everything
that reaches into ``jax._src`` lives here, so a JAX change touches this file and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import jax
from jax._src import source_info_util
from jax.extend import core as jex_core

ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr
JaxprEqn = jex_core.JaxprEqn
Literal = jex_core.Literal
Var = jex_core.Var
DropVar = jex_core.DropVar
Tracer = jax.core.Tracer

_JFUSE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Frames from these libraries are "how the model was built", not "where the user wrote it": the
# report points past them to the user's own line when there is one.
_LIBRARY_MARKERS = tuple(
    os.sep + name + os.sep for name in ("flax", "equinox", "haiku", "optax", "chex")
)


def bind_params(eqn: JaxprEqn) -> dict[str, Any]:
    """The params to re-bind ``eqn.primitive`` with (a dict on every supported JAX)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # (subfuns, params) on JAX older than 0.9.2
        raise NotImplementedError("jfuse needs jax >= 0.10")
    return params


@contextlib.contextmanager
def equation_context(eqn: JaxprEqn) -> Iterator[None]:
    """Re-bind under the equation's own source info and context, as ``core.eval_jaxpr`` does.

    Keeping the user's traceback on every re-traced equation is what lets the fusion report (and
    XLA's HLO metadata) point at the user's source line after jfuse rewrote the jaxpr.
    """
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack):
        with eqn.ctx.manager:
            yield


def _is_user_file(file_name: str) -> bool:
    if file_name.startswith(_JFUSE_DIR):
        return file_name == _JFUSE_DIR + "demo.py"  # the demo is user code, jfuse's engine is not
    return not any(marker in file_name for marker in _LIBRARY_MARKERS)


def user_source_line(eqn: JaxprEqn) -> str:
    """``file:line (function)`` of the user's code that produced ``eqn``, and its caller.

    Skips JAX's own frames (as ``source_info_util.summarize`` does) and also jfuse's and model
    libraries' frames, so a ``flax.linen.Dense`` points at the user's module, not at Flax.
    """
    frames = list(source_info_util.user_frames(eqn.source_info.traceback))
    if not frames:
        return "no user source line (an equation JAX generated, e.g. by autodiff)"
    users = [f for f in frames if _is_user_file(f.file_name)] or frames[:1]
    text = _frame_text(users[0])
    if len(users) > 1:  # the caller tells apart sites written in one helper, like a norm function
        text += " <- " + _frame_text(users[1])
    return text


def generated_by_autodiff(eqn: JaxprEqn) -> bool:
    """True for equations JAX's autodiff wrote (inside a JVP or a transpose)."""
    stack = str(eqn.source_info.name_stack)
    return "transpose" in stack or "jvp" in stack


def is_backward(eqn: JaxprEqn) -> bool:
    """True for equations of a backward pass (a transpose)."""
    return "transpose" in str(eqn.source_info.name_stack)


def _frame_text(frame) -> str:
    return f"{short_path(frame.file_name)}:{frame.start_line} ({frame.function_name})"


def _notebook_cell(path: str) -> str | None:
    """``Cell In[7]`` for code typed into a Jupyter/IPython cell (whose file is a temporary
    ``/tmp/ipykernel_…/….py``), as IPython's own tracebacks name it; None elsewhere."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    cells = getattr(getattr(shell, "compile", None), "_filename_map", None)
    if isinstance(cells, dict) and path in cells:
        return f"Cell In[{cells[path]}]"
    return None


def short_path(path: str) -> str:
    """Paths under the working directory print relative to it; notebook cells by their number."""
    cell = _notebook_cell(path)
    if cell is not None:
        return cell
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if relative.startswith("..") else relative


def custom_jvp_origin(eqn: JaxprEqn) -> str:
    """``"name at file:line"`` of the Python function a ``custom_jvp_call`` was traced from."""
    body = eqn.params.get("call_jaxpr")
    jaxpr = body.jaxpr if isinstance(body, ClosedJaxpr) else body
    info = getattr(jaxpr, "debug_info", None)
    return str(getattr(info, "func_src_info", "") or "")


def jaxpr_params(eqn: JaxprEqn) -> list[tuple[str, Any]]:
    """(name, value) of every param of ``eqn`` that holds a jaxpr or a tuple of jaxprs."""
    found = []
    for name, value in eqn.params.items():
        if isinstance(value, (ClosedJaxpr, Jaxpr)):
            found.append((name, value))
        elif isinstance(value, tuple) and value and all(
            isinstance(v, (ClosedJaxpr, Jaxpr)) for v in value
        ):
            found.append((name, value))
    return found


def scan_operand_groups(eqn: JaxprEqn, values: list) -> tuple[list, list, list]:
    """``values`` (one per operand of a ``scan``) split into (consts, carry, xs)."""
    params = eqn.params
    if "num_consts" in params:
        consts, carry = params["num_consts"], params["num_carry"]
        return list(values[:consts]), list(values[consts:consts + carry]), list(values[consts + carry:])
    # jax >= 0.12: the split is a FlatTree param
    consts, carry, xs = params["ft_in"].update(list(values)).unpack()
    return list(consts), list(carry), list(xs)


def scan_num_carry(eqn: JaxprEqn) -> int:
    if "num_carry" in eqn.params:
        return eqn.params["num_carry"]
    _, carry = eqn.params["ft_out"].update(list(range(len(eqn.outvars)))).unpack()
    return len(list(carry))


def open_and_consts(jaxpr: ClosedJaxpr | Jaxpr) -> tuple[Jaxpr, list[Any]]:
    """Split a jaxpr param into its open jaxpr and its constants."""
    if isinstance(jaxpr, ClosedJaxpr):
        return jaxpr.jaxpr, list(jaxpr.consts)
    return jaxpr, []


def make_closed_jaxpr(fn, avals) -> ClosedJaxpr:
    """Trace ``fn`` on abstract values (weak types kept) to a closed jaxpr."""
    return jax.make_jaxpr(fn)(*avals)


def jit_inlined_at_lowering(fn):
    """``jax.jit(fn)`` whose calls stay ``jit`` equations through tracing and autodiff (so JAX
    caches their traces) and are inlined when lowered to MLIR, once per distinct body
    (``Inline.JAX_LATE``, jax >= 0.12); None where JAX has no such mode."""
    from jax._src import api

    late = getattr(getattr(api, "Inline", None), "JAX_LATE", None)
    return None if late is None else jax.jit(fn, inline=late)


def inlined_at_lowering(eqn: JaxprEqn) -> bool:
    """True for a ``jit`` equation that lowering inlines (see :func:`jit_inlined_at_lowering`)."""
    return getattr(eqn.params.get("inline"), "value", None) == "jax_late"


def inline_call_equations(jaxpr: Jaxpr, should_inline, *, into_bodies: bool = True) -> Jaxpr:
    """``jaxpr`` with every ``jit`` equation ``should_inline(eqn)`` accepts replaced by its body
    (calls inside an inlined body included), and with ``into_bodies`` also inside the bodies of
    scans, conds, remat regions and other equations that hold jaxprs.

    Edits the jaxpr instead of re-tracing it: fresh variables for each inlined copy, the call's
    name stack in front of each inlined equation's. A call whose body has constants is kept.
    Returns ``jaxpr`` itself when nothing was inlined.
    """
    substitution: dict[Var, Any] = {}

    def read(atom):
        return atom if isinstance(atom, Literal) else substitution.get(atom, atom)

    changed = False
    eqns: list[JaxprEqn] = []
    for eqn in jaxpr.eqns:
        if into_bodies:
            eqn = _with_inlined_bodies(eqn, should_inline)
        body = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit") else None
        inner = body.jaxpr if isinstance(body, ClosedJaxpr) else body
        if (body is None or not should_inline(eqn) or inner.constvars
                or (isinstance(body, ClosedJaxpr) and body.consts)):
            if any(not isinstance(a, Literal) and a in substitution for a in eqn.invars):
                eqn = eqn.replace(invars=[read(a) for a in eqn.invars])
            eqns.append(eqn)
            continue
        changed = True
        if not into_bodies:  # calls inside the body are inlined too (with bodies, above)
            inner = inline_call_equations(inner, should_inline, into_bodies=False)
        renamed: dict[Var, Any] = dict(zip(inner.invars, (read(a) for a in eqn.invars)))
        for inner_eqn in inner.eqns:
            outvars = [v if isinstance(v, DropVar) else Var(v.aval) for v in inner_eqn.outvars]
            eqns.append(inner_eqn.replace(
                invars=[a if isinstance(a, Literal) else renamed.get(a, a)
                        for a in inner_eqn.invars],
                outvars=outvars,
                source_info=inner_eqn.source_info.replace(
                    name_stack=eqn.source_info.name_stack + inner_eqn.source_info.name_stack),
            ))
            renamed.update(zip(inner_eqn.outvars, outvars))
        for outer, result in zip(eqn.outvars, inner.outvars):
            if not isinstance(outer, DropVar):
                substitution[outer] = result if isinstance(result, Literal) else renamed[result]
    if not changed and all(e is o for e, o in zip(eqns, jaxpr.eqns)):
        return jaxpr
    return jaxpr.replace(eqns=eqns, outvars=[read(a) for a in jaxpr.outvars])


def consts_as_invars(jaxpr: Jaxpr) -> Jaxpr:
    """``jaxpr`` with its constvars turned into leading invars (named ``const0``, ...)."""
    info = jaxpr.debug_info
    names = getattr(info, "arg_names", None)
    if names is not None:
        info = info._replace(
            arg_names=tuple(f"const{i}" for i in range(len(jaxpr.constvars))) + tuple(names))
    return jaxpr.replace(constvars=[], invars=[*jaxpr.constvars, *jaxpr.invars], debug_info=info)


def merge_equations(jaxpr: Jaxpr, key) -> Jaxpr:
    """``jaxpr`` with each equation whose ``key(eqn)`` (not None) equals an earlier one's
    dropped and its results read from the earlier one's (common-subexpression elimination).

    ``key`` sees the equation with its operands already renamed, so chains of duplicates merge.
    Returns ``jaxpr`` itself when nothing merged.
    """
    substitution: dict[Var, Any] = {}
    seen: dict[Any, JaxprEqn] = {}
    eqns: list[JaxprEqn] = []
    for eqn in jaxpr.eqns:
        if any(not isinstance(a, Literal) and a in substitution for a in eqn.invars):
            eqn = eqn.replace(invars=[a if isinstance(a, Literal) else substitution.get(a, a)
                                      for a in eqn.invars])
        k = key(eqn)
        earlier = seen.get(k) if k is not None else None
        if earlier is not None and all(not isinstance(v, DropVar) for v in earlier.outvars):
            for var, result in zip(eqn.outvars, earlier.outvars):
                if not isinstance(var, DropVar):
                    substitution[var] = result
            continue
        if k is not None:
            seen[k] = eqn
        eqns.append(eqn)
    if len(eqns) == len(jaxpr.eqns) and all(e is o for e, o in zip(eqns, jaxpr.eqns)):
        return jaxpr
    return jaxpr.replace(
        eqns=eqns,
        outvars=[a if isinstance(a, Literal) else substitution.get(a, a) for a in jaxpr.outvars])


def _with_inlined_bodies(eqn: JaxprEqn, should_inline) -> JaxprEqn:
    params = {}
    for name, value in jaxpr_params(eqn):
        bodies = value if isinstance(value, tuple) else (value,)
        new = []
        for body in bodies:
            open_jaxpr, consts = open_and_consts(body)
            inlined = inline_call_equations(open_jaxpr, should_inline, into_bodies=True)
            new.append(body if inlined is open_jaxpr else (
                ClosedJaxpr(inlined, consts) if isinstance(body, ClosedJaxpr) else inlined))
        if any(n is not b for n, b in zip(new, bodies)):
            params[name] = tuple(new) if isinstance(value, tuple) else new[0]
    return eqn.replace(params={**eqn.params, **params}) if params else eqn
