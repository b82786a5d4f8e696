"""The report's text at real model sizes: grouped, misses first, one screen for 80 layers.

These tests pin the shape of the text (a bound on its line count, grouped counts, the order of
its sections, its width), not its exact wording; ``report.sites`` and ``to_dict()`` must still
hold every site.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

import jfuse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import models  # noqa: E402


def _llama_report(n_layers: int, loss=models.llama_loss):
    params = models.init_llama(jax.random.key(0), n_layers, 32, 64, 64)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    return jfuse.explain(models.sgd_step(loss))(params, tokens)


def _with_a_miss(params, tokens):
    """The Llama loss, plus a block that nearly fuses in every layer: a sin epilogue."""
    x = params["embed"][tokens[:, :-1]]
    for layer in params["layers"]:
        x = x + jnp.sin(x @ layer["wo"] + 1.0)
    return jnp.mean(x**2) + models.llama_loss(params, tokens)


# One terminal screen (40 lines): six patterns' groups, their totals and a summary line.
SCREEN = 40


@pytest.mark.parametrize("n_layers", [32, pytest.param(80, marks=pytest.mark.slow)])
def test_a_deep_model_reads_in_one_screen(n_layers):
    report = _llama_report(n_layers)
    text = str(report)
    lines = text.splitlines()
    assert len(lines) <= SCREEN, text
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    assert f"glu ×{n_layers}" in text and f"add_rms_norm ×{n_layers}" in text
    assert f"attention ×{n_layers}" in text
    # Nothing is lost from the data: one entry per site, and the verbose text lists them all
    # (per layer attention, two norms and the GLU; then the final norm and the LM head's loss).
    assert len(report.sites) == sum(report.fused.values()) == 4 * n_layers + 2
    assert len(report.to_dict()["sites"]) == len(report.sites)
    assert len(report.text(verbose=True).splitlines()) > 2 * len(report.sites)


def test_misses_come_first_then_fused_groups_then_totals():
    params = models.init_llama(jax.random.key(0), 32, 32, 64, 64)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    report = jfuse.explain(models.sgd_step(_with_a_miss))(params, tokens)
    text = str(report)
    lines = text.splitlines()
    assert len(report.missed) == 32 and len(lines) <= SCREEN, text
    missed, fused = text.index("  missed:"), text.index("  fused:")
    totals, summary = text.index("  pattern "), text.index(f"  jfuse {report.function}")
    assert missed < fused < totals < summary
    assert "linear ×32" in text[missed:fused] and "unsupported activation" in text[missed:fused]
    totals_rows = {line.split()[0]: line.split()[1:3] for line in lines[lines.index(
        next(line for line in lines if line.startswith("  pattern "))) + 1:] if line.startswith("  ")
        and not line.startswith("  jfuse") and not line.startswith("    ")}
    assert totals_rows["linear"] == ["32", "32"], totals_rows  # 32 fused (bias), 32 missed


def test_identical_sites_group_only_when_everything_matches():
    report = _llama_report(4)
    groups = [line for line in str(report).splitlines() if line.startswith("    add_rms_norm")]
    # The block's two norms differ in their source line, the last one in "sum not needed".
    assert len(groups) == 3, str(report)
    assert sum(int(g.split("×")[1].split()[0]) if "×" in g else 1 for g in groups) == 8


def test_the_totals_say_where_the_kernel_runs():
    def block(x, wg, wu, wg2, wu2):
        h = jax.nn.silu(x @ wg) * (x @ wu)           # K = 64: kernel on GPU
        return jax.nn.silu(h @ wg2) * (h @ wu2)      # K = 2048 in bf16: XLA on GPU

    shapes = [(16, 64), (64, 2048), (64, 2048), (2048, 64), (2048, 64)]
    args = [jnp.ones(s, jnp.bfloat16) for s in shapes]
    text = str(jfuse.explain(block)(*args))
    row = next(line for line in text.splitlines() if line.startswith("  glu "))
    assert row.endswith("TPU kernel, GPU kernel 1/2"), row


def test_sites_in_a_scan_body_say_they_run_once_per_iteration():
    params = models.stack_layers(models.init_llama(jax.random.key(0), 6, 32, 64, 64))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    report = jfuse.explain(models.sgd_step(models.llama_scan_loss))(params, tokens)
    in_body = [s for s in report.sites if s.iterations > 1]
    assert in_body and all(s.iterations == 6 for s in in_body), report.to_dict()["sites"]
    assert {s.pattern for s in in_body} >= {"glu", "add_rms_norm"}
    assert "once per iteration of a 6-step loop" in str(report)
    assert report.bytes_saved == sum(s.bytes_saved * s.iterations for s in report.sites)
    assert report.to_dict()["sites"][0]["iterations"] >= 1


def test_long_paths_are_shortened():
    from jfuse._jax.source import short_path

    assert short_path("/opt/venv/lib/python3.12/site-packages/flax/linen/linear.py") == \
        "flax/linen/linear.py"
    assert short_path("/home/someone/projects/deep/down/model.py") == "…/deep/down/model.py"
    assert short_path(str(pathlib.Path.cwd() / "pkg" / "model.py")) == "pkg/model.py"
