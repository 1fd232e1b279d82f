#!/usr/bin/env python
"""Fail if `nbdev-export` or `nbdev-clean` would change anything: the notebooks are the source, the library is
exported from them, and notebooks are committed clean. Files it changed are listed; review and commit them."""
import hashlib, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ["nbs", "corrprune_edu"]


def snapshot() -> dict[str, str]:
    files = [f for d in WATCHED for f in (ROOT/d).rglob("*")
             if f.is_file() and "__pycache__" not in f.parts and not any(p.startswith(".") for p in f.relative_to(ROOT).parts)]
    return {str(f.relative_to(ROOT)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def main() -> int:
    before = snapshot()
    bindir = Path(sys.executable).parent
    for cmd in ("nbdev-export", "nbdev-clean"):
        subprocess.run([str(bindir/cmd)], cwd=ROOT, check=True)
    after = snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        print("check_sync: nbdev-export / nbdev-clean changed these files, so the library or the notebooks were out of date:")
        print("\n".join(f"  {c}" for c in changed))
        print("Edit notebooks, not corrprune_edu/*.py; run `nbdev-export && nbdev-clean`, review and commit.")
        return 1
    print(f"check_sync: library and {sum(k.endswith('.ipynb') for k in after)} notebooks in sync and clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
