"""Progress: the one bar every long step shows (`progress_bar`), and the progress of a whole run.

`progress_bar(total, desc, unit)` is a tqdm bar on stderr while `progress_shown(True)` is in effect
(the CLI turns it on on a terminal without --quiet) and a silent one otherwise, so library code
can always tick it. Its size is fixed from the terminal, or 80 x 24 where the terminal reports
none (tqdm draws an empty line on a terminal of size 0 x 0). `LayerProgress` ticks it once per layer of a
streamed capture.

Progress of a whole run, shown by rank 0 only: prompts done / total, rate and time left.

Every rank writes one part file per finished prompt, so the part files are the run's progress,
whichever rank wrote them: rank 0 counts them (one directory listing per folder, every
`interval` seconds, on a background thread) and moves a tqdm bar, which shows the rate and
the time left. Prompts already done when the run starts (resumed) count from the start and
do not enter the rate.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

_SHOWN: ContextVar[bool] = ContextVar("llm_heatmap_progress_shown", default=False)


@contextmanager
def progress_shown(enabled: bool):
    """`with progress_shown(True)`: every `progress_bar` inside the block draws (on stderr)."""
    token = _SHOWN.set(bool(enabled))
    try:
        yield
    finally:
        _SHOWN.reset(token)


def terminal_size() -> tuple[int, int]:
    """(columns, lines) of the terminal, 80 and 24 where it reports none (a pty of size 0 x 0, or no size)."""
    size = shutil.get_terminal_size((80, 24))
    return size.columns or 80, size.lines or 24


def progress_bar(total: int | None, desc: str, unit: str = "step", *, enabled: bool | None = None, initial: int = 0,
                 file=None, leave: bool = False):
    """The project's progress bar: drawn when `enabled` (default: inside `progress_shown(True)`), else silent."""
    from tqdm.auto import tqdm

    shown = _SHOWN.get() if enabled is None else enabled
    columns, lines = terminal_size()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file or sys.stderr, disable=not shown,
                ncols=columns, nrows=lines, leave=leave, mininterval=0.5)


class LayerProgress:
    """A streaming consumer that ticks a `progress_bar` once per captured layer (it reads no weights)."""

    takes_trimmed_parts = True
    takes_value_norms = False

    def __init__(self, num_layers: int, desc: str = "capturing"):
        self.bar = progress_bar(num_layers, desc, unit="layer")
        self.last = None

    def consume(self, part) -> None:
        layer = part.layers[0]
        if self.last is not None and layer != self.last:
            self.bar.update()
        self.last = layer

    def finish(self) -> None:
        if self.last is not None:
            self.bar.update()
        self.bar.close()


class RunProgress:
    """`with RunProgress(paths, enabled=...)`: a bar over `paths`, the part files the whole run will write."""

    def __init__(self, paths, *, enabled: bool, desc: str = "prompts", interval: float = 1.0, file=None):
        self.paths = [Path(p) for p in paths]
        self.enabled = enabled
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        self.bar = None
        if enabled:
            self.bar = progress_bar(len(self.paths), desc, "prompt", enabled=True, initial=self.count(), file=file,
                                    leave=True)

    def count(self) -> int:
        """How many of the run's part files exist now."""
        present = set()
        for folder in {p.parent for p in self.paths}:
            try:
                present |= {folder / entry.name for entry in _entries(folder)}
            except FileNotFoundError:
                continue
        return sum(p in present for p in self.paths)

    def refresh(self) -> None:
        if self.bar is not None:
            self.bar.update(self.count() - self.bar.n)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def __enter__(self) -> "RunProgress":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="run-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.bar is not None:
            if exc[0] is None:
                self.refresh()
            self.bar.close()


def _entries(folder: Path):
    with os.scandir(folder) as entries:
        return [entry for entry in entries if entry.is_file()]
