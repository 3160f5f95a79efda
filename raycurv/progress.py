"""Console progress of a run's long phases, on stderr (stdout keeps the summary, or --json).

On a terminal: a bar with ETA (tqdm) per phase of many steps (epochs, reference models). Anywhere
else (a log piped to a file, CI): one plain line per finished step, with no carriage returns or
color codes, so the log reads as it was written. A phase of one step (the duplicate search,
preparing a dataset) is one line when it is done. Ray workers report steps to the driver through
a ``Relay``; only the driver renders.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO


def on_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal a bar can be drawn on (a pseudo-terminal of no width or
    no height, as some CI runners give, is not: tqdm would draw an empty bar, or with no rows hide
    it as one that does not fit)."""
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        return False
    try:
        size = os.get_terminal_size(stream.fileno())
        return size.columns > 0 and size.lines > 0
    except (OSError, ValueError):  # no file descriptor, or not one with a size: tqdm's default width
        return True


class Steps:
    """Progress over ``total`` steps (``what`` 3/12): ``begin(done)`` when the work starts (a
    resumed run starts where it stopped; the ETA counts from there), ``step(note)`` after each."""

    def __init__(self, what: str, total: int, *, unit: str = "step", stream: TextIO | None = None):
        self.what, self.total, self.unit, self.done = what, total, unit, 0
        self.stream = stream if stream is not None else sys.stderr
        self._tty = on_terminal(self.stream)
        self._bar = None

    def line(self, note: str = "") -> str:
        """The plain line of the latest step."""
        return f"{self.what} {self.done}/{self.total}" + (f"  {note}" if note else "")

    def begin(self, done: int = 0) -> None:
        """The work starts, ``done`` steps done already; on a terminal the bar appears."""
        self.done = done
        if self._tty and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(desc=self.what, total=self.total, unit=self.unit, initial=done,
                             file=self.stream, dynamic_ncols=True, leave=True)

    def step(self, note: str = "", *, done: int | None = None) -> None:
        """One more step finished (``done``: the steps finished now, when not one more)."""
        done = self.done + 1 if done is None else done
        if not self._tty:
            self.done = done
            print(self.line(note), file=self.stream, flush=True)
            return
        if self._bar is None:
            self.begin(done - 1)
        self._bar.set_postfix_str(note, refresh=False)
        if done < self._bar.n:  # a step done again (a restarted worker redoes an epoch)
            self._bar.n = done - 1
        if not self._bar.update(done - self._bar.n):  # tqdm redraws at most every 0.1 s
            self._bar.refresh()
        self.done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def phase(what: str, *, stream: TextIO | None = None) -> Iterator[None]:
    """A long step of one piece: ``what: N s`` once it is done; on a terminal ``what ...`` too,
    while it runs. Nothing is printed when it fails (the error says it)."""
    stream = stream if stream is not None else sys.stderr
    if on_terminal(stream):
        print(f"{what} ...", file=stream, flush=True)
    started = time.perf_counter()
    yield
    print(f"{what}: {time.perf_counter() - started:.0f} s", file=stream, flush=True)


@contextlib.contextmanager
def counted(what: str, total: int, *, unit: str, stream: TextIO | None = None
            ) -> Iterator[Callable[[], None]]:
    """A long step of many small pieces (the parts of a prepared dataset): on a terminal a bar
    with ETA over ``total`` pieces, off one only phase's line when it is done (not a line a
    piece). Yields the callable that marks one piece done."""
    stream = stream if stream is not None else sys.stderr
    if not on_terminal(stream):
        with phase(what, stream=stream):
            yield lambda: None
        return
    with Steps(what, total, unit=unit, stream=stream) as steps:
        steps.begin()
        yield steps.step


class Relay:
    """Steps reported by Ray workers (``put``, on a handle that travels in a task's or a training
    loop's config), rendered on the driver by ``render(item)`` in a thread while the phase runs.
    Behind it: a queue actor of no CPUs, outside any placement group."""

    def __init__(self, render: Callable[[Any], None]):
        from ray.util.queue import Queue

        from raycurv.cluster import outside_placement_groups

        self.queue = Queue(actor_options={"num_cpus": 0,
                                          "scheduling_strategy": outside_placement_groups()})
        self._render, self._stop = render, threading.Event()
        self._thread = threading.Thread(target=self._drain, name="raycurv-progress", daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.queue.shutdown()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            stopping = self._stop.is_set()  # read before the last get: nothing put is left behind
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                if stopping:
                    return
                continue
            self._render(item)
