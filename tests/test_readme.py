"README.md is generated from nbs/index.ipynb; they must agree, and the generator must notice when they do not."
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_readme", ROOT/"tools"/"make_readme.py")
make_readme = importlib.util.module_from_spec(spec); spec.loader.exec_module(make_readme)


def test_readme_matches_index_notebook():
    assert (ROOT/"README.md").read_text() == make_readme.render(), "README.md is stale: run `make readme`"


def test_readme_opens_with_the_two_commands():
    text = (ROOT/"README.md").read_text()
    first_block = text[text.index("```"):]
    assert "make demo" in first_block.split("```")[1] and "make test" in first_block.split("```")[1]


def test_render_reflects_notebook_edits(tmp_path):
    import json
    nb = json.loads((ROOT/"nbs"/"index.ipynb").read_text())
    nb["cells"].append({"cell_type": "markdown", "id": "x", "metadata": {}, "source": ["A new paragraph."]})
    nb["cells"].append({"cell_type": "code", "id": "y", "metadata": {}, "execution_count": None, "outputs": [],
                        "source": ["#| hide\n", "secret = 1"]})
    p = tmp_path/"index.ipynb"; p.write_text(json.dumps(nb))
    out = make_readme.render(p)
    assert out.endswith("A new paragraph.\n") and "secret" not in out
    assert out != (ROOT/"README.md").read_text()
