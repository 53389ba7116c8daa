"""Every benchmark script runs end to end in its --smoke mode, so none can break unnoticed.

The scripts run in this process (one torch start-up for all), with benchmarks/ on the path as
when run as `python benchmarks/NAME.py`; subprocesses they start find the package through
PYTHONPATH. A script that changes module state for a measurement puts it back, or the tests
after this file would run under it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SRC = Path(__file__).resolve().parents[1] / "src"
SCRIPTS = sorted(
    p.stem for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__"' in p.read_text()
)


def test_every_script_has_a_smoke_mode():
    assert len(SCRIPTS) >= 8, SCRIPTS
    for name in SCRIPTS:
        assert "add_arguments(parser)" in (BENCHMARKS / f"{name}.py").read_text(), name


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke(
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    paths = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch.chdir(tmp_path)  # anything written to the working directory lands here too
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # scripts seed torch; later tests keep theirs
            importlib.import_module(name).main(["--smoke", "--smoke-dir", str(tmp_path / "smoke")])
    finally:
        torch.set_num_threads(threads)  # some scripts measure at several thread counts
    assert capsys.readouterr().out.strip()
    assert {p.name for p in tmp_path.iterdir()} <= {"smoke"}
