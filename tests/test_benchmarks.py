"""The benchmark command (``benchmarks/run.py``) and the helpers it uses in ``jfuse.benchmarking``.

The command runs in quick mode, in this process, into a temporary folder: it must write a CSV
with one row per case and finite positive times, a markdown report that opens with the machine
line, and a PNG. Nothing here asserts a timing.
"""

from __future__ import annotations

import csv
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from lowering import lower_for

from jfuse import benchmarking, ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def bench(monkeypatch):
    """The ``benchmarks`` package (a folder beside ``tests``, not installed)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import ops as op_benchmarks
    from benchmarks import run, steps

    return run, op_benchmarks, steps


def _read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _positive(value: str) -> bool:
    return math.isfinite(float(value)) and float(value) > 0


def test_quick_run_writes_csv_markdown_and_png(bench, tmp_path, capsys):
    run, op_benchmarks, steps = bench
    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]

    csv_path, md_path, png_path = (tmp_path / f"benchmarks.{ext}" for ext in ("csv", "md", "png"))
    rows = _read_csv(csv_path)
    expected = [("ops", c.name) for c in op_benchmarks.cases("quick")]
    expected += [("models", c.name) for c in steps.cases("quick")]
    assert [(r["section"], r["case"]) for r in rows] == expected
    assert len(progress) == len(rows) and progress[0].startswith(f"[1/{len(rows)}] ")

    # Every op in both passes, and the three kinds of model.
    op_rows = [r for r in rows if r["section"] == "ops"]
    declared = {benchmark.name for benchmark in ops.BENCHMARKS}
    assert declared >= {"linear", "glu", "rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm"}
    assert {(r["op"], r["mode"]) for r in op_rows} == {
        (op, mode) for op in declared for mode in ("fwd", "fwd+bwd")
    }
    model_rows = [r for r in rows if r["section"] == "models"]
    for kind in ("MLP gelu", "SwiGLU MLP", "Llama-style unrolled", "Llama-style scan over"):
        assert any(r["case"].startswith(kind) for r in model_rows), kind

    for row in rows:
        for key in ("ref_ms", "fused_ms", "time_ratio", "ref_compile_s", "fused_compile_s"):
            assert _positive(row[key]), (row["case"], key, row[key])
        assert row["backend"] == jax.default_backend()
        if jax.default_backend() == "cpu":  # the default implementation is XLA's here
            assert row["fused_impl"] == "xla"
            assert row["fused_roofline_frac"] == ""
            assert row["same_program"] == ("True" if row["section"] == "ops" else "")
    for row in op_rows:
        assert _positive(row["bytes"]) and _positive(row["fused_gb_s"])
        assert _positive(row["flops"]) == (row["op"] in ("linear", "glu", "attention",
                                                         "linear_cross_entropy"))  # matmuls
        assert float(row["rel_diff"]) < 1e-2
    for row in model_rows:
        assert _positive(row["ref_temp_MiB"]) and _positive(row["temp_ratio"])
        assert row["fused_sites"] and row["fallbacks"] == "0"
    scan = next(r for r in model_rows if "scan" in r["case"])
    assert "glu=1" in scan["fused_sites"]  # fused inside the scan body: one site for all layers

    text = md_path.read_text()
    assert text.splitlines()[0] == f"Machine: {benchmarking.machine_description()}"
    assert f"jax {jax.__version__}" in text.splitlines()[2]
    assert "## Fused ops" in text and "## Training steps" in text
    assert all(r["case"] in text for r in rows)

    png = png_path.read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000


def test_op_cases_count_flops_and_bytes(bench):
    _, op_benchmarks, _ = bench
    linear = op_benchmarks.OpCase("linear", (8, 4, 16), "float32", "fwd", "gelu_tanh")
    assert linear.flops() == 2 * 8 * 4 * 16
    assert linear.bytes_moved() == 4 * (8 * 4 + 4 * 16 + 16 + 8 * 16)  # x, w, b in; y out
    backward = op_benchmarks.OpCase("linear", (8, 4, 16), "float32", "fwd+bwd", "gelu_tanh")
    assert backward.flops() == 3 * linear.flops()
    assert backward.bytes_moved() == 2 * linear.bytes_moved()  # + cotangent in, gradients out
    glu = op_benchmarks.OpCase("glu", (8, 4, 16), "bfloat16", "fwd", "silu")
    assert glu.flops() == 2 * 2 * 8 * 4 * 16
    assert glu.bytes_moved() == 2 * (8 * 4 + 2 * 4 * 16 + 8 * 16)
    norm = op_benchmarks.OpCase("add_layer_norm", (8, 32), "float32", "fwd")
    assert norm.flops() == 0 and norm.bound == "memory"
    assert norm.bytes_moved() == 4 * (2 * 8 * 32 + 2 * 32 + 2 * 8 * 32)  # x, r, scale, bias; y, h
    # The accelerator sizes are only counted here (shapes alone, nothing allocated).
    assert all(c.bytes_moved() > 0 for c in op_benchmarks.cases("accelerator"))
    assert len({c.name for c in op_benchmarks.cases("accelerator")}) == len(
        op_benchmarks.cases("accelerator"))


def test_cudnn_baseline_is_timed_only_in_the_dtypes_cudnn_takes(bench):
    """cuDNN's flash attention refuses f32: the device check times that baseline in bf16 only,
    rather than spending device time on an error row."""
    _, op_benchmarks, _ = bench
    device = op_benchmarks.cases("device")
    against_cudnn = {(c.dtype, c.mode) for c in device if c.activation == "causal vs cudnn"}
    assert against_cudnn == {("bfloat16", "fwd"), ("bfloat16", "fwd+bwd")}
    assert {c.dtype for c in device if c.activation == "causal vs dense"} == {"bfloat16", "float32"}


def test_op_case_programs_run_both_passes(bench):
    _, op_benchmarks, _ = bench
    case = op_benchmarks.OpCase("add_rms_norm", (8, 32), "float32", "fwd+bwd")
    args = case.arguments()
    (normed, summed), grads = jax.jit(case.program("xla"))(*args)
    x, r, scale = args[0]
    assert normed.shape == summed.shape == x.shape
    assert [g.shape for g in grads] == [x.shape, r.shape, scale.shape]


@pytest.mark.parametrize("platform, expected", [
    ("tpu", {"pallas-mosaic": 1}),
    ("cuda", {"pallas-triton": 1}),
    ("cpu", {}),
])
def test_kernel_calls_see_which_implementation_runs(platform, expected):
    x, scale = jnp.ones((16, 256)), jnp.ones(256)
    text = lower_for(lambda x, s: ops.rms_norm(x, s), x, scale, platform=platform)
    assert benchmarking.kernel_calls(text) == expected
    assert benchmarking.implementation_label(expected) == (
        "xla" if not expected else f"{next(iter(expected))} x1")
    forced_xla = lower_for(lambda x, s: ops.rms_norm(x, s, implementation="xla"), x, scale,
                           platform=platform)
    assert benchmarking.kernel_calls(forced_xla) == {}


def test_kernel_calls_count_each_call_of_a_private_function():
    """A kernel inside a jitted function called three times runs three times."""
    x, scale = jnp.ones((16, 256)), jnp.ones(256)
    norm = jax.jit(lambda x, s: ops.rms_norm(x, s))

    def three_norms(x, s):
        return norm(norm(norm(x, s), s), s)

    text = lower_for(three_norms, x, scale, platform="tpu")
    assert text.count("tpu_custom_call") < 3  # the kernel's text is there once, in the function
    assert benchmarking.kernel_calls(text) == {"pallas-mosaic": 3}


@pytest.mark.parametrize("device_kind, chip", [
    ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"),
    ("TPU v5", "TPU v5p"),
    ("TPU v5p", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
    ("cpu", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_chip_peaks_by_device_kind(device_kind, chip):
    peak = benchmarking.chip_peak(device_kind)
    assert (peak.chip if peak else None) == chip
    if peak:
        assert peak.hbm_gb_s > 0 and peak.matmul_tflops["bfloat16"] >= peak.matmul_tflops["float32"]


def test_no_roofline_on_cpu():
    if jax.default_backend() == "cpu":
        assert benchmarking.chip_peak() is None


def test_roofline_is_the_slower_of_compute_and_memory():
    peak = benchmarking.ChipPeak("test", hbm_gb_s=1000, matmul_tflops={"float32": 100.0},
                                 source="")
    assert benchmarking.roofline_seconds(1e12, 1e6, "float32", peak) == pytest.approx(0.01)
    assert benchmarking.roofline_seconds(0, 1e9, "bfloat16", peak) == pytest.approx(1e-3)


def test_interleaved_medians_alternate_and_time_every_function():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "ab"}
    medians = benchmarking.interleaved_medians(calls, repeats=4, warmup=1)
    assert order == list("ab" + "abbaabba")
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())
    order.clear()
    benchmarking.interleaved_medians(calls, repeats=1, warmup=1, min_sample_s=1e-3)
    assert order.count("a") > 2  # short calls are batched into samples of at least 1 ms


def test_compare_keeps_its_row_and_counts_kernels():
    def step(w, x):
        return jnp.sum(jax.nn.gelu(x @ w) ** 2)

    w, x = jnp.ones((32, 64)) / 32, jnp.ones((16, 32))
    result = benchmarking.compare("tiny", jax.grad(step), w, x, repeats=2, warmup=1)
    assert list(result.row()) == [
        "case", "jax_temp_MiB", "jfuse_temp_MiB", "temp_ratio", "jax_step_ms", "jfuse_step_ms",
        "time_ratio", "jax_compile_s", "jfuse_compile_s", "fused",
    ]
    assert result.jax_step_s > 0 and result.jfuse_step_s > 0
    if jax.default_backend() == "cpu":
        assert result.jfuse_kernel_calls == {}


def test_markdown_and_plot_with_a_roofline(bench, tmp_path):
    """What a GPU run writes (a chip with known peaks), from made-up rows."""
    run, _, _ = bench
    peak = benchmarking.chip_peak("NVIDIA H100 80GB HBM3")
    common = {"section": "ops", "ref": "implementation='xla'", "fused": "implementation=None",
              "ref_ms": 2.0, "fused_ms": 1.0, "time_ratio": 0.5, "ref_temp_MiB": 1.0,
              "fused_temp_MiB": 1.0, "chip": peak.chip, "roofline_ms": 0.5,
              "ref_roofline_frac": 0.25, "fused_roofline_frac": 0.5,
              "fused_impl": "pallas-triton x1"}
    rows = [
        {**common, "case": "glu silu 8x8x8 bf16 fwd", "op": "glu", "mode": "fwd",
         "bound": "compute", "ref_tflops": 100.0, "fused_tflops": 200.0, "ref_gb_s": 1.0,
         "fused_gb_s": 2.0},
        {**common, "case": "rms_norm 8x8 bf16 fwd+bwd", "op": "rms_norm", "mode": "fwd+bwd",
         "bound": "memory", "ref_tflops": None, "fused_tflops": None, "ref_gb_s": 1000.0,
         "fused_gb_s": 2000.0},
        {"section": "models", "case": "Llama-style scan over 2 layers", "mode": "train step",
         "fused_impl": "pallas-triton x3", "ref_ms": 10.0, "fused_ms": 9.0, "time_ratio": 0.9,
         "ref_temp_MiB": 10.0, "fused_temp_MiB": 8.0, "temp_ratio": 0.8, "ref_compile_s": 1.0,
         "fused_compile_s": 1.5, "fused_sites": "glu=1", "fallbacks": 0},
    ]
    info = dict(benchmarking.machine_info(), backend="gpu", device_kind="NVIDIA H100 80GB HBM3")
    text = run.markdown(rows, info, "preset accelerator", peak)
    assert "Roofline: H100 SXM, 3350 GB/s" in text
    assert "| 200 TFLOP/s (100 TFLOP/s) | 50% (25%) |" in text
    assert "2000 GB/s (1000 GB/s)" in text
    run.write_csv(rows, tmp_path / "b.csv")
    assert [r["fused_roofline_frac"] for r in _read_csv(tmp_path / "b.csv")] == ["0.5", "0.5", ""]
    run.plot(rows, tmp_path / "b.png", "title")
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("command", [["benchmarks/run.py"], ["-m", "benchmarks"]])
def test_command_line_entry_points(command):
    """``python benchmarks/run.py`` and ``python -m benchmarks`` find the package as scripts."""
    result = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "--out" in result.stdout
