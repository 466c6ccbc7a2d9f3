"""The module graph keeps the layering of docs/architecture.md: read from the source (every import,
also those inside functions), it has no circle, no import from a lower level to a higher one, no
import of a command line by the library or the exporters, no private name imported across
packages, a function-level import only where an optional dependency needs it, no file over 400
lines and an ``__all__`` in every public module.

``python tests/test_layering.py`` prints the graph's numbers (modules, edges, levels)."""
import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("bll_ref", "exporters")

# Lower levels never import higher ones (the same level may import each other, without circles).
LEVELS = [
    ("bll_ref.backend", "bll_ref.memory", "bll_ref.fileio", "bll_ref.runlock", "bll_ref.idx"),
    ("bll_ref.gpu", "bll_ref.layers", "bll_ref.synthetic", "bll_ref.gradcheck"),
    ("bll_ref.losses", "bll_ref.batching"),
    ("bll_ref.optim", "bll_ref.feedback", "bll_ref.data", "bll_ref.models", "bll_ref.fixedpoint"),
    ("bll_ref.methods",),
    ("bll_ref.parallel", "bll_ref.checkpoint", "bll_ref.runstate"),
    ("bll_ref.loop", "bll_ref.fakequant"),
    ("bll_ref.training", "bll_ref.quant_finetune", "bll_ref.report"),
    ("bll_ref",),  # the package's own __init__ (it imports its public modules)
    ("exporters",),
    ("bll_ref.cli",),
]
# Imports inside a function, each for an optional dependency the module must not need to import:
# mpi4py ([mpi]), CuPy / numba-cuda ([cuda]).
LAZY_OK = {("bll_ref.parallel", "bll_ref.parallel.mpi"),
           ("bll_ref.parallel", "bll_ref.parallel.streams"), ("bll_ref.losses.output", "bll_ref.losses.cuda")}
MAX_LINES = 400


def modules():
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def level(mod):
    best, found = -1, None
    for i, prefixes in enumerate(LEVELS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    return found


def package(mod, mods):
    """The package a module belongs to: its own name for a package, else its parent's; exporters'
    modules are one package."""
    if mod.startswith("exporters"):
        return "exporters"
    return mod if mods[mod].name == "__init__.py" else mod.rsplit(".", 1)[0]


def imports():
    """(importer, imported module, imported name or None, inside a function?) for every import."""
    mods, out = modules(), []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        base = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            else:
                if node.level:
                    parts = base.split(".")
                    parent = ".".join(parts[:len(parts) - node.level + 1])
                    target = f"{parent}.{node.module}" if node.module else parent
                else:
                    target = node.module
                targets = [(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target, a.name)
                           for a in node.names]
            for t, name in targets:
                if t.split(".")[0] not in PACKAGES:
                    continue
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod:
                    out.append((mod, t, name if name and t.rsplit(".", 1)[-1] != name else None,
                                node.col_offset > 0))
    return mods, out


def cycles(edges):
    graph = collections.defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_level():
    mods, _ = imports()
    assert [m for m in mods if level(m) is None] == []


def test_no_import_circle():
    _, imps = imports()
    assert cycles({(a, b) for a, b, _, _ in imps}) == []


def test_no_upward_import():
    _, imps = imports()
    up = sorted({(a, b) for a, b, _, _ in imps if level(b) > level(a)})
    assert up == [], "imports from a lower level to a higher one"


def test_the_library_and_the_exporters_never_import_a_command_line():
    _, imps = imports()
    assert [(a, b) for a, b, _, _ in imps if b.startswith("bll_ref.cli") and not a.startswith("bll_ref.cli")] == []


def test_function_level_imports_only_for_optional_dependencies():
    _, imps = imports()
    assert sorted({(a, b) for a, b, _, lazy in imps if lazy} - LAZY_OK) == []


def test_no_private_name_imported_across_packages():
    mods, imps = imports()
    bad = [(a, b, n) for a, b, n, _ in imps
           if n and n.startswith("_") and not n.startswith("__") and package(a, mods) != package(b, mods)]
    assert bad == []


def test_no_file_over_400_lines():
    mods, _ = imports()
    big = {m: n for m, p in mods.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def test_every_public_module_lists_its_public_names():
    mods, _ = imports()
    missing = [m for m, p in mods.items()
               if not m.rsplit(".", 1)[-1].startswith("_") and "__all__" not in p.read_text()]
    assert missing == []


if __name__ == "__main__":
    mods, imps = imports()
    edges = {(a, b) for a, b, _, _ in imps}
    print(f"{len(mods)} modules, {len(edges)} edges, {len(cycles(edges))} circles, "
          f"{sum(level(b) > level(a) for a, b in edges)} upward, "
          f"{len({(a, b) for a, b, _, lazy in imps if lazy})} function-level")
    for i, prefixes in enumerate(LEVELS):
        print(f"level {i}: {', '.join(prefixes)}")
