"""Source locations: the user's line of an equation, and re-binding under an equation's own.

The fusion report, the debug switch and the warnings name the user's source line of a block,
found from the traceback JAX keeps on every equation (``jax._src.source_info_util``, private).
When jfuse re-traces an equation it re-binds it under that same source info, so the line survives
the rewrite. This module knows nothing about patterns, ops or markers.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

from jax._src import source_info_util  # private: JAX has no public API for equation tracebacks

# jfuse's package directory: its frames are jfuse's engine, not the user's code.
_JFUSE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# Frames from these libraries are "how the model was built", not "where the user wrote it": the
# report points past them to the user's own line when there is one.
_LIBRARY_MARKERS = tuple(
    os.sep + name + os.sep for name in ("flax", "equinox", "haiku", "optax", "chex")
)


@contextlib.contextmanager
def equation_context(eqn: Any) -> Iterator[None]:
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


def user_source_line(eqn: Any) -> str:
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


def generated_by_autodiff(eqn: Any) -> bool:
    """True for equations JAX's autodiff wrote (inside a JVP or a transpose)."""
    stack = str(eqn.source_info.name_stack)
    return "transpose" in stack or "jvp" in stack


def is_backward(eqn: Any) -> bool:
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


_PACKAGE_ROOTS = ("site-packages", "dist-packages")


def short_path(path: str) -> str:
    """A source path as a report prints it: relative to the working directory when under it, a
    notebook cell by its number, an installed package's file from the package on
    (``flax/linen/linear.py``), anything else by its last three parts (``…/proj/model.py``)."""
    cell = _notebook_cell(path)
    if cell is not None:
        return cell
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        relative = path
    if not relative.startswith(".."):
        return relative
    parts = os.path.normpath(path).split(os.sep)
    for root in _PACKAGE_ROOTS:
        if root in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(root):])
    return path if len(parts) <= 4 else "…/" + "/".join(parts[-3:])


def custom_jvp_origin(eqn: Any) -> str:
    """``"name at file:line"`` of the Python function a ``custom_jvp_call`` was traced from."""
    body = eqn.params.get("call_jaxpr")
    jaxpr = getattr(body, "jaxpr", body)  # a ClosedJaxpr, or an open Jaxpr
    info = getattr(jaxpr, "debug_info", None)
    return str(getattr(info, "func_src_info", "") or "")


def is_jax_nn_function(eqn: Any, name: str) -> bool:
    """True for a ``custom_jvp_call`` traced from ``jax.nn.<name>`` itself (e.g. ``relu``).

    JAX keeps no public record of which function a custom_jvp wraps; the traced function's name
    and JAX's own file (``jax/_src/nn/functions.py``, where ``jax.nn`` defines it) tell it apart
    from a user's function of the same name.
    """
    origin = custom_jvp_origin(eqn).replace("\\", "/")
    return origin.startswith(f"{name} at ") and "jax/_src/nn/functions.py" in origin
