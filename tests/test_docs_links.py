"""The documentation stays inside the repository and true to it.

Every relative link in README.md and docs/*.md resolves to a file of the repository (and a
``#fragment`` to a heading of the linked markdown file); every path in the README's layout table
exists; the README stays short; no document points at files that are not part of the product.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _text(path):
    return path.read_text(encoding="utf-8")


def _without_code(text):
    """Markdown outside fenced code blocks (a link-like string in code is not a link)."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchor(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def _anchors(path):
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", _without_code(_text(path)), re.M)}


def _links(path):
    return [m.group(1) for m in LINK.finditer(_without_code(_text(path)))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    bad = []
    for link in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto: ... not ours to check
            continue
        target, _, fragment = link.partition("#")
        dest = (doc.parent / target).resolve() if target else doc
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            bad.append(f"{link} (no file {dest})")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            bad.append(f"{link} (no heading #{fragment} in {dest.name})")
    assert not bad, f"{doc.name}: broken links: {bad}"


def _layout_paths():
    s = _text(ROOT / "README.md")
    table = s[s.index("## Layout"):]
    table = table[:table.index("\n## ")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) >= 10, "README's layout table lost its rows"
    return [p for row in rows for p in re.findall(r"`([^`]+)`", row.split("|")[1])]


def test_readme_layout_paths_exist():
    missing = [p for p in _layout_paths() if not (ROOT / p).exists()]
    assert not missing, f"README's layout table names paths that do not exist: {missing}"


def test_readme_is_short():
    n = len(_text(ROOT / "README.md").splitlines())
    assert n <= 300, f"README.md has {n} lines; keep it <= 300 and move detail to docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_outside_the_repository(doc):
    text = _text(doc)
    for outside in ("DESIGN.md", "shared/", "peer-results.md"):
        assert outside not in text, f"{doc.name} mentions {outside!r}, which is not part of the repository"
