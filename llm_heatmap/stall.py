"""Named points of a run where a test can hold the process, to signal or race it at exactly that point.

`stall_point(name)` does nothing unless $LLM_HEATMAP_STALL_AT equals `name`. Then, the first time the
point is reached, it creates the file $LLM_HEATMAP_STALL_MARKER and waits until that file is removed
(the test's "go on"), a signal's handler raises, or 600 s pass. Points: "model-loading" (the output set
is claimed, the model not yet loaded) and "write:NAME" (the file NAME is complete in its temporary
folder and not yet renamed into place; `analyses.files.atomic_output`).
"""

from __future__ import annotations

import os
import time

_reached: set[str] = set()


def stall_point(name: str) -> None:
    if os.environ.get("LLM_HEATMAP_STALL_AT") != name or name in _reached:
        return
    _reached.add(name)
    marker = os.environ["LLM_HEATMAP_STALL_MARKER"]
    open(marker, "w").close()
    deadline = time.monotonic() + 600
    while os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.005)
