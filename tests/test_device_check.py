"""The device check (``python -m benchmarks.device_check``): its CPU dry run, and its verdicts.

The command exists for the rare minutes a GPU is lent; these tests keep it working in between.
The dry run goes through every part (machine, correctness, ops, steps) in interpret mode at tiny
sizes and must finish clean. The verdict logic must flag a wrong kernel and turn a failing one
into a row instead of a crash, and the budget must skip what does not fit and say so.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import jax
import numpy as np
import pytest

import jfuse

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def device_check(monkeypatch):
    """The ``benchmarks`` package (a folder beside ``tests``, not installed)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import device_check, kernel_checks

    return device_check, kernel_checks


def _rows(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_ops_part_times_only_ops_that_have_a_kernel(device_check):
    # The first H200 run forced "pallas" on the LM head's loss, which has no kernel: four error
    # rows. Every other op of the device preset is still timed.
    command, _ = device_check
    from benchmarks import ops as op_benchmarks

    every = op_benchmarks.cases("device")
    timed = command.kernel_op_cases("device")
    assert {c.op for c in every} - {c.op for c in timed} == {"linear_cross_entropy"}
    assert [c for c in every if c.op != "linear_cross_entropy"] == timed


def test_dry_run_runs_every_part_clean(device_check, tmp_path, capsys):
    command, kernel_checks = device_check
    # A budget no loaded machine exhausts: this test is about every part running clean (the
    # budget's skipping has its own test); the default 60 s skipped cases under a parallel suite.
    assert command.main(["--dry-run", "--budget-s", "900", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "device_check_dry_run_cpu.csv")
    sections = {r["section"] for r in rows}
    assert sections == {"machine", "correctness", "ops", "steps"}, sections
    checks = [r for r in rows if r["section"] == "correctness"]
    assert len(checks) == len(kernel_checks.checks("tiny"))
    assert {r["status"] for r in checks} == {"ok"}, [(r["case"], r["detail"]) for r in checks]
    assert {r["op"] for r in checks} == {"linear", "glu", "rms_norm", "add_rms_norm",
                                         "layer_norm", "add_layer_norm", "attention"}
    assert all(float(r["err"]) < 1e-5 for r in checks)
    ops = [r for r in rows if r["section"] == "ops"]
    assert ops and all(r["fused_impl"] == "interpret" and float(r["fused_ms"]) > 0 for r in ops)
    steps = [r for r in rows if r["section"] == "steps"]
    assert steps and all(r["status"] == "ok" and int(r["sites"]) > 0 for r in steps)
    summary = (tmp_path / "device_check_dry_run_cpu.md").read_text()
    assert summary.startswith("# Device check: cpu")
    assert "DRY RUN" in summary and "## Correctness against float64" in summary
    assert "## Skipped" not in summary
    assert "0 failure(s)" in capsys.readouterr().out


def test_the_device_grid_covers_every_kernel_path(device_check):
    _, kernel_checks = device_check
    grid = kernel_checks.checks("device")
    linear = [c for c in grid if c.pattern == "linear"]
    assert {(c.variant.split("+")[0].split(",")[0], c.dtype) for c in linear} == {
        (a or "identity", d) for a in kernel_checks.ACTIVATIONS for d in kernel_checks.DTYPES}
    assert {c.mode for c in linear} == set(kernel_checks.MODES)
    assert any("W (N, K)" in c.variant for c in linear) and any("bias" in c.variant for c in linear)
    glu = [c for c in grid if c.pattern == "glu"]
    assert {layout for layout in kernel_checks.GLU_LAYOUTS if any(layout in c.variant for c in glu)} \
        == set(kernel_checks.GLU_LAYOUTS)
    assert {c.variant.split(" gate")[0] for c in glu} == set(kernel_checks.GATES)
    norms = [c for c in grid if c.is_norm]
    assert {c.pattern for c in norms} == {"rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm"}
    assert {c.shape[1] for c in norms} == {4096, 4095, 8193}
    assert any("(1 + w)" in c.variant for c in norms)
    assert {c.dtype for c in grid} == set(kernel_checks.DTYPES)
    assert len({c.name for c in grid}) == len(grid)
    attention = [c for c in grid if c.pattern == "attention"]
    assert {c.variant for c in attention} == {"causal", "no mask", "causal GQA", "causal S=T/2"}
    assert {c.dtype for c in attention} == set(kernel_checks.DTYPES)
    # Fewer keys than queries (top-left causal) on each GPU kernel: cuDNN (bf16), Triton (f32).
    cross = [c for c in attention if c.variant == "causal S=T/2"]
    assert {c.dtype for c in cross} == {"bfloat16", "float32"}
    assert all(c.shapes[1][1] * 2 == c.shapes[0][1] for c in cross)
    # A budget-cut run still covers every kernel: the first cases take each family in turn.
    assert {c.pattern for c in grid[:7]} == {"linear", "glu", "rms_norm", "add_rms_norm",
                                             "layer_norm", "add_layer_norm", "attention"}


def test_a_wrong_answer_is_a_mismatch(device_check, monkeypatch):
    _, kernel_checks = device_check
    check = kernel_checks.checks("tiny")[0]
    assert kernel_checks.run_check(check, "interpret")["status"] == "ok"

    # A kernel bug, simulated: what jfuse compiles is 0.1% off; jax.jit and float64 are right.
    real_jit = jfuse.jit

    def buggy_jit(fn, **kwargs):
        return real_jit(lambda *args: jax.tree.map(lambda y: y * 1.001, fn(*args)), **kwargs)

    monkeypatch.setattr(kernel_checks.jfuse, "jit", buggy_jit)
    row = kernel_checks.run_check(check, "interpret")
    assert row["status"] == "mismatch" and row["err"] > 1e-4, row


def test_a_failing_kernel_is_a_row_not_a_crash(device_check):
    _, kernel_checks = device_check
    check = kernel_checks.checks("tiny")[0]

    def broken(compute_dtype):
        def fn(*args):
            raise RuntimeError("Triton compilation failed: simulated")
        return fn

    row = kernel_checks.run_check(dataclasses.replace(check, block=broken), "interpret")
    assert row["status"] == "error" and "simulated" in row["detail"], row


def test_verdict_accepts_no_worse_than_jax_jit(device_check):
    _, kernel_checks = device_check
    check = next(c for c in kernel_checks.checks("tiny") if c.pattern == "linear" and c.mode == "fwd")
    want = [np.linspace(-1.0, 1.0, 64)]
    off = lambda rel: [want[0] + rel]  # an absolute error of `rel` (max |want| = 1)
    assert kernel_checks.compare_outputs(check, off(1e-6), want, off(0.0))["ok"]
    assert not kernel_checks.compare_outputs(check, off(1e-3), want, off(0.0))["ok"]
    # TF32-like: both far from float64, the kernel no worse than twice jax.jit's error.
    assert kernel_checks.compare_outputs(check, off(1e-3), want, off(6e-4))["ok"]
    assert not kernel_checks.compare_outputs(check, off(1e-3), want, off(4e-4))["ok"]
    assert not kernel_checks.compare_outputs(check, [want[0] * np.nan], want, want)["ok"]


def test_the_budget_skips_what_does_not_fit_and_lists_it(device_check, tmp_path):
    command, _ = device_check
    assert command.main(["--dry-run", "--budget-s", "0.001", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "device_check_dry_run_cpu.csv")
    assert {r["section"] for r in rows} == {"machine"}
    summary = (tmp_path / "device_check_dry_run_cpu.md").read_text()
    assert "## Skipped (out of budget)" in summary
    assert "- correctness: linear" in summary and "- steps: MLP" in summary


def test_unknown_part_is_a_clear_error(device_check, capsys):
    command, _ = device_check
    with pytest.raises(SystemExit):
        command.main(["--dry-run", "--parts", "correctness,speed"])
    assert "unknown ['speed']" in capsys.readouterr().err
