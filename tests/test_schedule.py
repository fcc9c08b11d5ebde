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


def test_items_waiting_for_a_worker_task_join_when_it_ends_and_the_others_do_not_wait():
    ended: dict = {}
    with Workers(1) as workers:
        workers.warm()
        pretrain = workers.submit(nap, 1.5)  # e.g. the pretrain on h*, which the oracle cells wait for
        t0 = time.perf_counter()
        queue = WorkQueue(workers, lambda item: (nap, (0.05,)),
                          lambda item, pid: ended.setdefault(item, (time.perf_counter() - t0, pid)), lambda item: 1)
        queue.run(["learned"], {pretrain: lambda: ["oracle"]})
        assert pretrain.done()
    assert ended["learned"][0] < 1.0 and ended["learned"][1] == os.getpid()  # did not wait for the pretrain
    assert ended["oracle"][0] >= 1.4  # joined once it ended
