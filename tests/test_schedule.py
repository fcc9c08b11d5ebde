"""schedule.WorkQueue: every item runs once, here or in a worker, and is recorded here; idle time is filled."""

import os
import time

from cdmtransfer.schedule import WorkQueue, Workers


def nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_items_run_once_and_a_free_sweep_process_takes_back_what_a_worker_has_not_started():
    where: dict = {}
    work = {"big": 4, "a": 1, "b": 1, "c": 1, "d": 1}
    with Workers(1) as workers:
        workers.warm()
        queue = WorkQueue(workers, lambda item: (nap, (0.05 if item == "big" else 1.0,)),
                          lambda item, pid: where.setdefault(item, pid), work.get)
        queue.run(["big", "a", "b", "c", "d"])
    assert sorted(where) == sorted(work)  # each recorded once
    assert where["big"] == os.getpid()  # this process takes the largest item
    here = [item for item in "abcd" if where[item] == os.getpid()]
    # the worker got a-d (as much waiting work as "big", and two at least); this process, done with "big" at once,
    # took back those the worker had not started: all but "a", which the pool had already handed to it
    assert where["a"] != os.getpid() and len(here) >= 1
