"""Progress of long work. The library reports (phase, done, total) to an
optional callback; the CLI plugs in a terminal bar. Phases: "prefill"
(tokens evaluated of the prompt's total), "compress" (0 of the cells
before, then all of them once the compressed layout is written)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]


class Tracker:
    """The running phase's count. Nested phases of the same name (a budgeted
    prefill's chunks, a prefill inside compress) count toward the outer one."""

    def __init__(self):
        self.callback: ProgressFn | None = None
        self._phase: str | None = None
        self._done = self._total = 0

    @contextlib.contextmanager
    def phase(self, name: str, total: int):
        if self.callback is None or self._phase is not None:  # nobody listens, or an outer phase counts
            yield
            return
        self._phase, self._done, self._total = name, 0, max(int(total), 1)
        self.callback(name, 0, self._total)
        try:
            yield
        finally:
            self._phase = None

    def advance(self, n: int):
        if self._phase is not None:
            self._done = min(self._total, self._done + int(n))
            self.callback(self._phase, self._done, self._total)

    def event(self, name: str, done: int, total: int):
        """A one-shot report outside any counted phase (a compression)."""
        if self.callback is not None and self._phase is None:
            self.callback(name, int(done), int(total))


class TerminalBar:
    """A tqdm bar on stderr per phase, shown only for work longer than a
    second and only on a terminal (never when piped or with --json)."""

    UNITS = {"prefill": "tok", "compress": "cell"}

    def __init__(self, file=None):
        self.file = file or sys.stderr
        self._bar = None
        self._phase = None

    def __call__(self, phase: str, done: int, total: int):
        from tqdm.auto import tqdm

        if phase != self._phase or self._bar is None:
            self.close()
            self._phase = phase
            self._bar = tqdm(total=total, desc=phase, unit=self.UNITS.get(phase, "it"), file=self.file,
                             leave=False, delay=1.0, dynamic_ncols=True)
        self._bar.update(done - self._bar.n)  # update() keeps tqdm's delay and refresh interval
        if done >= total:
            self.close()

    def close(self):
        if self._bar is not None:
            self._bar.close()
        self._bar, self._phase = None, None


def terminal_bar(enabled: bool = True) -> TerminalBar | None:
    """A bar when stderr is a terminal and `enabled`, else None."""
    return TerminalBar() if enabled and sys.stderr.isatty() else None
