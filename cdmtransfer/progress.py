"""Progress of a training loop: a rich bar with loss and ETA on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True, every_seconds: float = 10.0):
        self.total, self.label, self.enabled = total, label, enabled
        self.every = every_seconds
        self._bar = None
        self._task = None
        self._last_print = 0.0
        self._t0 = 0.0
        self._start_step = 0

    def start(self, step: int = 0) -> None:
        if not self.enabled:
            return
        self._t0 = self._last_print = time.perf_counter()
        self._start_step = step
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                     transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=step, loss="…")
        else:
            print(f"[{self.label}] starting at step {step}/{self.total}", file=sys.stderr, flush=True)

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=f"{loss:.4f}")
            return
        now = time.perf_counter()
        if now - self._last_print >= self.every or step == self.total:
            rate = (step - self._start_step) / max(now - self._t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(f"[{self.label}] step {step}/{self.total} loss {loss:.4f} "
                  f"({rate:.0f} steps/s, eta {eta:.0f}s)", file=sys.stderr, flush=True)
            self._last_print = now

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def note(label: str, text: str, enabled: bool = True) -> None:
    """One progress line `[label] text` on stderr, for steps without a loop to show (what --quiet turns off)."""
    if enabled:
        print(f"[{label}] {text}", file=sys.stderr, flush=True)
