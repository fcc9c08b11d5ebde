"""Where a sweep's work runs: its own process and `jobs` − 1 spawned worker processes.

A sweep's work is its pretrains and its items (the cells that train as one batched model); the sweep's process
records every item's result (it is the only writer of cell runs). What needs no encoder (the pretrain on h*, the
`scratch` cells) starts in the workers before the sweep's process turns to its own pretrain; the other items train
here and there, largest first, when their encoder is ready (`WorkQueue`).
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Callable


def default_jobs(cells: int) -> int:
    """Processes that train when --jobs is 0, the sweep's own included: one per core, at most one per cell."""
    return max(1, min(cells, os.cpu_count() or 1))


def _start_worker() -> None:
    """Each worker's start: the imports its tasks need (torch, MLflow, its SQLite store and matplotlib for the
    cells' figures: seconds, while the sweep's process does its own and sets up its store when `Workers.warm` spawned
    it), and an exit without a final collection over their objects."""
    import cdmtransfer.curves  # noqa: F401  (imports the stages, torch and the tracking client)
    import matplotlib.backends.backend_agg  # noqa: F401  (plots.conditional_scatter)
    import matplotlib.figure  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (a pretrain's own run: the pretrain on h*)

    atexit.register(gc.freeze)


def _ready() -> None:
    """A task that does nothing: submitting one per worker spawns them all (cdmtransfer.schedule.Workers.warm)."""


class Workers:
    """A sweep's `count` worker processes, kept for the whole sweep. `warm()` spawns them at once; otherwise they
    are spawned when first needed."""

    def __init__(self, count: int):
        self.count, self._pool = max(0, count), None

    def submit(self, fn, *args) -> Future:
        if self._pool is None:  # spawn: no forked torch/OpenMP or SQLite state in workers
            self._pool = ProcessPoolExecutor(max_workers=self.count, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker)
        return self._pool.submit(fn, *args)

    def warm(self) -> None:
        for _ in range(self.count):  # one task each: the pool spawns a process per task while none is idle
            self.submit(_ready)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if self._pool is None:
            return
        if kind is not None:  # stopped or failed: what the workers train is not wanted, and could take minutes
            for process in list((getattr(self._pool, "_processes", None) or {}).values()):
                process.terminate()  # (Python 3.14's ProcessPoolExecutor.terminate_workers does this)
        self._pool.shutdown(wait=True, cancel_futures=True)


class WorkQueue:
    """Items trained here and in `workers`; `call(item)` gives (function, arguments) of an item (picklable for a
    worker), `finish(item, result)` records its result in this process as soon as it is back, `work(item)` estimates
    its cost (to keep the workers busy while this process trains an item of its own)."""

    def __init__(self, workers: Workers, call: Callable, finish: Callable, work: Callable):
        self.workers, self.call, self.finish, self.work = workers, call, finish, work
        self.running: dict[Future, object] = {}

    def start(self, items: list) -> None:
        """Give `items` to the workers now, largest first, and return (this process has other work: its
        pretrain)."""
        for item in sorted(items, key=self.work, reverse=True):
            self._submit(item)

    def run(self, items: list, later: dict[Future, Callable[[], list]] | None = None) -> None:
        """Train `items` (largest first) and wait for those started before. This process takes the first item, then
        the next whenever it is free; before it starts one, the workers get the next items until each has two or
        at least as much work waiting as that item (this process hands out nothing while it trains). With none
        left, it takes back an item a worker has not started.

        `later` maps a future running elsewhere (a worker's pretrain) to what gives the items that wait for it; it
        counts as a worker's item until it ends, then its items join the queue."""
        queue = deque(sorted(items, key=self.work, reverse=True))
        later = dict(later or {})
        while queue or self.running or later:
            self._collect()  # items that ended while this process was busy free their worker's slot first
            for future in [f for f in later if f.done()]:
                queue = deque(sorted([*queue, *later.pop(future)()], key=self.work, reverse=True))
            own = queue.popleft() if queue else self._take_back()
            mine = self.work(own) if own is not None else 0
            while queue and (len(self.running) + len(later) < 2 * self.workers.count
                             or sum(map(self.work, self.running.values())) < mine * self.workers.count):
                self._submit(queue.popleft())
            if own is not None:
                fn, args = self.call(own)
                self.finish(own, fn(*args))
            else:
                wait([*self.running, *later], return_when=FIRST_COMPLETED)
            self._collect()

    def _take_back(self):
        """An item given to a worker that has not started there (the newest first), now this process's to train; or
        None. (The pool has already passed a worker its next item, which can no longer be taken back.)"""
        for future in reversed(list(self.running)):
            if future.cancel():
                return self.running.pop(future)
        return None

    def _submit(self, item) -> None:
        fn, args = self.call(item)
        self.running[self.workers.submit(fn, *args)] = item

    def _collect(self) -> None:
        for future in [f for f in self.running if f.done()]:
            self.finish(self.running.pop(future), future.result())
