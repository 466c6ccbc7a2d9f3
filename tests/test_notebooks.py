"""The notebooks of examples/notebooks/ are stored clean and their code compiles.

Executing them is `make notebooks` (examples/notebooks/run_notebooks.py, nbclient), which CI runs
on its own; here only the cheap checks, reading the .ipynb JSON with the standard library (the
test environment need not have Jupyter installed).
"""
import ast
import importlib.util
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDER = ROOT / "examples" / "notebooks"
EXPECTED = ("01_one_bll_step.ipynb", "02_train_and_look_inside.ipynb", "03_to_the_chip.ipynb")
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
MAGIC = re.compile(r"^\s*[%!]")  # IPython line/cell magics and shell escapes


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell):
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", FOLDER / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == list(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    nb = _load(path)
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have outputs or execution counts; clear them "
                       "(jupyter nbconvert --clear-output --inplace) before committing")
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["nbformat"] == 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_compiles(path):
    cells = [c for c in _load(path)["cells"] if c["cell_type"] == "code"]
    assert cells, f"{path.name} has no code cells"
    for i, cell in enumerate(cells):
        src = "\n".join("" if MAGIC.match(line) else line for line in _source(cell).splitlines())
        compile(src, f"{path.name} code cell {i}", "exec")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_uses_the_library_and_shows_equations(path):
    """Numbers come from bll_ref / exporters, with the equations in Markdown next to the code."""
    cells = _load(path)["cells"]
    imported = {alias.name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "").split(".")[0]
                for c in cells if c["cell_type"] == "code"
                for node in ast.walk(ast.parse("\n".join("" if MAGIC.match(l) else l
                                                         for l in _source(c).splitlines())))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert "bll_ref" in imported
    markdown = "".join(_source(c) for c in cells if c["cell_type"] == "markdown")
    assert "$$" in markdown, f"{path.name}: no displayed equation in its Markdown"


def test_runner_check_clean_passes(capsys):
    assert _runner().main(["--check-clean"]) == 0
    assert capsys.readouterr().out.count(": clean") == len(NOTEBOOKS)


def test_runner_check_clean_fails_on_outputs(tmp_path, capsys):
    nb = _load(FOLDER / EXPECTED[0])
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
    cell["execution_count"] = 1
    cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    dirty = tmp_path / "dirty.ipynb"
    dirty.write_text(json.dumps(nb), encoding="utf-8")
    assert _runner().main(["--check-clean", str(dirty)]) == 1
    assert "dirty.ipynb: code cells" in capsys.readouterr().out
