"""Execute the notebooks of this folder top to bottom, or check that they are stored without outputs.

What it does
------------
Runs every ``*.ipynb`` next to this file, in name order (``01_...``, ``02_...``, ``03_...``), with
nbclient on an ipykernel ``python3`` kernel that is *this* Python (the one running the script: the
project's ``.venv``), a time limit per cell, and a fresh temporary working directory per notebook
(so the files a notebook writes, e.g. an HDF5 export, never land in the repository). The executed
copies go to ``--out``; the stored notebooks stay without outputs. One line per notebook with its
time; exit 1 naming the notebook and the cell on any error (every notebook is still run).

    .venv/bin/python examples/notebooks/run_notebooks.py --out build/notebooks   # what `make notebooks` runs
    .venv/bin/python examples/notebooks/run_notebooks.py 01_one_bll_step.ipynb   # one notebook
    .venv/bin/python examples/notebooks/run_notebooks.py --check-clean           # stored without outputs?

Options: ``--timeout`` seconds per cell (default 300), ``--workdir DIR`` keeps each notebook's files
under ``DIR/<notebook name>/`` instead of a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
KERNEL = "python3"


def _need(module):
    try:
        return __import__(module)
    except ImportError:
        sys.exit(f"run_notebooks: needs {module}; install the docs extra: pip install -e '.[docs]' "
                 "(make notebooks does)")


def notebooks(names=()) -> list[pathlib.Path]:
    """The notebooks to run: ``names`` (file names in this folder or paths), else all, in name order."""
    if not names:
        return sorted(HERE.glob("*.ipynb"))
    out = []
    for n in names:
        p = pathlib.Path(n)
        p = p if p.exists() else HERE / n
        if not p.is_file():
            sys.exit(f"run_notebooks: no notebook {n!r} (looked in . and {HERE})")
        out.append(p)
    return out


def dirty_cells(nb) -> list[int]:
    """Indices of the code cells of notebook ``nb`` (its JSON as a dict) that carry outputs or an
    execution count."""
    return [i for i, c in enumerate(nb["cells"])
            if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]


def check_clean(paths) -> int:
    """0 if every notebook is stored without outputs and with the python3 kernelspec, else 1
    (plain JSON: needs no Jupyter package)."""
    bad = 0
    for p in paths:
        nb = json.loads(p.read_text(encoding="utf-8"))
        cells = dirty_cells(nb)
        kernel = nb.get("metadata", {}).get("kernelspec", {}).get("name")
        if cells:
            bad += 1
            print(f"{p.name}: code cells {cells} have outputs or execution counts; clear them "
                  "(jupyter nbconvert --clear-output --inplace, or Edit > Clear All Outputs) before committing")
        elif kernel != KERNEL:
            bad += 1
            print(f"{p.name}: kernelspec {kernel!r}, expected {KERNEL!r}")
        else:
            print(f"{p.name}: clean")
    return 1 if bad else 0


def kernel_path(tmp) -> str:
    """A kernelspec ``python3`` that launches this interpreter, for JUPYTER_PATH: a user's own
    ``python3`` kernelspec (another Python, without bll_ref) must not be picked up instead."""
    spec = pathlib.Path(tmp) / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.executable})", "language": "python",
        "metadata": {"supported_encryption": ["curve"]}}))  # as ipykernel's own spec: no plain-TCP warning
    return str(tmp)


def kernel_manager():
    """A manager for the ``python3`` kernel; with CurveZMQ-encrypted sockets where this jupyter_client
    and libzmq offer them (else ipykernel warns that it runs over TCP without encryption)."""
    import zmq
    from jupyter_client import AsyncKernelManager
    if "transport_encryption" in AsyncKernelManager.class_trait_names() and zmq.has("curve"):
        return AsyncKernelManager(kernel_name=KERNEL, transport_encryption="auto")
    return AsyncKernelManager(kernel_name=KERNEL)


def kernel_executable(timeout) -> str:
    """sys.executable as the notebooks' kernel reports it (one tiny notebook)."""
    nbformat, nbclient = _need("nbformat"), _need("nbclient")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable, end='')")])
    nbclient.NotebookClient(nb, km=kernel_manager(), timeout=timeout).execute(cleanup_kc=True)
    return "".join(o.get("text", "") for o in nb.cells[0].outputs)


def _cell_name(cell, index) -> str:
    first = (cell.source.strip().splitlines() or [""])[0]
    return f"cell {index} (0-based, Markdown counted; {first[:40]!r})"


def execute(path, out_dir, workdir, timeout):
    """Run one notebook; returns (seconds, None) or (seconds, 'cell i (...): error')."""
    nbformat, nbclient = _need("nbformat"), _need("nbclient")
    nb = nbformat.read(path, as_version=4)
    where = {}
    client = nbclient.NotebookClient(
        nb, km=kernel_manager(), timeout=timeout, resources={"metadata": {"path": str(workdir)}},
        on_cell_start=lambda cell, cell_index: where.update(cell=_cell_name(cell, cell_index)))
    t0 = time.perf_counter()
    error = None
    try:
        client.execute(cleanup_kc=True)  # shut the kernel down: nbclient leaves a given manager's running
    except nbclient.exceptions.CellTimeoutError:
        error = f"{where.get('cell')}: took more than {timeout} s"
    except nbclient.exceptions.CellExecutionError as e:
        error = f"{where.get('cell')}: {e.ename}: {e.evalue}"
    except Exception as e:  # the kernel died, could not start, ...
        error = f"{where.get('cell', 'before the first cell')}: {type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    if out_dir is not None:
        nbformat.write(nb, out_dir / path.name)  # also a failed run: its error output is the report
    return seconds, error


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("names", nargs="*", help="notebooks to run (default: all in this folder)")
    ap.add_argument("--out", type=pathlib.Path, help="write the executed notebooks here")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per cell (default 300)")
    ap.add_argument("--workdir", type=pathlib.Path, help="keep each notebook's files under DIR/<name>/")
    ap.add_argument("--check-clean", action="store_true",
                    help="only check that the stored notebooks have no outputs (exit 1 if one has)")
    args = ap.parse_args(argv)
    paths = notebooks(args.names)
    if not paths:
        print(f"run_notebooks: no notebooks in {HERE}", file=sys.stderr)
        return 1
    if args.check_clean:
        return check_clean(paths)
    if args.timeout < 1:
        ap.error(f"--timeout must be >= 1 second, got {args.timeout}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend shows the figures
    failed = []
    with tempfile.TemporaryDirectory(prefix="bll-notebooks-") as tmp:
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            [kernel_path(pathlib.Path(tmp) / "jupyter")] + [p for p in [os.environ.get("JUPYTER_PATH")] if p])
        exe = kernel_executable(args.timeout)
        if os.path.abspath(exe) != os.path.abspath(sys.executable):  # not realpath: a venv's python is a link
            print(f"run_notebooks: the {KERNEL} kernel runs {exe!r}, not {sys.executable!r}", file=sys.stderr)
            return 1
        print(f"kernel {KERNEL}: {exe}; {args.timeout} s per cell")
        total = time.perf_counter()
        for p in paths:
            work = (args.workdir.resolve() / p.stem) if args.workdir else pathlib.Path(tmp) / p.stem
            work.mkdir(parents=True, exist_ok=True)
            seconds, error = execute(p, args.out, work, args.timeout)
            print(f"{p.name}: {'FAILED' if error else 'ok'} in {seconds:.1f} s" + (f": {error}" if error else ""),
                  flush=True)
            if error:
                failed.append(f"{p.name} {error.split(' (')[0]}")
        total = time.perf_counter() - total
    print(f"{len(paths) - len(failed)} of {len(paths)} notebooks ran in {total:.1f} s"
          + (f"; executed copies in {args.out}" if args.out else ""))
    if failed:
        print("run_notebooks: failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
