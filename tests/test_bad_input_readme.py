"""Issue 11 item 12: the README's first contact works as written.

The Python API example is extracted from README.md and run as it stands; the install path, the
exit codes, the layout table and the results page it points to exist.
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_python_api_example_runs_as_written(tmp_path):
    m = re.search(r"<!-- api-example -->\n```python\n(.*?)```", _readme(), re.S)
    assert m, "README.md lost its <!-- api-example --> python block"
    code = m.group(1)
    assert len(code.strip().splitlines()) <= 25
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT, "OPENBLAS_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    acc = float(re.search(r"BLL test accuracy ([\d.]+)%", r.stdout).group(1))
    assert acc > 50  # 10 classes: chance is 10 %
    assert "verified" in r.stdout
    assert (tmp_path / "bll.npz").exists() and (tmp_path / "bll-w8.h5").exists()


def test_readme_first_contact_sections():
    s = _readme()
    assert "pip install -e '.[test]'" in s
    for code in ("`0` success", "`1` a verified mismatch", "`2` bad input"):
        assert code in s
    layout = s[s.index("## Layout"):s.index("## How BLL")]
    for path in ("bll_ref/cli/", "training.py", "checkpoint.py", "gradcheck.py", "fileio.py", "models.py", "`docs/`",
                 "`tests/`"):
        assert path in layout, path
    results = s[s.index("## Results"):]
    assert results.count("\n|---") == 1, "one headline table in README; the rest in docs/results.md"
    assert "docs/results.md" in results
    with open(os.path.join(ROOT, "docs", "results.md"), encoding="utf-8") as f:
        doc = f.read()
    for section in ("Step time", "Fixed point", "CNN", "Transformer", "Uncertainty autoencoder", "Block-parallel speed"):
        assert f"## {section}" in doc, section
