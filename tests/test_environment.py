"""The environment the README's set-up builds is one a student can work in: JupyterLab, nbconvert and a kernel that
runs this environment's Python (so notebooks import the package), and `make lab` starts it on the notebooks."""
import json, subprocess, sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_jupyterlab_and_nbconvert_are_installed():
    for tool in ("lab", "nbconvert"):
        out = subprocess.run([str(BIN/"jupyter"), tool, "--version"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip(), f"`jupyter {tool} --version` failed: {out.stderr[-500:]}"


def test_a_notebook_runs_in_this_environment_under_the_ipykernel(tmp_path):
    "nbconvert starts the environment's own kernel, which imports the package from this checkout"
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("import sys, corrprune_edu\nprint(sys.executable)\nprint(corrprune_edu.__file__)")]
    src = tmp_path/"probe.ipynb"
    nbformat.write(nb, src)
    run = subprocess.run([str(BIN/"jupyter"), "nbconvert", "--to", "notebook", "--execute", str(src), "--output-dir", str(tmp_path/"out")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    text = "".join("".join(o.get("text", "")) for o in json.loads((tmp_path/"out"/"probe.ipynb").read_text())["cells"][0]["outputs"])
    executable, package = text.split()
    assert Path(executable).parent == BIN, f"the kernel ran {executable}, not this environment's Python"
    assert Path(package).resolve().is_relative_to(ROOT), f"the kernel imported the package from {package}, not from {ROOT}"


def test_make_lab_opens_the_notebooks():
    out = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "jupyter lab --notebook-dir=nbs " in out.stdout, out.stdout + out.stderr
