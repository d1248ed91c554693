"""Progress of a whole run, shown by rank 0 only: prompts done / total, rate and time left.

Every rank writes one part file per finished prompt, so the part files are the run's progress,
whichever rank wrote them: rank 0 counts them (one directory listing per folder, every
`interval` seconds, on a background thread) and moves a tqdm bar, which shows the rate and
the time left. Prompts already done when the run starts (resumed) count from the start and
do not enter the rate.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path


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
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(self.paths), initial=self.count(), desc=desc, unit="prompt",
                            file=file or sys.stderr, dynamic_ncols=True)

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
