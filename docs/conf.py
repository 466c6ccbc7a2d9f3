"""Sphinx configuration of the bll_ref documentation site (``make docs``).

The pages are the Markdown files of ``docs/`` (MyST), the README (``getting-started.md`` includes
it), the three notebooks as ``make notebooks`` executed them into ``build/notebooks/`` (never
executed here: ``nb_execution_mode = "off"``) and an API reference written at build time from
every public module's ``__all__``. Folders written on every build (not stored in git), each file
only rewritten when its content changed, so incremental builds stay cheap:

* ``docs/api/``: one page per public module of ``bll_ref`` and ``exporters`` (``_write_api``);
* ``docs/notebooks/``: copies of ``build/notebooks/*.ipynb`` (``_copy_notebooks``);
* ``docs/benchmarks/``: a page per table in ``benchmarks/results/`` (``_copy_benchmarks``);
* ``build/docs/mathjax-static/``: the MathJax the pages load (``_copy_mathjax``).

No warning is suppressed (``make docs`` runs with ``-W``): there is no ``suppress_warnings``.
"""
from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import re
import shutil
import sys

from sphinx.errors import ConfigError

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

project = "bll_ref"
author = "bll_ref contributors"
copyright = "bll_ref contributors"
release = version = importlib.import_module("bll_ref").__version__

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
html_theme = "alabaster"
html_title = f"bll_ref {release}"
html_theme_options = {"description": "Block-Local Learning in NumPy, with fixed-point export",
                      "fixed_sidebar": False, "page_width": "1240px", "body_max_width": "none",
                      "sidebar_collapse": True}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# MyST: $...$ / $$...$$ and amsmath environments; GitHub-style anchors for the `file.md#heading`
# links the Markdown files use (they also work on GitHub).
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 6
nb_execution_mode = "off"

# numpy-style docstrings; members in source order; type hints in the signature only.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True


# ----------------------------------------------------------------------------- API reference
PACKAGES = ("bll_ref", "exporters")
# The command line is documented as a command (docs/cli.md), not as an API: bll_ref.cli is
# parsing and printing only, and nothing imports it (docs/architecture.md).
NOT_API = ("bll_ref.cli",)


def _public_modules():
    """Every module of PACKAGES with no underscored part, outside NOT_API, in walk order."""
    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
            parts = info.name.split(".")
            if any(p.startswith("_") for p in parts) or info.name.startswith(NOT_API):
                continue
            names.append(info.name)
    return names


def _exports(modname):
    mod = importlib.import_module(modname)
    if not hasattr(mod, "__all__"):
        raise RuntimeError(f"{modname} has no __all__; every public module lists its API in __all__ "
                           "(STYLE.md habit 10), which is what the API reference documents")
    return mod, list(mod.__all__)


def _home(obj, listed_in):
    """The one module that documents obj: where it is defined if that module lists it in its
    __all__, else the deepest public module that lists it (a package only re-exports)."""
    defined = getattr(obj, "__module__", None) if (inspect.isclass(obj) or callable(obj)) else None
    if defined in listed_in:
        return defined
    return max(listed_in, key=lambda m: (m.count("."), m))


def _api_pages():
    """{page name: rst text} for every public module, plus the API index."""
    modules = _public_modules()
    exports = {m: _exports(m) for m in modules}
    listed = {}  # id(obj) -> modules whose __all__ lists that very object
    for m, (mod, names) in exports.items():
        for n in names:
            obj = getattr(mod, n)
            if not inspect.ismodule(obj):
                listed.setdefault(id(obj), []).append(m)
    pages, rows = {}, []
    for m, (mod, names) in exports.items():
        title = f"``{m}``"
        lines = [f".. _api-{m}:", "", title, "=" * len(title), "", f".. automodule:: {m}", ""]
        elsewhere = []
        for n in names:
            obj = getattr(mod, n)
            if inspect.ismodule(obj):
                elsewhere.append(f"* :doc:`{obj.__name__}` (module)")
                continue
            home = _home(obj, listed[id(obj)])
            if home != m:
                elsewhere.append(f"* :py:obj:`{m}.{n} <{home}.{n}>`: documented in :doc:`{home}`")
            elif inspect.isclass(obj):
                lines += [f".. autoclass:: {m}.{n}", "   :members:", "   :show-inheritance:", ""]
            elif callable(obj):
                lines += [f".. autofunction:: {m}.{n}", ""]
            else:
                lines += [f".. autodata:: {m}.{n}", ""]
        if elsewhere:
            lines += ["Also exported here", "-" * 18, "", *elsewhere, ""]
        pages[m] = "\n".join(lines)
        doc = inspect.getdoc(mod) or ""
        rows.append(f"* :doc:`{m}`: {doc.splitlines()[0] if doc else ''}")
    index = ["API reference", "=" * 13, "",
             "Every public module of ``bll_ref`` and ``exporters``, generated from the docstrings: "
             "each module's ``__all__`` is its API. An object a package re-exports is documented "
             "once, in the module that defines it, and linked from the others. The command line "
             "(``bll_ref.cli``) is described in :doc:`../cli`.", "",
             ".. toctree::", "   :hidden:", "", *(f"   {m}" for m in modules), "", *rows, ""]
    pages["index"] = "\n".join(index)
    return pages


def _sync(folder: pathlib.Path, files: dict[str, bytes]):
    """Make folder hold exactly files (name -> bytes), touching only what changed."""
    folder.mkdir(exist_ok=True)
    for p in folder.iterdir():
        if p.name not in files:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for name, data in files.items():
        p = folder / name
        if not p.exists() or p.read_bytes() != data:
            p.write_bytes(data)


def _write_api():
    _sync(DOCS / "api", {f"{name}.rst": text.encode() for name, text in _api_pages().items()})


# --------------------------------------------------------------------------------- notebooks
NOTEBOOKS_SRC = ROOT / "examples" / "notebooks"
NOTEBOOKS_RUN = ROOT / "build" / "notebooks"


def _copy_notebooks():
    """Copy the executed notebooks (``make notebooks``) into docs/notebooks/; every stored
    notebook must have its executed copy (the site shows outputs, it never runs a cell)."""
    stored = sorted(p.name for p in NOTEBOOKS_SRC.glob("*.ipynb"))
    missing = [n for n in stored if not (NOTEBOOKS_RUN / n).is_file()]
    if missing:
        raise ConfigError(f"no executed copy of {', '.join(missing)} in {NOTEBOOKS_RUN}; run `make notebooks` "
                           "first (`make docs` does), the site shows the executed notebooks")
    out = DOCS / "notebooks"
    files = {n: (NOTEBOOKS_RUN / n).read_bytes() for n in stored}
    # the page that README's link to examples/notebooks/ leads to on the site (the root toctree
    # lists the notebooks themselves, so this page is in no toctree: orphan)
    files["index.md"] = ("---\norphan: true\n---\n\n# Notebooks\n\nThe notebooks of `examples/notebooks/`, "
                         "as `make notebooks` executed them (the site shows their outputs; it never runs a "
                         "cell):\n\n" + "".join(f"- [{n[:-6]}]({n})\n" for n in stored)).encode()
    _sync(out, files)
    for n in stored:  # keep the executed copy's time, so Sphinx rebuilds a page only when it changed
        shutil.copystat(NOTEBOOKS_RUN / n, out / n)


# ------------------------------------------------------------------------- benchmark tables
BENCH = ROOT / "benchmarks" / "results"
# a Markdown link from a page of docs/ to a table the benchmark scripts wrote (it works on GitHub);
# on the site it points at the page made from that table


def _copy_benchmarks():
    """docs/benchmarks/: one page per ``benchmarks/results/*.md`` (the tables as the scripts wrote
    them, a title added) with the figure of the same name when there is one."""
    files = {}
    for md in sorted(BENCH.glob("*.md")):
        text = f"# Benchmark table `{md.stem}`\n\n`benchmarks/results/{md.name}`, as the script wrote it.\n\n"
        table = md.read_text(encoding="utf-8")
        levels = [len(h) for h in re.findall(r"^(#+) ", table, re.M)]
        if levels:  # the table's own headings go under the page title
            table = re.sub(r"^(#+) ", lambda h: "#" * (len(h.group(1)) - min(levels) + 2) + " ", table, flags=re.M)
        text += table
        png = md.with_suffix(".png")
        if png.is_file():
            files[png.name] = png.read_bytes()
            text += f"\n\n![{md.stem}]({png.name})\n"
        files[md.name] = text.encode()
    stems = "\n".join(md.stem for md in sorted(BENCH.glob("*.md")))
    files["index.md"] = (f"# Benchmark tables\n\nThe tables the scripts of `benchmarks/` wrote to "
                         f"`benchmarks/results/`, one page each; [Results](../results.md) says how each "
                         f"was made and what it shows.\n\n```{{toctree}}\n:maxdepth: 1\n\n{stems}\n```\n").encode()
    _sync(DOCS / "benchmarks", files)


# ------------------------------------------------------------------- links into the repository
# Markdown links from README.md and docs/*.md to repository files that the site shows as pages of
# its own (they work on GitHub as they are): on the site they lead to those pages. Keys are paths
# from the repository root; a trailing "/" is a folder.
SITE_PAGES = {"benchmarks/results/": lambda name: f"benchmarks/{name}",
              "examples/notebooks/": lambda name: f"notebooks/{name or 'index.md'}"}


def _site_links(text, up):
    """Rewrite ](UP + repository path) links to the site's pages (UP: the way from the file to
    the repository root, "" for README.md, "../" for docs/*.md)."""
    for folder, page in SITE_PAGES.items():
        pat = re.compile(r"\]\(" + re.escape(up + folder) + r"([\w.-]*\.(?:md|ipynb))?(#[^)]*)?\)")
        text = pat.sub(lambda m: f"]({page(m.group(1))}{m.group(2) or ''})", text)
    return text


def _source_links(app, docname, source):
    if "/" not in docname:  # docs/*.md
        source[0] = _site_links(source[0], "../")


def _include_links(app, relative_path, parent_docname, content):
    if pathlib.Path(relative_path).name == "README.md":  # getting-started.md includes it
        content[0] = _site_links(content[0], "")


# ----------------------------------------------------------------------------------- MathJax
# The site renders its equations with a copy of MathJax 3 that it carries (the [docs] extra
# installs it: the PyPI package django-static-mathjax, plain static files, no Django needed), so
# the pages work offline and the browser test needs no network. Only what tex-mml-chtml.js loads
# is copied: the combined TeX/MathML -> CHTML file, its input and output components and fonts,
# the menu and the accessibility extensions (not the speech rule engine, not the SVG output).
MATHJAX_STATIC = ROOT / "build" / "docs" / "mathjax-static"
MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output/chtml.js", "output/chtml", "ui", "a11y", "adaptors")


def _copy_mathjax():
    try:
        import mathjax  # django-static-mathjax
    except ImportError:
        raise ConfigError("the documentation renders equations with MathJax from the [docs] extra: "
                          "pip install -e '.[docs]' (make docs does)") from None
    es5 = pathlib.Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    out = MATHJAX_STATIC / "mathjax" / "es5"
    for part in MATHJAX_PARTS:
        src, dst = es5 / part, out / part
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


html_static_path = [str(MATHJAX_STATIC)]
mathjax_path = "mathjax/es5/tex-mml-chtml.js"


_write_api()
_copy_notebooks()
_copy_benchmarks()
_copy_mathjax()


# ---------------------------------------------------------------------------------- the hooks
def _no_type_docstring(app, what, name, obj, options, lines):
    """A module constant without a ``#:`` comment would show its type's docstring (dict's,
    ndarray's): that text is about the type, not the constant, so drop it."""
    if what in ("data", "attribute") and not inspect.isroutine(obj) and not inspect.isclass(obj):
        type_doc = inspect.getdoc(type(obj)) or ""
        if type_doc and "\n".join(lines).strip() == type_doc.strip():
            lines.clear()


def setup(app):
    from pygments.lexers.special import TextLexer
    # docs/architecture.md draws the import levels in a ```mermaid block, which GitHub renders as
    # a diagram; the site shows its source as plain text (no JavaScript from outside the site).
    app.add_lexer("mermaid", TextLexer)
    # before napoleon (priority 500) turns the type's docstring into fields
    app.connect("autodoc-process-docstring", _no_type_docstring, priority=100)
    app.connect("source-read", _source_links)
    app.connect("include-read", _include_links)
