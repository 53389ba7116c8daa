"""The exploration notebook: stored without outputs, and it runs top to bottom."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "exploration.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def _kernel_environment(spec_root: Path) -> dict[str, str]:
    """The environment for a kernel that runs this interpreter, from a temporary directory.

    A kernelspec named python3 under `spec_root`, first on JUPYTER_PATH, pins the kernel to
    `sys.executable` even where a user-level python3 spec points at another Python. Relative
    PYTHONPATH entries are made absolute because the kernel starts in another directory.
    """
    spec = spec_root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel), encoding="utf-8")
    env = dict(os.environ)
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(spec_root), env.get("JUPYTER_PATH")]))
    if env.get("PYTHONPATH"):
        entries = env["PYTHONPATH"].split(os.pathsep)
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in entries if p)
    return env


@pytest.mark.slow
def test_exploration_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env = _kernel_environment(tmp_path / "jupyter")
    # The kernelspec lookup reads JUPYTER_PATH from this process when the client starts.
    monkeypatch.setenv("JUPYTER_PATH", env["JUPYTER_PATH"])
    workdir = tmp_path / "work"
    workdir.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=120,  # per cell; the whole notebook takes well under a minute on 2 cores
        startup_timeout=60,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=env)
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    assert not any(workdir.iterdir()), "the notebook left files in its working directory"
