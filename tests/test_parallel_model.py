"""The pipeline model of benchmarks/parallel.py (benchmarks/parallel_model.py): its arithmetic on
made-up inputs whose answers can be worked out by hand. Nothing is timed here."""
import os
import sys

import pytest

from bll_ref.parallel import balanced_groups

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from parallel_model import (ACT_BYTES, N, best_split, copy_counts, copy_rate_at, cost_at,  # noqa: E402
                            message_s, predict_step)

MS = 1e-3
# two points: 8 B take 1 us, 1 MB take 101 us (100 us per MB beyond 8 B)
MSG = {"small_8B": {"bytes": 8, "one_way_s": 1e-6}, "big": {"bytes": 8 + 10 ** 6, "one_way_s": 101e-6}, "note": "x"}
COSTS = {N: [4 * MS, 6 * MS, 2 * MS], N // 2: [2.5 * MS, 3.5 * MS, 1.5 * MS]}  # per block at 128 and 64 rows
PBYTES = [10 ** 6, 2 * 10 ** 6, 0]
RATES = {1: 1e10, 2: 5e9}  # bytes/s with 1 and with 2 processes copying at once


def test_cost_at_takes_only_measured_rows():
    assert cost_at({"128": [1.0]}, 128) == [1.0]
    with pytest.raises(ValueError, match="no block costs measured at 32 rows"):
        cost_at(COSTS, 32)
    with pytest.raises(ValueError):
        cost_at(COSTS, 42.5)


def test_message_time_is_piecewise_linear_and_extends_the_last_segment():
    assert message_s(MSG, 8) == pytest.approx(1e-6)
    assert message_s(MSG, 8 + 5 * 10 ** 5) == pytest.approx(51e-6)
    assert message_s(MSG, 8 + 2 * 10 ** 6) == pytest.approx(201e-6)  # beyond: 100 us per MB still


def test_copy_counts_and_the_rate_used_for_more_processes_than_measured():
    assert copy_counts(1) == [1] and copy_counts(2) == [1, 2] and copy_counts(6) == [1, 2, 4, 6]
    assert copy_rate_at({"1": 3.0, "2": 2.0}, 2) == 2.0
    assert copy_rate_at(RATES, 16) == 5e9  # the most processes measured
    assert copy_rate_at(RATES, 0) == 1e10


def test_one_stage_one_replica_is_the_sequential_step():
    assert predict_step(COSTS, [[0, 1, 2]], 1, MSG, PBYTES, 2, RATES) == pytest.approx(12 * MS)


def test_a_pipeline_step_is_its_slowest_stage_plus_one_activation_message():
    act = message_s(MSG, ACT_BYTES)
    assert predict_step(COSTS, [[0], [1, 2]], 1, MSG, PBYTES, 2, RATES) == pytest.approx(8 * MS + act)
    # 3 stages on 2 cores: the slowest stage stretched by 3 / 2 = 9 ms, more than the work over 2
    # cores (12 / 2 = 6 ms)
    assert predict_step(COSTS, [[0], [1], [2]], 1, MSG, PBYTES, 2, RATES) == pytest.approx(9 * MS + act)


def test_replicas_pay_notes_and_the_record_copies_at_the_shared_copy_rate():
    # 1 stage x 2 replicas on 2 cores: blocks at 64 rows (7.5 ms), one 8-byte note per learner and
    # peer (3 us), and (1 + 1.5) copies of the 3 MB of records at 5 GB/s each (1.5 ms)
    shared = predict_step(COSTS, [[0, 1, 2]], 2, MSG, PBYTES, 2, RATES)
    assert shared == pytest.approx(7.5 * MS + 3e-6 + 2.5 * 3e6 / 5e9)
    # without shared memory the records themselves travel: 1 MB, 2 MB and 0 B messages
    sent = predict_step(COSTS, [[0, 1, 2]], 2, MSG, PBYTES, 2, RATES, shared=False)
    records = message_s(MSG, 10 ** 6) + message_s(MSG, 2 * 10 ** 6) + message_s(MSG, 0)
    assert sent - shared == pytest.approx(records - 3e-6)


def test_best_split_prefers_what_predict_step_says_is_fastest():
    costs = {n: [c * n / N for c in (4 * MS, 6 * MS, 2 * MS)] for n in (N, N // 2)}  # perfectly linear
    stages, replicas, speedup = best_split(costs, 2, MSG, PBYTES, 2, 3, RATES)
    one_by_two = 12 * MS / predict_step(costs, [[0, 1, 2]], 2, MSG, PBYTES, 2, RATES)
    two_by_one = 12 * MS / predict_step(costs, balanced_groups(cost_at(costs, N), 2), 1, MSG, PBYTES, 2, RATES)
    assert speedup == pytest.approx(max(one_by_two, two_by_one))
    assert (stages, replicas) == ((1, 2) if one_by_two > two_by_one else (2, 1))


def test_replicas_stepping_in_shares_split_the_optimiser_and_copy_the_parameters_once():
    # 1 stage x 2 replicas on 2 cores, optimiser steps of 1, 2 and 0.5 ms inside the block costs:
    # blocks at 64 rows (7.5 ms) less half of the 3.5 ms of optimiser steps, two notes per learner
    # and peer (6 us), and 1 (record) + 0.75 (half the sums) + 1 (parameters) copies of 3 MB at 5 GB/s
    opt = [1 * MS, 2 * MS, 0.5 * MS]
    shares = predict_step(COSTS, [[0, 1, 2]], 2, MSG, PBYTES, 2, RATES, opt_s=opt)
    assert shares == pytest.approx(7.5 * MS - 1.75 * MS + 6e-6 + 2.75 * 3e6 / 5e9)
    # across hosts (no shared memory) every replica steps everything: the optimiser seconds do not count
    assert predict_step(COSTS, [[0, 1, 2]], 2, MSG, PBYTES, 2, RATES, shared=False, opt_s=opt) == \
        predict_step(COSTS, [[0, 1, 2]], 2, MSG, PBYTES, 2, RATES, shared=False)
    # one replica: nothing to share
    assert predict_step(COSTS, [[0, 1, 2]], 1, MSG, PBYTES, 2, RATES, opt_s=opt) == pytest.approx(12 * MS)
