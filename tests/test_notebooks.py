"""The notebooks in notebooks/ run top to bottom, and print what their markdown says they print.

Each notebook runs with nbclient in a fresh IPython kernel started from *this* interpreter
(``sys.executable``), whatever kernelspecs are installed, with ``notebooks/`` as its working
directory and the test's environment (so ``JFUSE_RAISE=1`` from conftest applies) plus
``MPLBACKEND=Agg``. Any cell that raises fails the test, and so do the notebooks' own asserts
(that the model fused, that jfuse and jax.jit agree, that each kernel lowers).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT_S = 300

# Appended to the in-memory copy of each notebook: which interpreter ran it, where, with which
# environment, and how many figures it drew (Agg keeps them open after plt.show()).
_PROBE = """\
import json, os, sys
import matplotlib.pyplot as plt
print("PROBE", json.dumps([sys.executable, os.getcwd(), os.environ.get("MPLBACKEND"),
                           os.environ.get("JFUSE_RAISE"), len(plt.get_fignums())]))
"""


class _ThisInterpreter(KernelSpecManager):
    """Every kernel name resolves to an ipykernel on ``sys.executable``."""

    def get_kernel_spec(self, kernel_name, *args, **kwargs):
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})",
            language="python",
            env={"MPLBACKEND": "Agg"},
        )


def _run(name: str) -> tuple[str, int]:
    """Execute ``notebooks/<name>``; return its text outputs, joined, and how many figures it drew."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
    km = KernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreter())
    client = nbclient.NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell raises
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                texts.append(output["text"])
            elif "data" in output and "text/plain" in output["data"]:
                texts.append(output["data"]["text/plain"])
    text = "\n".join(texts)
    probe = [line for line in text.splitlines() if line.startswith("PROBE ")]
    assert probe, "the probe cell printed nothing"
    executable, cwd, backend, raise_flag, figures = json.loads(probe[-1].removeprefix("PROBE "))
    assert executable == sys.executable
    assert pathlib.Path(cwd).resolve() == NOTEBOOKS
    assert backend == "Agg"
    assert raise_flag == os.environ.get("JFUSE_RAISE")
    return text, figures


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name} has outputs; clear them before committing")


def test_quickstart_notebook():
    text, figures = _run("quickstart.ipynb")
    assert "jfuse fusion report: train_step" in text
    assert "at Cell In[" in text  # report locations name the notebook cell, as tracebacks do
    assert "step.report.fused =" in text and "glu" in text and "add_rms_norm" in text
    assert "'attention': 2" in text and "'linear_cross_entropy': 1" in text
    assert "memory ratio" in text and "time ratio" in text
    assert figures == 1  # the loss curves


def test_kernels_notebook():
    text, figures = _run("kernels.ipynb")
    assert "tpu_custom_call" in text and "xla.gpu.triton" in text
    # On GPU the f32 linear and GLU run XLA (its TF32 GEMMs beat the f32 Triton kernels).
    assert "kernel calls lowered for tpu: 5, for cuda: 3, for cpu: 0" in text
    assert "(bfloat16) lowered for cuda: 0 kernel call(s)" in text
    assert "(bfloat16) lowered for tpu: 1 kernel call(s)" in text
    # every op checked against its reference twice: default implementation and interpret mode
    assert text.count("max |op - reference|") == 10
    assert 'implementation="interpret":' in text
    assert figures == 1  # the timing plot
