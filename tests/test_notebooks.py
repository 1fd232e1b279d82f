"""One pytest case per notebook: every API notebook, tutorial and assignment runs in its test configuration.

Cells flagged with one of `tst_flags` (`#| slow`, `#| gpu`) are skipped unless NB_FLAGS names them,
e.g. `NB_FLAGS="slow" python -m pytest tests/test_notebooks.py`.
"""
import os

import pytest
import nbdev.test as nbt  # import the module: a bare `test_nb` name would be collected as a test
from fastcore.nbio import read_nb
from nbdev.config import get_config
from nbdev.frontmatter import nb_frontmatter

CFG = get_config()
ROOT = CFG.nbs_path
FORCE = os.environ.get("NB_FLAGS", "").split()
FLAGS = CFG.tst_flags.split() if isinstance(CFG.tst_flags, str) else list(CFG.tst_flags)
NOTEBOOKS = sorted(p for p in ROOT.rglob("*.ipynb")
                   if not any(s.startswith(("_", ".")) for s in p.relative_to(ROOT).parts))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_notebook(nb):
    ok, secs = nbt.test_nb(nb, skip_flags=[f for f in FLAGS if f not in FORCE], force_flags=FORCE,
                           basepath=CFG.config_path)
    assert ok, f"{nb.relative_to(ROOT)} failed after {secs:.1f}s (traceback above)"


@pytest.mark.parametrize("nb", [p for p in NOTEBOOKS if "tutorials" in p.parts], ids=lambda p: p.name)
def test_tutorial_is_executed(nb):
    "test_nb reports a skip_exec notebook as passed, so forbid skip_exec here"
    assert not nb_frontmatter(read_nb(nb)).get("skip_exec")


def test_found_notebooks():
    assert any("api" in p.parts for p in NOTEBOOKS), f"no API notebooks found under {ROOT}"
