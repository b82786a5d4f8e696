"""One command for a GPU (or TPU) window: compile, verify and time every kernel natively.

Run from the repository root, with nothing installed but jax (the device machine has no
network)::

    PYTHONPATH=. python -m benchmarks.device_check                 # ~7 min on one H100
    PYTHONPATH=. python -m benchmarks.device_check --dry-run       # CPU, interpret mode, < 1 min
    PYTHONPATH=. python -m benchmarks.device_check --budget-s 300 --out /tmp/check

Four parts, in this order, each a section of one CSV:

1. ``machine``: device kind, jax / jaxlib / plugin versions, whether the Triton and Mosaic
   Pallas backends import, the cuDNN version jaxlib has (attention's first GPU kernel).
2. ``correctness`` (:mod:`benchmarks.kernel_checks`): every kernel code path compiled natively
   (``implementation="pallas"``) through ``jfuse.jit`` and run, forward and forward+backward,
   f32, bf16 and f16, against float64 on the host; each row names the kernels that ran (GPU
   attention: cuDNN for f16/bf16, Triton for f32). A compile error, a mismatch or a declined
   kernel is a row with its reason, never the end of the run.
3. ``ops`` (:mod:`benchmarks.ops`, preset ``device``): each op's kernel against its XLA
   implementation at the sizes models run, medians of interleaved repeats, achieved TFLOP/s or
   GB/s and the fraction of the chip's roofline; the ``ran`` column says which kernel (GPU
   attention: cuDNN in bf16, Triton in f32; and jfuse against jax.nn's own cuDNN attention).
4. ``steps`` (:mod:`benchmarks.steps`, preset ``accelerator``): training steps under
   ``jfuse.jit`` against ``jax.jit`` (time, temp memory, compile time), with the kernel calls of
   each compiled step counted against its fused sites.

The run stays inside ``--budget-s``: each part may run until its share of the budget is spent
(correctness to 35%, ops to 65%, steps to 100%; time a part leaves over goes to the next), a case
is started only if the part's typical case still fits, and what did not fit is listed as skipped.
Rows are written as they come (the CSV is rewritten after each one, output is flushed), so a run
cut off by its time limit leaves what it measured. ``--dry-run`` runs the same code on the CPU in
interpret mode with tiny sizes; the test suite runs it so the command never rots.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.metadata
import math
import pathlib
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax

from benchmarks import kernel_checks
from benchmarks import ops as op_benchmarks
from benchmarks import steps as step_benchmarks
from jfuse._jax import cudnn
from jfuse.benchmarking import chip_peak, machine_info

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "device"
# Each part may run until this fraction of the budget has passed.
PART_DEADLINES = {"correctness": 0.35, "ops": 0.65, "steps": 1.0}
PARTS = tuple(PART_DEADLINES)
_PLUGIN_DISTRIBUTIONS = re.compile(r"^(jax[-_]cuda|jax[-_]rocm|libtpu|jax[-_]tpu|jax[-_]plugin)",
                                   re.IGNORECASE)


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS,
                        help=f"output folder (default {RESULTS})")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget in seconds (default 420; 60 with --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, interpret mode, tiny sizes: the same code path in < 1 min")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 60.0 if args.dry_run else 420.0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; expected some of {list(PARTS)}")
    args.parts = parts
    return args


# ------------------------------------------------------------------------------------------------
# Output: rows as they come
# ------------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "device"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value).replace("\n", " ")


class Results:
    """The run's rows, kept on disk as they come: ``<stem>.csv`` is rewritten after every row."""

    def __init__(self, out: pathlib.Path, stem: str):
        out.mkdir(parents=True, exist_ok=True)
        self.csv_path = out / f"{stem}.csv"
        self.md_path = out / f"{stem}.md"
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields and k != "traceback"]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: _cell(r.get(k)) for k in fields} for r in self.rows)

    def section(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["section"] == name]


def say(text: str = "") -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------------
# The parts
# ------------------------------------------------------------------------------------------------

def _importable(module: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
        return "yes"
    except Exception as error:  # noqa: BLE001 (any failure to import is the answer)
        return f"no ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"


def machine_rows() -> list[dict[str, Any]]:
    """What the results depend on: device, versions, which Pallas backends import."""
    info = machine_info()
    plugins = sorted(f"{d.metadata['Name']} {d.version}" for d in importlib.metadata.distributions()
                     if _PLUGIN_DISTRIBUTIONS.match(d.metadata.get("Name") or ""))
    facts = {
        **info,
        "plugins": ", ".join(plugins) or "none",
        "pallas_triton": _importable("jax.experimental.pallas.triton"),
        "pallas_mosaic_tpu": _importable("jax.experimental.pallas.tpu"),
        "pallas_mosaic_gpu": _importable("jax.experimental.pallas.mosaic_gpu"),
        # jaxlib's cuDNN (e.g. 91000 for 9.10): jfuse's GPU attention runs it where it serves.
        "cudnn": str(cudnn.version() or "none"),
        "chip_peak": getattr(chip_peak(), "chip", "unknown (no roofline)"),
    }
    return [{"section": "machine", "case": key, "value": value} for key, value in facts.items()]


class Clock:
    """The run's budget: each part runs cases while its deadline (a fraction of the budget,
    measured from the start) leaves room for one more of its typical case."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, part: str, case_seconds: list[float]) -> bool:
        deadline = PART_DEADLINES[part] * self.budget_s
        typical = statistics.median(case_seconds) if case_seconds else 0.0
        return self.elapsed() + typical <= deadline


def run_part(part: str, cases: Iterable[Any], run_one: Callable[[Any], dict[str, Any]],
             describe: Callable[[dict[str, Any]], str], results: Results, clock: Clock) -> None:
    """Run ``cases`` in order while they fit the part's share of the budget; one row each."""
    cases = list(cases)
    seconds: list[float] = []
    say(f"\n== {part}: {len(cases)} cases (elapsed {clock.elapsed():.0f} s of "
        f"{clock.budget_s:.0f} s)")
    for index, case in enumerate(cases):
        if not clock.fits(part, seconds):
            names = [getattr(c, "name", str(c)) for c in cases[index:]]
            results.skipped += [f"{part}: {name}" for name in names]
            say(f"   skipped {len(names)} {part} case(s): out of budget")
            return
        start = time.perf_counter()
        try:
            row = run_one(case)
        except Exception as error:  # noqa: BLE001 (one case's failure is a row)
            row = {"section": part, "case": getattr(case, "name", str(case)), "status": "error",
                   "detail": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}",
                   "traceback": traceback.format_exc(limit=-3)[-1500:]}
        seconds.append(time.perf_counter() - start)
        row.setdefault("status", "ok")
        results.add(row)
        say(f"   [{index + 1}/{len(cases)}] {describe(row)}")
        if row["status"] == "error" and row.get("traceback"):
            say("      " + row["traceback"].strip().splitlines()[-1][:300])


def _describe_correctness(row: dict[str, Any]) -> str:
    verdict = f"{row['status']:9} {row['case']}"
    if "err" in row:
        kernels = row.get("kernel_kinds", row.get("kernels"))
        verdict += (f"  err {row['err']:.2e} (jax.jit {row['jax_jit_err']:.2e}, "
                    f"{row['worst_output']})  kernels {kernels}")
    if row.get("detail"):
        verdict += f"  {row['detail'][:200]}"
    return verdict


def _describe_op(row: dict[str, Any]) -> str:
    if row.get("status") == "error":
        return f"error     {row['case']}  {row.get('detail', '')[:200]}"
    speed = (f"{row['fused_tflops']:.1f} vs {row['ref_tflops']:.1f} TFLOP/s"
             if row.get("fused_tflops") else f"{row['fused_gb_s']:.0f} vs {row['ref_gb_s']:.0f} GB/s")
    roof = (f", roofline {row['fused_roofline_frac']:.2f} vs {row['ref_roofline_frac']:.2f}"
            if row.get("fused_roofline_frac") is not None else "")
    return (f"{row['case']}: kernel {row['fused_ms']:.3f} ms vs xla {row['ref_ms']:.3f} ms "
            f"(x{row['time_ratio']:.2f}); {speed}{roof}; ran {row['fused_impl']}; "
            f"max rel diff {row['rel_diff']:.1e}")


def _describe_step(row: dict[str, Any]) -> str:
    if row.get("status") == "error":
        return f"error     {row['case']}  {row.get('detail', '')[:200]}"
    return (f"{row['case']}: step x{row['time_ratio']:.2f} ({row['fused_ms']:.2f} vs "
            f"{row['ref_ms']:.2f} ms), temp x{row['temp_ratio']:.3f}, compile "
            f"{row['fused_compile_s']:.1f} vs {row['ref_compile_s']:.1f} s; kernels "
            f"{row['kernels']} for {row['sites']} fused sites ({row['sites_on_xla']} on XLA here: "
            f"{row['kernel_gap']})")


def _step_row(case) -> dict[str, Any]:
    row = {**step_benchmarks.measure(case, repeats=5, warmup=1), "section": "steps"}
    # A fused site runs either its kernel or XLA; any other gap is a kernel lost in lowering.
    expected = row["sites"] - row["sites_on_xla"]
    row["kernel_gap"] = ("matches the report" if row["kernels"] == expected or row["backend"] == "cpu"
                         else f"the report expects {expected}")
    row["status"] = "ok" if row["kernel_gap"] == "matches the report" else "mismatch"
    return row


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------

def _table(header: list[str], lines: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_cell(v) for v in line) + " |" for line in lines]


def summary(results: Results, dry_run: bool, budget_s: float, elapsed_s: float) -> str:
    """The markdown summary: machine, verdict counts, failures, timings, skipped cases."""
    machine = {r["case"]: r["value"] for r in results.section("machine")}
    lines = [f"# Device check: {machine.get('device_kind', '?')} ({machine.get('backend', '?')})",
             "",
             f"{machine.get('date_utc', '')} UTC; jax {machine.get('jax')}, jaxlib "
             f"{machine.get('jaxlib')}, plugins: {machine.get('plugins')}; Pallas Triton "
             f"{machine.get('pallas_triton')}, Mosaic TPU {machine.get('pallas_mosaic_tpu')}, "
             f"cuDNN {machine.get('cudnn')}; "
             f"python {machine.get('python')}; {elapsed_s:.0f} s of a {budget_s:.0f} s budget"
             + ("; DRY RUN (CPU, interpret mode, tiny sizes)" if dry_run else "") + "."]
    checks = results.section("correctness")
    if checks:
        counts: dict[str, int] = {}
        for r in checks:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        lines += ["", "## Correctness against float64", "",
                  ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".", ""]
        lines += _table(["case", "status", "err", "jax.jit err", "kernels", "detail"],
                        [[r["case"], r["status"], r.get("err"), r.get("jax_jit_err"),
                          r.get("kernel_kinds", r.get("kernels")), (r.get("detail") or "")[:160]]
                         for r in checks])
    op_rows = results.section("ops")
    if op_rows:
        lines += ["", "## Ops: kernel vs XLA (time ratio < 1: the kernel is faster)", ""]
        lines += _table(["case", "ran", "kernel ms", "xla ms", "ratio", "TFLOP/s or GB/s",
                         "roofline frac (xla)"],
                        [[r["case"], r.get("fused_impl", r.get("status")), r.get("fused_ms"),
                          r.get("ref_ms"), r.get("time_ratio"),
                          r.get("fused_tflops") or r.get("fused_gb_s"),
                          f"{_cell(r.get('fused_roofline_frac'))} ({_cell(r.get('ref_roofline_frac'))})"]
                         for r in op_rows])
    step_rows = results.section("steps")
    if step_rows:
        lines += ["", "## Training steps: jfuse.jit vs jax.jit", ""]
        lines += _table(["case", "step ratio", "temp ratio", "compile s (jax.jit)", "kernels",
                         "fused sites", "on XLA here", "kernel count"],
                        [[r["case"], r.get("time_ratio"), r.get("temp_ratio"),
                          f"{_cell(r.get('fused_compile_s'))} ({_cell(r.get('ref_compile_s'))})",
                          r.get("kernels"), r.get("sites"), r.get("sites_on_xla"),
                          r.get("kernel_gap", r.get("detail"))] for r in step_rows])
    if results.skipped:
        lines += ["", f"## Skipped (out of budget): {len(results.skipped)}", ""]
        lines += [f"- {name}" for name in results.skipped]
    return "\n".join(lines) + "\n"


def kernel_op_cases(preset: str) -> list:
    """The op benchmark cases of ``preset`` that have a kernel to time. The check forces each
    op's kernel (``"pallas"``); an op with none (the LM head's chunked loss, XLA everywhere)
    would only produce error rows, so it is left out."""
    return [c for c in op_benchmarks.cases(preset) if c.declaration.has_kernel]


def main(argv=None) -> int:
    args = _parse(argv)
    # Fires at every Triton lowering on jax >= 0.12; the kernels are what this command checks.
    warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")
    if args.dry_run:
        jax.config.update("jax_platforms", "cpu")
    clock = Clock(args.budget_s)
    device = jax.devices()[0]
    stem = "device_check_" + ("dry_run_cpu" if args.dry_run else _slug(device.device_kind))
    results = Results(args.out, stem)
    implementation = "interpret" if args.dry_run else "pallas"
    say(f"jfuse device check on {device.device_kind} ({device.platform}); "
        f"budget {args.budget_s:.0f} s; kernels: implementation={implementation!r}; "
        f"rows -> {results.csv_path}")

    for row in machine_rows():
        results.add(row)
        say(f"   {row['case']}: {row['value']}")

    if "correctness" in args.parts:
        grid = kernel_checks.checks("tiny" if args.dry_run else "device")
        run_part("correctness", grid,
                 lambda check: kernel_checks.run_check(check, implementation),
                 _describe_correctness, results, clock)
    if "ops" in args.parts:
        peak = chip_peak()
        op_cases = kernel_op_cases("quick" if args.dry_run else "device")
        if args.dry_run:
            op_cases = [c for c in op_cases if c.op in ("linear", "add_rms_norm")]
        run_part("ops", op_cases,
                 lambda case: op_benchmarks.measure(
                     case, repeats=2 if args.dry_run else 10, warmup=1,
                     min_sample_s=0.0 if args.dry_run else 0.005, peak=peak,
                     implementation=implementation),
                 _describe_op, results, clock)
    if "steps" in args.parts:
        step_cases = step_benchmarks.cases("quick" if args.dry_run else "accelerator")
        if args.dry_run:
            step_cases = step_cases[:1]
        run_part("steps", step_cases, _step_row, _describe_step, results, clock)

    text = summary(results, args.dry_run, args.budget_s, clock.elapsed())
    results.md_path.write_text(text)
    failures = [r for r in results.rows if r.get("status") in ("error", "mismatch")]
    say("\n" + text)
    say(f"wrote {results.csv_path} and {results.md_path}; {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    sys.exit(main())
