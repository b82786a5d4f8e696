"""All of jfuse's benchmarks in one command: fused ops against XLA, training steps against jax.jit.

Run from the repository root::

    python benchmarks/run.py              # a few minutes on a 2-core CPU
    python benchmarks/run.py --quick      # tiny sizes, 3 repeats: a smoke test (< 30 s on CPU)
    python benchmarks/run.py --out DIR    # default: benchmarks/results

Two sections, one line of progress per case:

* ``ops`` (:mod:`benchmarks.ops`): every fused op, forward and forward+backward, with its
  default implementation (Pallas on TPU/GPU, XLA on CPU) against ``implementation="xla"``:
  median times, compiled temp memory, achieved TFLOP/s (matmuls) or GB/s (norms), and on a chip
  with known peaks the fraction of its roofline. The ``fused_impl`` column says what really ran.
* ``models`` (:mod:`benchmarks.steps`): training steps (MLP, SwiGLU MLP, Llama-style blocks
  unrolled and as a ``lax.scan``) under ``jfuse.jit`` against ``jax.jit``: compiled temp memory,
  median step time, compile time.

Times are medians over interleaved repeats in one process. Writes ``DIR/benchmarks.csv`` (one
row per case, both sections, ``ref_*`` for XLA / jax.jit and ``fused_*`` for the default
implementation / jfuse.jit), ``DIR/benchmarks.md`` (machine and versions, one table per section)
and ``DIR/benchmarks.png`` (the ratios, plotted; needs matplotlib, the ``examples`` extra).
Sizes follow the backend (``--preset cpu`` or ``accelerator``); ``--quick`` shrinks them.
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax

from benchmarks import ops as op_benchmarks
from benchmarks import steps as step_benchmarks
from jfuse.benchmarking import ChipPeak, chip_peak, machine_description, machine_info

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
STEM = "benchmarks"

# CSV columns, in order; a row leaves empty what does not apply to its section.
FIELDS = (
    "section", "case", "op", "mode", "dtype", "shape", "backend", "ref", "fused", "fused_impl",
    "ref_ms", "fused_ms", "time_ratio", "ref_temp_MiB", "fused_temp_MiB", "temp_ratio",
    "ref_compile_s", "fused_compile_s", "bound", "flops", "bytes", "ref_tflops", "fused_tflops",
    "ref_gb_s", "fused_gb_s", "chip", "roofline_ms", "ref_roofline_frac", "fused_roofline_frac",
    "rel_diff", "same_program", "fused_sites", "fallbacks", "repeats",
)


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and 3 repeats (a smoke test, < 30 s on CPU)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS,
                        help=f"output folder (default {RESULTS})")
    parser.add_argument("--preset", choices=("cpu", "accelerator"), default=None,
                        help="problem sizes (default: by jax.default_backend())")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per side (default 20, 3 with --quick)")
    parser.add_argument("--only", choices=("ops", "models"), default=None,
                        help="run one section only")
    return parser.parse_args(argv)


def _fmt(value: Any, digits: int = 4) -> str:
    """``digits`` significant digits, but never an exponent for large values; None -> ""."""
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"
    return str(value)


def achieved(row: dict[str, Any], side: str = "fused") -> str:
    """An op row's achieved throughput in the unit that bounds it: TFLOP/s or GB/s."""
    if row["bound"] == "compute" and row.get(f"{side}_tflops"):
        return f"{_fmt(row[f'{side}_tflops'], 3)} TFLOP/s"
    value = row.get(f"{side}_gb_s")
    return "" if value is None else f"{_fmt(value, 3)} GB/s"


def write_csv(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k), 6) for k in FIELDS})


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _pair(row: dict[str, Any], key: str, fmt=lambda v: _fmt(v, 3)) -> str:
    """``default (xla)`` values of one metric, or empty."""
    fused, ref = row.get(f"fused_{key}"), row.get(f"ref_{key}")
    return "" if fused is None else f"{fmt(fused)} ({fmt(ref)})"


def markdown(rows: list[dict[str, Any]], info: dict[str, str], settings: str,
             peak: ChipPeak | None) -> str:
    """The report: machine and versions first, then one table per section. ``info`` is
    :func:`~jfuse.benchmarking.machine_info`; ``peak`` the chip's roofline numbers, if known."""
    lines = [
        f"Machine: {machine_description()}",
        "",
        (f"Versions: jax {info['jax']}, jaxlib {info['jaxlib']}, numpy {info['numpy']}, "
         f"python {info['python']}, jfuse {info['jfuse']}; host {info['host']}, "
         f"{info['cpu_count']} CPUs; backend {info['backend']} ({info['device_count']}x "
         f"{info['device_kind']}); {info['date_utc']} UTC; {settings}."),
    ]
    op_rows = [r for r in rows if r["section"] == "ops"]
    if op_rows:
        lines += ["", "## Fused ops: default implementation vs implementation=\"xla\"", ""]
        notes = [(
            "`ran`: the Pallas kernel calls in the compiled default program (`xla`: none). "
            "`fwd+bwd` is `jax.vjp` with a random cotangent. Achieved: matmul flops or "
            "compulsory bytes (inputs, outputs, cotangents, gradients moved once) per median "
            "time; roofline: max(flops / peak, bytes / bandwidth) / time. Values in "
            "parentheses are the XLA reference's."
        )]
        if info["backend"] == "cpu":
            notes.append("On CPU the default implementation *is* the XLA path (column `ran`); "
                         "the kernels' speed needs a TPU or GPU. No roofline: no peak numbers "
                         "for a CPU.")
        elif peak is None:
            notes.append(f"No peak numbers for `{info['device_kind']}` in "
                         "`jfuse.benchmarking.CHIP_PEAKS`: roofline columns are empty.")
        else:
            notes.append(f"Roofline: {peak.chip}, {peak.hbm_gb_s:g} GB/s, "
                         f"{peak.matmul_tflops['bfloat16']:g} bf16 / "
                         f"{peak.matmul_tflops['float32']:g} f32 (default precision) dense "
                         f"TFLOP/s ({peak.source}).")
        same = sum(bool(r.get("same_program")) for r in op_rows)
        if same:
            notes.append(f"For {same} of {len(op_rows)} cases the default implementation "
                         "compiled to the very program that `implementation=\"xla\"` did (HLO "
                         "equal but for source metadata): their time ratios measure noise only.")
        for note in notes:
            lines += [note, ""]
        lines += [
            _table(
                ["case", "ran", "xla ms", "default ms", "time ratio", "temp MiB xla / default",
                 "achieved default (xla)", "roofline default (xla)"],
                [[r["case"], r["fused_impl"], _fmt(r["ref_ms"], 3), _fmt(r["fused_ms"], 3),
                  f"{r['time_ratio']:.3f}",
                  f"{_fmt(r['ref_temp_MiB'], 3)} / {_fmt(r['fused_temp_MiB'], 3)}",
                  f"{achieved(r)} ({achieved(r, 'ref')})",
                  _pair(r, "roofline_frac", lambda v: f"{100 * v:.0f}%")]
                 for r in op_rows],
            ),
        ]
    model_rows = [r for r in rows if r["section"] == "models"]
    if model_rows:
        lines += [
            "", "## Training steps: jfuse.jit vs jax.jit", "",
            ("value_and_grad + SGD update. Temp memory: compiled `temp_size_in_bytes`; "
             "compile: trace + lower + compile; ratios are jfuse / jax.jit."),
            "",
            _table(
                ["case", "ran", "jax temp MiB", "jfuse temp MiB", "temp ratio", "jax ms",
                 "jfuse ms", "time ratio", "jax compile s", "jfuse compile s", "fused"],
                [[r["case"], r["fused_impl"], _fmt(r["ref_temp_MiB"], 4),
                  _fmt(r["fused_temp_MiB"], 4), f"**{r['temp_ratio']:.3f}**",
                  _fmt(r["ref_ms"], 4), _fmt(r["fused_ms"], 4), f"{r['time_ratio']:.3f}",
                  f"{r['ref_compile_s']:.2f}", f"{r['fused_compile_s']:.2f}",
                  r["fused_sites"] + (f"; {r['fallbacks']} fallbacks" if r["fallbacks"] else "")]
                 for r in model_rows],
            ),
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
    """Bar charts of the ratios (and roofline fractions where known) into a PNG."""
    import matplotlib  # optional (the examples and test extras): imported only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    op_rows = [r for r in rows if r["section"] == "ops"]
    model_rows = [r for r in rows if r["section"] == "models"]
    roofline_rows = [r for r in op_rows if r.get("fused_roofline_frac") is not None]
    panels = [p for p in (op_rows, model_rows, roofline_rows) if p]
    heights = [max(2.0, 0.28 * len(p) * (2 if p is not op_rows else 1) + 1.2) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes = iter(axes[:, 0])

    def bars(ax, labels, series, xlabel, reference_line):
        n = len(series)
        width = 0.8 / n
        for i, (name, values, color) in enumerate(series):
            ax.barh([j + (i - (n - 1) / 2) * width for j in range(len(labels))], values,
                    height=width, label=name, color=color)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        if reference_line is not None:
            ax.axvline(reference_line, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        if n > 1:  # above the axes, clear of the bars
            ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=n,
                      frameon=False)

    if op_rows:
        ax = next(axes)
        colors = ["tab:blue" if r["mode"] == "fwd" else "tab:orange" for r in op_rows]
        ax.barh(range(len(op_rows)), [r["time_ratio"] for r in op_rows], color=colors)
        ax.set_yticks(range(len(op_rows)), [f"{r['case']} [{r['fused_impl']}]" for r in op_rows],
                      fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("op time, default implementation / implementation='xla' "
                      "(< 1: default faster; blue fwd, orange fwd+bwd)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    if model_rows:
        bars(next(axes), [r["case"] for r in model_rows],
             [("temp memory", [r["temp_ratio"] for r in model_rows], "tab:green"),
              ("step time", [r["time_ratio"] for r in model_rows], "tab:purple")],
             "training step, jfuse.jit / jax.jit (< 1: jfuse smaller or faster)", 1.0)
    if roofline_rows:
        bars(next(axes), [r["case"] for r in roofline_rows],
             [("default", [r["fused_roofline_frac"] for r in roofline_rows], "tab:blue"),
              ("xla", [r["ref_roofline_frac"] for r in roofline_rows], "tab:gray")],
             f"fraction of the {roofline_rows[0]['chip']} roofline", 1.0)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _progress_line(row: dict[str, Any]) -> str:
    if row["section"] == "ops":
        return (f"default ({row['fused_impl']}) {row['fused_ms']:.3g} ms, "
                f"xla {row['ref_ms']:.3g} ms: "
                f"{row['time_ratio']:.2f}x ({achieved(row)})")
    return (f"temp {row['temp_ratio']:.3f}x, time {row['time_ratio']:.3f}x, "
            f"compile {row['ref_compile_s']:.1f} -> {row['fused_compile_s']:.1f} s, "
            f"fused {row['fused_sites'] or 'nothing'}")


def main(argv=None) -> int:
    args = _parse(argv)
    started = time.perf_counter()
    backend = jax.default_backend()
    preset = "quick" if args.quick else args.preset or ("cpu" if backend == "cpu" else "accelerator")
    repeats = args.repeats or (3 if args.quick else 20)
    warmup = 1 if args.quick else 2
    # On a GPU/TPU a small op can take less time than its dispatch: time batches of calls there.
    min_sample_s = 0.0 if backend == "cpu" else 0.02
    peak = chip_peak()

    jobs: list[tuple[str, Any]] = []
    if args.only in (None, "ops"):
        jobs += [("ops", case) for case in op_benchmarks.cases(preset)]
    if args.only in (None, "models"):
        jobs += [("models", case) for case in step_benchmarks.cases(preset)]
    print(f"machine: {machine_description()}", flush=True)
    print(f"{len(jobs)} cases, preset {preset}, {repeats} repeats", flush=True)

    rows = []
    for i, (section, case) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {section} {case.name} ... ", end="", flush=True)
        case_started = time.perf_counter()
        if section == "ops":
            row = op_benchmarks.measure(case, repeats=repeats, warmup=warmup,
                                        min_sample_s=min_sample_s, peak=peak)
        else:
            row = step_benchmarks.measure(case, repeats=repeats, warmup=warmup)
        rows.append(row)
        print(f"{_progress_line(row)} [{time.perf_counter() - case_started:.1f} s]", flush=True)

    elapsed = time.perf_counter() - started
    command = " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    settings = f"preset {preset}, {repeats} repeats; `{command}` ran in {elapsed:.0f} s"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / f"{STEM}.csv")
    text = markdown(rows, machine_info(), settings, peak)
    (out / f"{STEM}.md").write_text(text)
    try:
        plot(rows, out / f"{STEM}.png", machine_description())
        written = ".csv, .md, .png"
    except ImportError:  # matplotlib is an extra: the tables are written without it
        written = '.csv, .md (no plot: pip install -e ".[examples]" for matplotlib)'
    print("\n" + text)
    print(f"wrote {out / STEM}{written} in {elapsed:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
