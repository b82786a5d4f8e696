"""``jfuse.jit``, ``jfuse.fuse`` and ``jfuse.explain``: the public entry points.

``fuse(fn)`` is the rewrite alone. Each call flattens the arguments, traces ``fn`` to a jaxpr,
rewrites it (see :mod:`jfuse.rewrite`) and evaluates the result with JAX's ``eval_jaxpr`` under
whatever transformation is active, so ``jax.grad(fuse(f))``, ``jax.vmap``, ``jax.jvp``,
``jax.checkpoint`` and ``jax.jit`` compose with it. Rewrites are cached per abstract signature
(treedef, shapes, dtypes, weak types, shardings and the values of non-array arguments).

``jit(fn)`` is ``jax.jit(fuse(fn))`` with jax.jit's own arguments passed through, so the object it
returns lowers, traces and compiles exactly like jax.jit's.

Nothing here may break a program that ``jax.jit`` runs: if tracing for the rewrite fails, ``fn``
runs as it is; if the rewrite fails, the unfused jaxpr runs; both with a warning and the reason
in the report.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import functools
import inspect
import itertools
import logging
from typing import Any, Callable, Iterable

import jax
import numpy as np

from jfuse._jax import compat
from jfuse._jax import jaxpr as jx
from jfuse._jax.source import short_path
from jfuse.config import FuseOptions, raise_internal_errors
from jfuse.core import targets
from jfuse.core.kernel_calls import kernel_calls
from jfuse.core.markers import partition_context
from jfuse.core.user_warning import jfuse_frame_of, warn_user
from jfuse.differentiation import fusing_differentiated_functions
from jfuse.report import FusionReport
from jfuse.rewrite import PATTERN_GROUPS, Rewriter
from jfuse.shared_calls import inline_fused_calls
from jfuse.sharding.inputs import InputLayouts, dynamic_specs, input_layouts
from jfuse.sharding.partition import Partitioner
from jfuse.sharding.specs import from_sharding, replicated

logger = logging.getLogger("jfuse")

_CACHE_SIZE = 64
_TRACE_SERIALS = itertools.count(1)

# The arguments of the jfuse.jit call being traced (and its in_shardings), so the function jax.jit
# traces can read their layouts: inside the trace only the mesh is visible, not the splits.
_jit_call: contextvars.ContextVar = contextvars.ContextVar("jfuse_jit_call", default=None)

def _is_fused(fun: Any) -> bool:
    return isinstance(fun, FusedFunction)


def _is_array_leaf(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jx.Tracer))


def _aval_key(leaf: Any) -> Any:
    aval = jax.typeof(leaf)
    sharding = getattr(leaf, "sharding", None) if not isinstance(leaf, jx.Tracer) else None
    return (aval.shape, str(aval.dtype), getattr(aval, "weak_type", False), str(sharding))


def _describe_function(fn: Callable) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    try:
        target = inspect.unwrap(fn)
        file = short_path(inspect.getsourcefile(target) or "?")
        line = target.__code__.co_firstlineno
        return f"{name} ({file}:{line})"
    except (TypeError, AttributeError, OSError):
        return name


def _describe_signature(args, kwargs) -> str:
    """``float32[8,16], <pytree: 12 arrays, 1.5 MiB>, key=...``: one entry per argument."""

    def describe(value) -> str:
        leaves = [leaf for leaf in jax.tree_util.tree_leaves(value) if _is_array_leaf(leaf)]
        if len(leaves) == 1 and leaves[0] is value:
            return jax.typeof(value).str_short()
        if not leaves:
            return repr(value) if len(repr(value)) < 40 else type(value).__name__
        size = sum(np.prod(jax.typeof(x).shape) * jax.typeof(x).dtype.itemsize for x in leaves)
        return f"<pytree: {len(leaves)} arrays, {size / 2**20:.2f} MiB>"

    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "()"


class FusionError(RuntimeError):
    """Raised under ``strict=True`` / ``JFUSE_STRICT=1`` when a block was left unfused."""

    def __init__(self, report: FusionReport):
        self.report = report
        lines = [f"jfuse (strict): {report.function} did not fuse cleanly:"]
        lines += [f"  missed {m.pattern}: {m.reason.value}: {m.detail} at {m.where}; hint: {m.hint}"
                  for m in report.missed]
        lines += [f"  fallback: {f}" for f in report.fallbacks]
        super().__init__("\n".join(lines))


class _Compiled:
    """The rewrite of one signature, ready to evaluate."""

    def __init__(self, jaxpr: jx.ClosedJaxpr, consts, out_tree, report: FusionReport,
                 consts_as_inputs: bool, cacheable: bool):
        self.jaxpr = jaxpr
        self.consts = list(consts)
        self.out_tree = out_tree
        self.report = report
        self.consts_as_inputs = consts_as_inputs
        self.cacheable = cacheable

    def __call__(self, dynamic: list) -> Any:
        if self.consts_as_inputs:
            outs = jx.eval_jaxpr(self.jaxpr.jaxpr, self.jaxpr.consts, *self.consts, *dynamic)
        else:
            outs = jx.eval_jaxpr(self.jaxpr.jaxpr, self.consts, *dynamic)
        return jax.tree_util.tree_unflatten(self.out_tree, outs)


class FusedFunction:
    """``fn`` with jfuse's rewrite applied on every call; see :func:`fuse`.

    Attributes:
      last_report: the :class:`FusionReport` of the most recent new signature.
      reports: reports of the cached signatures, most recent last.
    """

    def __init__(self, fn: Callable, options: FuseOptions, inner_reports: list | None = None):
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._options = options
        # Set for functions fused on the fly inside another jfuse trace: their reports are folded
        # into the outer function's report instead of being printed.
        self._inner_reports = inner_reports
        self._cache: collections.OrderedDict[Any, _Compiled] = collections.OrderedDict()
        self.last_report: FusionReport | None = None
        self.trace_count = 0
        self.serial = 0  # when this function last traced, on a counter shared by all of them

    @property
    def reports(self) -> list[FusionReport]:
        return [entry.report for entry in self._cache.values()]

    def __get__(self, instance, owner=None):
        # Used as a method decorator: bind like a function would.
        return self if instance is None else functools.partial(self, instance)

    def __call__(self, *args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        dynamic_positions = [i for i, leaf in enumerate(leaves) if _is_array_leaf(leaf)]
        dynamic = [leaves[i] for i in dynamic_positions]
        static = tuple(
            (i, leaf) for i, leaf in enumerate(leaves) if i not in set(dynamic_positions)
        )
        layouts = self._input_layouts(len(leaves), dynamic_positions)
        platforms = self._lowering_platforms()
        key = self._cache_key(treedef, dynamic, static, layouts, platforms)
        entry = self._cache.get(key) if key is not None else None
        if entry is None:
            entry = self._build(leaves, treedef, dynamic_positions, dynamic, layouts, platforms)
            if entry is None:  # could not trace: run as written (eager code, or a user error)
                return self._fn(*args, **kwargs)
            if key is not None and entry.cacheable:
                self._cache[key] = entry
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return entry(dynamic)

    def _input_layouts(self, n_leaves: int, dynamic_positions) -> tuple | None:
        """(per dynamic leaf layout, mesh, problem) when jfuse.jit is tracing this function."""
        call = _jit_call.get()
        if call is None or self._inner_reports is not None:
            return None
        layouts: InputLayouts = call.get()
        specs = dynamic_specs(layouts, n_leaves, dynamic_positions)
        return specs, layouts.mesh, layouts.problem

    def _lowering_platforms(self) -> frozenset[str] | None:
        """The platforms this trace's program may be lowered for (see :mod:`jfuse.core.targets`):
        for the function a concrete jfuse.jit call runs, those it can run on; otherwise what the
        enclosing trace said (None: any)."""
        call = _jit_call.get()
        if call is not None and call.owner is self:
            return call.platforms()
        return targets.current()

    def _cache_key(self, treedef, dynamic, static, layouts, platforms) -> Any:
        try:
            key = (
                treedef,
                tuple(_aval_key(d) for d in dynamic),
                static,
                bool(jax.config.jax_enable_x64),
                None if layouts is None else (layouts[0], _mesh_key(layouts[1]), layouts[2]),
                platforms,  # a program traced for some platforms only never serves any other
            )
            hash(key)
            return key
        except TypeError:  # an unhashable non-array argument: no caching
            return None

    def _build(self, leaves, treedef, dynamic_positions, dynamic, layouts,
               platforms: frozenset[str] | None) -> _Compiled | None:
        self.trace_count += 1
        self.serial = next(_TRACE_SERIALS)

        def flat_fn(*dynamic_values):
            filled = list(leaves)
            for i, value in zip(dynamic_positions, dynamic_values):
                filled[i] = value
            a, k = jax.tree_util.tree_unflatten(treedef, filled)
            return self._fn(*a, **k)

        inner_reports: list[FusionReport] = []
        with partition_context(), targets.lowering_for(platforms):
            try:
                with fusing_differentiated_functions(self._fuse_inner(inner_reports),
                                                     is_fused=_is_fused):
                    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*dynamic)
            except Exception as error:
                # Code that cannot be traced (eager Python, a user's error) runs as written, as
                # jax.jit's would fail or not; an error in jfuse's own code says so first.
                if (where := jfuse_frame_of(error)) is not None:
                    if raise_internal_errors():
                        raise
                    warn_user(f"jfuse: tracing {_describe_function(self._fn)} failed inside "
                              f"jfuse at {where} ({type(error).__name__}: {error}); the "
                              "function runs unfused")
                return None
            return self._rewrite(closed, out_shape, leaves, treedef, inner_reports, layouts)

    def _fuse_inner(self, inner_reports: list) -> Callable[[Callable], "FusedFunction"]:
        """How a function differentiated inside this trace is fused (see
        :mod:`jfuse.differentiation`): with these options, its report folded into this one's."""
        # Reports and strictness belong to the outer function, which merges these.
        inner = dataclasses.replace(self._options, report=False, strict=False)
        return lambda fun: FusedFunction(fun, inner, inner_reports=inner_reports)

    def _rewrite(self, closed, out_shape, leaves, treedef, inner_reports, layouts):
        """The traced program as it will run: rewritten, or unfused if the rewrite failed."""
        out_tree = jax.tree_util.tree_structure(out_shape)
        cacheable = not any(isinstance(c, jx.Tracer) for c in closed.consts)
        report = self._new_report(leaves, treedef)
        try:
            rewriter = Rewriter(self._options)
            rewritten = rewriter.rewrite(closed.jaxpr, closed.consts, consts_as_inputs=True)
            report = _merged_report(rewriter.report, report, inner_reports)
            if self._inner_reports is None:  # the outermost function sees the whole program
                rewritten = self._finish(rewritten, closed.consts, layouts, report)
            entry = _Compiled(rewritten, closed.consts, out_tree, report, True, cacheable)
        except Exception as error:
            _record_fallback(report, error)
            entry = _Compiled(closed, closed.consts, out_tree, report, False, cacheable)
        self.last_report = report
        if self._inner_reports is not None:
            self._inner_reports.append(report)
        else:
            self._announce(report)
        return entry

    def _new_report(self, leaves, treedef) -> FusionReport:
        a, k = jax.tree_util.tree_unflatten(treedef, leaves)
        return FusionReport(_describe_function(self._fn), _describe_signature(a, k))

    def _finish(self, rewritten: jx.ClosedJaxpr, consts, layouts, report: FusionReport):
        """The whole rewritten program as XLA should see it: kernels laid out per shard, shared
        fused calls inlined."""
        return inline_fused_calls(self._partition(rewritten, consts, layouts, report))

    def _announce(self, report: FusionReport) -> None:
        """Log the report, print it if asked, and raise under strict mode if anything missed."""
        logger.info("%s", report)
        if self._options.should_print_report():
            print(report)
        if self._options.is_strict() and (report.missed or report.fallbacks):
            raise FusionError(report)

    def _partition(self, rewritten: jx.ClosedJaxpr, consts, layouts, report: FusionReport):
        """Lay out the fused ops' kernels per shard (see :mod:`jfuse.sharding.partition`)."""
        if layouts is None:
            mesh, problem = None, (
                "jfuse does not know the inputs' layouts here (jfuse.fuse inside jax.jit sees "
                "only the mesh); wrap the step in jfuse.jit, which reads the arguments' shardings")
            specs = (None,) * (len(rewritten.jaxpr.invars) - len(consts))
        else:
            specs, mesh, problem = layouts
        if mesh is None and problem is None:
            problem = "the arguments carry no NamedSharding to lay the fused ops out from"
        const_specs = [_const_spec(c) for c in consts]
        partitioner = Partitioner(mesh, problem)
        try:
            partitioned = partitioner.run(rewritten, const_specs + list(specs))
        except Exception as error:  # the markers stay: XLA's partitioned ops, still exact
            if raise_internal_errors():
                raise
            message = (f"laying the fused ops out per shard failed ({type(error).__name__}: "
                       f"{error}); they run XLA's partitioned ops")
            warn_user("jfuse: " + message)
            report.fallbacks.append(message)
            return rewritten
        report.sharding.extend(partitioner.notes)
        if partitioner.notes and mesh is not None:
            report.mesh = ", ".join(f"{n}={s}" for n, s in mesh.shape.items())
        return partitioned


def _merged_report(rewritten: FusionReport, named: FusionReport, inner_reports) -> FusionReport:
    """The rewriter's report under ``named``'s function and signature, with the reports of the
    functions differentiated inside the trace folded in."""
    rewritten.function, rewritten.signature = named.function, named.signature
    for inner in inner_reports:
        rewritten.merge(inner)
    return rewritten


def _record_fallback(report: FusionReport, error: Exception) -> None:
    """A failed rewrite: warn, and say in the report that the function runs unfused."""
    if raise_internal_errors():
        raise error
    message = f"the rewrite failed ({type(error).__name__}: {error}); the function runs unfused"
    warn_user("jfuse: " + message)
    report.fallbacks.append(message)


def _const_spec(value) -> Any:
    if isinstance(value, jx.Tracer):
        return None
    ndim = len(np.shape(value))
    sharding = getattr(value, "sharding", None)
    return from_sharding(sharding, ndim)[0] if sharding is not None else replicated(ndim)


def _mesh_key(mesh) -> Any:
    return None if mesh is None else (tuple(mesh.axis_names), tuple(mesh.shape.values()))


def fuse(
    fn: Callable | None = None,
    *,
    patterns: Iterable[str] | None = None,
    implementation: str | None = None,
    report: bool | None = None,
    strict: bool | None = None,
) -> Any:
    """The jfuse rewrite of ``fn``, as a function that composes with every JAX transformation.

    Args:
      fn: the function to rewrite. Also usable as ``@jfuse.fuse`` or ``@jfuse.fuse(...)``.
      patterns: names of the patterns to apply (default: all, minus ``JFUSE_DISABLE``).
      implementation: implementation for the fused ops (see :func:`jfuse.ops.linear`).
      report: print the fusion report once per new signature (default: ``JFUSE_REPORT=1``).
      strict: raise :class:`FusionError` listing the misses and fallbacks when a block that looks
        like a pattern is left unfused (default: ``JFUSE_STRICT=1``).

    Example::

        grads = jax.jit(jax.grad(jfuse.fuse(loss)))(params, batch)
    """
    options = FuseOptions.create(patterns, implementation, report, strict,
                                 known_patterns=PATTERN_GROUPS)
    if fn is None:
        return lambda f: FusedFunction(f, options)
    return FusedFunction(fn, options)


class _JitCall:
    """A jfuse.jit call, seen by the function it runs while jax.jit traces it: its arguments'
    layouts and the platforms it runs on, each read on first use only (a cached call pays for
    neither)."""

    def __init__(self, owner, args, kwargs, in_shardings, runs_here: bool, jit_kwargs):
        self.owner = owner  # the FusedFunction this call runs
        self._call = (args, kwargs, in_shardings)
        self._runs_here = runs_here
        self._jit_kwargs = jit_kwargs
        self._layouts: InputLayouts | None = None

    def get(self) -> InputLayouts:
        if self._layouts is None:
            self._layouts = input_layouts(*self._call)
        return self._layouts

    def platforms(self) -> frozenset[str] | None:
        """Where this call's program can run, if it runs here and now (see
        :func:`jfuse.core.targets.platforms_of_call`); None: any platform."""
        if not self._runs_here:
            return None
        args, kwargs, _ = self._call
        return targets.platforms_of_call(jax.tree_util.tree_leaves((args, kwargs)),
                                         self._jit_kwargs)


class JittedFusedFunction:
    """What :func:`jit` returns: call it, ``.lower(...)`` or ``.trace(...)`` it like jax.jit's.

    A Pallas kernel is compiled by Mosaic or Triton only when XLA compiles the program, after
    jfuse has traced and checked it. If that compile fails on the device, the call does not fail:
    this signature is compiled again with every fused op on its XLA implementation (the same
    blocks, still fused, so the answer is unchanged), a warning says why, and the report of that
    signature records it in ``fallbacks``. ``.lower(...).compile()`` is jax.jit's own and raises.
    """

    def __init__(self, fused: FusedFunction, jitted, in_shardings=None, jit_kwargs=None):
        functools.update_wrapper(self, fused._fn)
        self._fused = fused
        self._jitted = jitted
        # ``.trace()`` may be lowered for any platform: its own jax.jit (of a distinct function,
        # so jax.jit's trace cache never hands it a program traced for this platform alone).
        self._jitted_anywhere = jax.jit(_same_function(fused), **dict(jit_kwargs or {}))
        self._in_shardings = in_shardings
        self._jit_kwargs = dict(jit_kwargs or {})
        # Signatures whose kernels failed to compile, and what runs them instead (built on the
        # first failure: the fast path below stays jax.jit's own call).
        self._xla_signatures: set = set()
        self._xla: JittedFusedFunction | None = None

    def _through_jit(self, method, args, kwargs, runs_here: bool = True):
        # The layouts and platforms are read only if jax.jit traces (a cache miss): the context
        # var holds a lazy reader, so a cached call pays one context-var set and reset. A call
        # inside another trace (tracers, or concrete arrays closed over by an outer jit) may be
        # lowered for any platform.
        runs_here = runs_here and compat.outside_any_trace()
        token = _jit_call.set(_JitCall(self._fused, args, kwargs, self._in_shardings, runs_here,
                                       self._jit_kwargs))
        try:
            return method(*args, **kwargs)
        finally:
            _jit_call.reset(token)

    def __call__(self, *args, **kwargs):
        if self._xla_signatures and self._signature(args, kwargs) in self._xla_signatures:
            return self._xla(*args, **kwargs)
        try:
            return self._through_jit(self._jitted, args, kwargs)
        except Exception as error:
            if not self._kernel_compile_failed(args, kwargs):
                raise
            return self._run_on_xla(error, args, kwargs)

    def _signature(self, args, kwargs) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        try:
            key = (treedef, tuple(_aval_key(leaf) if _is_array_leaf(leaf) else leaf
                                  for leaf in leaves))
            hash(key)
            return key
        except TypeError:
            return None

    def _kernel_compile_failed(self, args, kwargs) -> bool:
        """After a failed call: did it fail in XLA's compile of a program holding kernels?

        Tracing and lowering are cached by jax.jit, so this repeats only the compile. A program
        without kernel calls, an error while tracing (the user's, or already handled by jfuse's
        trace-time fallbacks) or a program that compiles (the error was at run time) is not a
        kernel compile failure: the original error is raised.
        """
        if raise_internal_errors():
            return False
        try:
            lowered = self.lower(*args, **kwargs)
        except Exception:
            return False
        if not kernel_calls(lowered.as_text()):
            return False
        try:
            lowered.compile()
        except Exception:
            return True
        return False

    def _run_on_xla(self, error: Exception, args, kwargs):
        message = (
            f"a fused op's kernel failed to compile on {jax.default_backend()} "
            f"({type(error).__name__}: {_first_line(error)}); this signature runs the fused ops' "
            "XLA implementation"
        )
        warn_user("jfuse: " + message)
        logger.warning("jfuse: %s", message)
        if self._xla is None:
            options = dataclasses.replace(self._fused._options, implementation="xla",
                                          report=False)
            xla = FusedFunction(self._fused._fn, options)
            self._xla = JittedFusedFunction(xla, jax.jit(xla, **self._jit_kwargs),
                                            self._in_shardings, self._jit_kwargs)
        result = self._xla(*args, **kwargs)
        signature = self._signature(args, kwargs)
        if signature is not None:
            self._xla_signatures.add(signature)
        report = self._xla._fused.last_report
        if report is not None:
            report.fallbacks.append(message)
            if self._fused._options.should_print_report():
                print(report)
            if self._fused._options.is_strict():
                raise FusionError(report) from error
        return result

    def __get__(self, instance, owner=None):
        return self if instance is None else functools.partial(self, instance)

    def lower(self, *args, **kwargs):
        return self._through_jit(self._jitted.lower, args, kwargs)

    def trace(self, *args, **kwargs):
        # ``.trace(...).lower(lowering_platforms=...)`` may name any platform: all are traced.
        return self._through_jit(self._jitted_anywhere.trace, args, kwargs, runs_here=False)

    def eval_shape(self, *args, **kwargs):
        return self._through_jit(self._jitted.eval_shape, args, kwargs)

    def _latest(self) -> FusedFunction:
        """The rewrite that traced most recently (the XLA one after a kernel compile failure)."""
        if self._xla is not None and self._xla._fused.serial > self._fused.serial:
            return self._xla._fused
        return self._fused

    @property
    def report(self) -> FusionReport | None:
        """The fusion report of the most recently compiled signature."""
        return self._latest().last_report

    @property
    def reports(self) -> list[FusionReport]:
        return self._fused.reports + (self._xla._fused.reports if self._xla is not None else [])

    @property
    def trace_count(self) -> int:
        """How many times jfuse traced ``fn`` (once per new signature)."""
        return self._fused.trace_count


def _same_function(fused: FusedFunction) -> Callable:
    """``fused`` as another function object (for a second jax.jit with its own trace cache)."""

    @functools.wraps(fused._fn)
    def call(*args, **kwargs):
        return fused(*args, **kwargs)

    return call


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def jit(fn: Callable | None = None, *, patterns: Iterable[str] | None = None,
        implementation: str | None = None, report: bool | None = None,
        strict: bool | None = None, **jit_kwargs) -> Any:
    """A drop-in ``jax.jit`` that fuses ``fn`` first.

    Every keyword jax.jit takes (``static_argnums``, ``static_argnames``, ``donate_argnums``,
    ``in_shardings``, ``out_shardings``, ...) is passed through. The result lowers like jax.jit's:
    ``jfuse.jit(f).lower(*args).compile().memory_analysis()`` and
    ``jfuse.jit(f).trace(*args).lower(lowering_platforms=("tpu",))`` work.

    Example::

        @jfuse.jit(report=True)
        def train_step(params, batch):
            return jax.value_and_grad(loss)(params, batch)
    """
    if fn is None:
        return lambda f: jit(f, patterns=patterns, implementation=implementation, report=report,
                             strict=strict, **jit_kwargs)
    fused = fuse(fn, patterns=patterns, implementation=implementation, report=report,
                 strict=strict)
    return JittedFusedFunction(fused, jax.jit(fused, **jit_kwargs),
                               jit_kwargs.get("in_shardings"), jit_kwargs)


def explain(
    fn: Callable,
    *,
    patterns: Iterable[str] | None = None,
    implementation: str | None = None,
    **jit_kwargs,
) -> Callable[..., FusionReport]:
    """What jfuse would do to ``fn``, without running it.

    Returns a function taking ``fn``'s arguments (arrays or ``jax.ShapeDtypeStruct``) and
    returning the :class:`FusionReport`. Only tracing happens: nothing is compiled or executed.

    Example::

        print(jfuse.explain(mlp)(params, jax.ShapeDtypeStruct((8, 512), jnp.float32)))
    """
    fused = fuse(fn, patterns=patterns, implementation=implementation, report=False, strict=False)
    jitted = jax.jit(fused, **jit_kwargs)

    def run(*args, **kwargs) -> FusionReport:
        jitted.trace(*args, **kwargs)
        return fused.last_report

    return run
