"""Warnings that point at the user's line, not at jfuse's or JAX's frames.

jfuse warns from deep inside a trace (a pass, the rewriter, a jax.jit call), where a fixed
``stacklevel`` lands in jfuse or JAX. :func:`warn_user` walks up to the first frame outside
jfuse, JAX and jaxlib, so the warning names the line of the user's program that started it (the
call of the jitted step), and warning filters keyed on the user's module apply.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import jax

_JFUSE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARY_DIRS = tuple(
    directory + os.sep for directory in
    (_JFUSE_DIR, os.path.dirname(os.path.abspath(jax.__file__)),
     *[os.path.dirname(os.path.abspath(sys.modules["jaxlib"].__file__))]
     * ("jaxlib" in sys.modules))
)


def _is_library_frame(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_LIBRARY_DIRS) or filename.startswith("<frozen")


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn(message)`` attributed to the nearest caller outside jfuse and JAX."""
    frame, stacklevel = sys._getframe(1), 2  # stacklevel 2: the caller of warn_user
    while frame is not None and _is_library_frame(frame.f_code.co_filename):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, category, stacklevel=stacklevel if frame is not None else 2)


def jfuse_frame_of(error: BaseException) -> str | None:
    """Where ``error`` came from, as ``"jfuse/ops/attention.py:123"``, when the innermost frame
    of its traceback outside JAX and jaxlib is jfuse's own; None when it is the user's (their code
    failed to trace) or unknown. An error a public op raises about its arguments (its message
    starts with ``"jfuse."``) is the caller's, not jfuse's."""
    if str(error).startswith("jfuse."):
        return None
    jax_dirs = tuple(d for d in _LIBRARY_DIRS if d != _JFUSE_DIR + os.sep)
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = os.path.abspath(frame.filename)
        if path.startswith(jax_dirs) or frame.filename.startswith("<frozen"):
            continue
        if path.startswith(_JFUSE_DIR + os.sep):
            where = os.path.relpath(path, os.path.dirname(_JFUSE_DIR))
            return f"{where}:{frame.lineno}"
        return None
    return None
