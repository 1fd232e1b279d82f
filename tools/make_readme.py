#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb without Quarto (which `nbdev-readme` needs).

Markdown cells are copied; code cells become ```python blocks (nbdev directives removed, `#| hide` cells left
out) followed by their stored text outputs. `--check` exits 1 if README.md differs from what it would write.
"""
import argparse, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- Generated from nbs/index.ipynb by tools/make_readme.py (`make readme`); edit the notebook, not this file. -->\n\n"


def _text(src) -> str: return "".join(src) if isinstance(src, list) else src


def _outputs(cell) -> list[str]:
    out = []
    for o in cell.get("outputs", []):
        t = o.get("text") if o.get("output_type") == "stream" and o.get("name") == "stdout" else o.get("data", {}).get("text/plain")
        if t: out.append(_text(t).rstrip("\n"))
    return out


def render(nb_path: Path = ROOT/"nbs"/"index.ipynb") -> str:
    nb = json.loads(nb_path.read_text())
    parts = []
    for cell in nb["cells"]:
        src = _text(cell["source"])
        if cell["cell_type"] == "markdown": parts.append(src.strip())
        elif cell["cell_type"] == "code":
            lines = src.splitlines()
            directives = [l for l in lines if re.match(r"^\s*#\|", l)]
            if any(re.match(r"^\s*#\|\s*(hide|include:\s*false)", d) for d in directives): continue
            code = "\n".join(l for l in lines if l not in directives).strip()
            if code: parts.append(f"```python\n{code}\n```")
            parts += [f"```\n{o}\n```" for o in _outputs(cell)]
    return HEADER + "\n\n".join(p for p in parts if p) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="only check that README.md is current")
    args = ap.parse_args()
    text, readme = render(), ROOT/"README.md"
    if args.check:
        ok = readme.exists() and readme.read_text() == text
        print("README.md is current" if ok else "README.md is out of date: run `make readme`")
        sys.exit(0 if ok else 1)
    readme.write_text(text)
    print(f"wrote {readme}")
