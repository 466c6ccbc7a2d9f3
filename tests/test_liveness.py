"""Start-up beats (bll_ref/parallel/liveness.py): when a rank's main thread counts as working, and
that every beat sent is taken by the end of the start-up. The end-to-end cases (a rank hung, busy
or spinning at start-up): tests/test_parallel_replicas.py."""
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from bll_ref.parallel import liveness
from test_parallel import MPIEXEC, _env, needs_mpi


class _OneRank:
    """A communicator of one rank: no beat thread, only the main-thread check."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1


def _watch(main, monkeypatch, seconds):
    """``_working`` as the beat thread sees it, sampled for ``seconds`` while ``main`` runs in a
    thread of its own (the "main" thread of a StartUpBeats built there)."""
    monkeypatch.setattr(liveness, "STILL", 0.4)
    built, seen = [], []
    t = threading.Thread(target=lambda: (built.append(liveness.StartUpBeats(_OneRank())), main()), daemon=True)
    t.start()
    end = time.perf_counter() + seconds
    while not built:
        time.sleep(0.01)
    while time.perf_counter() < end:
        seen.append(built[0]._working(time.perf_counter()))
        time.sleep(0.05)
    t.join()
    return seen


def test_a_main_thread_asleep_stops_counting_as_working(monkeypatch):
    seen = _watch(lambda: time.sleep(2.0), monkeypatch, 1.5)
    assert seen[0] and not any(seen[-10:])  # still: working at first, then not (STILL 0.4 s)


def test_a_busy_main_thread_counts_as_working(monkeypatch):
    def busy():
        end = time.perf_counter() + 2.0
        while time.perf_counter() < end:
            sum(range(1000))
    assert all(_watch(busy, monkeypatch, 1.5))


def test_a_main_thread_waiting_for_the_others_counts_as_working(monkeypatch):
    """In ``wait`` the main thread sleeps between polls: it is waiting for the others, not hung."""
    monkeypatch.setattr(liveness, "STILL", 0.4)
    b = liveness.StartUpBeats(_OneRank())
    b._main = threading.Thread(target=time.sleep, args=(1.5,), daemon=True)
    b._main.start()
    b._waiting = True
    time.sleep(0.8)
    assert b._working(time.perf_counter())
    b._waiting = False
    b._working(time.perf_counter())
    time.sleep(0.5)
    assert not b._working(time.perf_counter())
    b._main.join()


def test_cpu_ticks_of_a_busy_thread_grow():
    ticks = []

    def busy():
        me = threading.current_thread().native_id
        ticks.append(liveness._cpu_ticks(me))
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            pass
        ticks.append(liveness._cpu_ticks(me))
    t = threading.Thread(target=busy)
    t.start()
    t.join()
    if ticks[0] is None:
        pytest.skip("no /proc/self/task here (not Linux)")
    assert ticks[1] - ticks[0] >= 10  # 0.5 s busy: about 50 ticks of 10 ms


SCRIPT = textwrap.dedent("""
    import time, numpy as np
    from mpi4py import MPI
    from bll_ref.parallel.liveness import StartUpBeats
    comm = MPI.COMM_WORLD
    beats = StartUpBeats(comm)
    if comm.Get_rank() == 1:
        end = time.perf_counter() + 3.0
        while time.perf_counter() < end:  # working, not waiting: it beats, and takes no beats
            pass
    beats.wait(comm.Ibarrier(), "all", "waiting for rank 1")
    time.sleep(1.5)  # still beating (asleep for less than STILL), and taking nothing: beats left on the way
    sent = beats.sent.copy()
    beats.finish(lambda req, peer: req.Wait())
    assert (beats.sent >= sent).all() and (beats.heard > 0).sum() == comm.Get_size() - 1
    every = comm.allgather(beats.sent)
    mine = np.array([every[r][comm.Get_rank()] for r in range(comm.Get_size())])
    assert (beats.heard == mine).all(), (beats.heard, mine)  # every beat sent to this rank was taken
    comm.Barrier()
    assert not any(comm.Iprobe(source=r, tag=11) for r in range(comm.Get_size()))
    print("taken", comm.Get_rank(), int(beats.heard.sum()), flush=True)
""")


@needs_mpi
def test_every_beat_sent_is_taken_by_the_end_of_the_start_up(tmp_path):
    """Three ranks beat while rank 1 works for 3 s and the others wait for it; at the end every rank
    has taken exactly the beats the others sent it, so none is left unmatched at MPI's finalize."""
    (tmp_path / "beats.py").write_text(SCRIPT)
    r = subprocess.run([MPIEXEC, "-n", "3", "--oversubscribe", sys.executable, "-m", "mpi4py", "beats.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    taken = sorted(line.split()[1:] for line in r.stdout.splitlines() if line.startswith("taken"))
    assert [t[0] for t in taken] == ["0", "1", "2"] and all(int(t[1]) > 0 for t in taken), r.stdout
