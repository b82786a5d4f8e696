"""The demo and the examples the README points at run, and say what the README says they say."""

from __future__ import annotations

import pathlib
import runpy

import jfuse
from jfuse import MissReason

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_demo_runs_small(capsys):
    from jfuse import demo

    demo.main(["--layers", "2", "--tokens", "16", "--d-model", "16", "--d-hidden", "32",
               "--repeats", "1"])
    out = capsys.readouterr().out
    assert "jfuse fusion report: train_step" in out
    assert "compiled temp memory" in out and "median step time" in out
    assert "linear=2" in out and "rms_norm=2" in out


def test_near_misses_example_reports_both_misses(capsys):
    namespace = runpy.run_path(str(ROOT / "examples" / "near_misses.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "unsupported activation" in out and "pre-activation is returned as well" in out
    report = jfuse.explain(namespace["block"])(
        {"w1": namespace["jnp"].ones((8, 8)), "b1": namespace["jnp"].zeros(8),
         "w2": namespace["jnp"].ones((8, 8)), "b2": namespace["jnp"].zeros(8)},
        namespace["jnp"].ones((4, 8)))
    assert sorted(m.reason for m in report.missed) == sorted(
        [MissReason.UNSUPPORTED_ACTIVATION, MissReason.INTERMEDIATE_ESCAPES])


def test_readme_quickstart_runs_and_prints_what_the_readme_shows(tmp_path, capsys, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quickstart"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n\nprints")]
    shown = section[section.index("prints\n\n```\n") + len("prints\n\n```\n"):]
    shown = shown[:shown.index("```")]
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)  # as a user runs it: report paths are relative to the cwd
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip().endswith("{'glu': 2}")
    # The report the README shows is the one it prints (up to the script's path).
    printed = [line.replace(str(script), "quickstart.py") for line in out.splitlines()]
    assert printed == shown.rstrip("\n").splitlines()
