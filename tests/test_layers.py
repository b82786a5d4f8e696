"""Imports point one way: the JAX seam and the shared vocabulary sit below every layer.

Read from the source with ``ast`` (nothing is imported), so a new module that reaches upwards, or
a new ``jax._src`` import outside the seam, fails here with the file and the import named.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jfuse"


def _imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports (absolute names), at any depth in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules(*relative: str) -> list[pathlib.Path]:
    paths = []
    for name in relative:
        target = PACKAGE / name
        paths += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return paths


# (modules, the jfuse packages they must not import)
RULES = [
    (("_jax",), ("jfuse.",)),  # the seam imports nothing from jfuse but itself
    (("core",), ("jfuse.api", "jfuse.rewrite", "jfuse.graph", "jfuse.passes", "jfuse.ops",
                 "jfuse.pallas", "jfuse.sharding", "jfuse.shared_calls", "jfuse.config")),
    (("graph.py", "rewrite.py", "shared_calls.py", "sharding"), ("jfuse.ops", "jfuse.pallas")),
    (("config.py",), ("jfuse.passes", "jfuse.rewrite", "jfuse.api")),
    # api -> rewrite -> passes -> ops -> pallas: kernels know no op, ops no pattern, and a pass
    # asks its op (not pallas/) what each platform refuses.
    (("pallas",), ("jfuse.ops", "jfuse.passes", "jfuse.rewrite", "jfuse.api", "jfuse.graph")),
    (("ops",), ("jfuse.passes", "jfuse.rewrite", "jfuse.api", "jfuse.graph")),
    (("passes",), ("jfuse.pallas", "jfuse.rewrite", "jfuse.api")),
]


@pytest.mark.parametrize("modules, forbidden", RULES)
def test_layers_import_only_downwards(modules, forbidden):
    for path in _modules(*modules):
        for name in _imports(path):
            if modules == ("_jax",) and name.startswith("jfuse._jax"):
                continue
            bad = [f for f in forbidden if name == f or name.startswith(f if f.endswith(".")
                                                                        else f + ".")]
            assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {name}"


def test_private_jax_is_imported_only_behind_the_seam():
    for path in _modules("."):
        if "_jax" in path.relative_to(PACKAGE).parts:
            continue
        private = [name for name in _imports(path) if name.startswith("jax._src")]
        assert not private, f"{path.relative_to(PACKAGE.parent)} imports {private}"
