"""Output files that are either complete or absent: write to a temporary name, then rename."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from llm_heatmap.errors import InputError


def check_writable(path: Path, *, force: bool) -> None:
    """Refuse early (before any work) when `path` exists or its folder cannot be written."""
    if path.exists() and not force:
        raise InputError(f"output file {path} already exists; pass force=True to overwrite it or choose another path.")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"output directory {folder} cannot be created ({error.strerror}); choose another directory.") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"output directory {folder} is not writable; choose another directory.")


@contextmanager
def atomic_output(path: str | Path, *, force: bool = False):
    """Yield a temporary path beside `path` (same suffix); rename it to `path` only on success."""
    path = Path(path)
    check_writable(path, force=force)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix="".join(path.suffixes[-1:]))
    os.close(handle)
    temp = Path(temp)
    try:
        yield temp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp (and writers that replace the file) leave 0600
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
