#!/usr/bin/env python
"""Execute notebooks and store their outputs, so the docs show real results (then run `nbdev-clean`).

    python tools/execute_nbs.py nbs/api/03_flops.ipynb            # full configuration (IN_TEST unset)
    python tools/execute_nbs.py --test-config nbs/tutorials/*.ipynb  # the small configuration CI runs
    python tools/execute_nbs.py --flags slow nbs/api/04_train.ipynb  # also run cells flagged #| slow

Cells flagged with `tst_flags` (`#| slow`, `#| gpu`) are skipped unless named in --flags, as in `nbdev-test`.
"""
import argparse, os, sys, time
from pathlib import Path

from fastcore.nbio import write_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.process import NBProcessor
from nbdev.test import _skip_cell


def execute(fn: Path, flags: list[str]) -> float:
    cfg = get_config()
    skip = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags)
    nb = NBProcessor(fn, rm_directives=False, process=True).nb
    shell = CaptureShell(fn)
    t0 = time.time()
    with working_directory(fn.parent):
        shell.run_all(nb, exc_stop=True, preproc=_skip_cell(nb, [f for f in skip if f not in flags], flags),
                      cell_timeout=cfg.cell_timeout)
    write_nb(nb, fn)
    return time.time() - t0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--test-config", action="store_true", help="set IN_TEST=1, the small configuration CI runs")
    ap.add_argument("--flags", default="", help="space-separated tst_flags to run too, e.g. 'slow'")
    args = ap.parse_args()
    if args.test_config: os.environ["IN_TEST"] = "1"
    else: os.environ.pop("IN_TEST", None)
    for fn in args.notebooks:
        print(f"{fn}: ", end="", flush=True)
        print(f"{execute(fn.resolve(), args.flags.split()):.1f}s", flush=True)
