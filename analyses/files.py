"""Output files that are either complete or absent, and output sets that one run at a time writes.

- `atomic_output(path)` writes to a file in a temporary folder beside `path` and renames it over `path`
  only on success. The folder is named `.NAME.PID-XXXX.llm-heatmap-tmp`: recognisable, and carrying
  the writer's process id, so a later run writing `NAME` removes those whose process is gone (a run
  killed with SIGKILL cannot remove its own). A folder rather than a file, because some writers
  (safetensors) write through a temporary file of their own beside the path they are given.
- `claim_outputs(paths)` holds every path of an output set for the run that writes it: an exclusive
  `flock` on a lock file `.NAME.llm-heatmap-lock` beside each path, taken in one order, and only then
  the check that the path may be written (absent, or `force=True`). A second run wanting any of them
  while the first holds it is refused before it changes anything; the kernel releases the locks of a
  process that dies, so a killed run blocks nobody.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

from llm_heatmap.errors import InputError
from llm_heatmap.stall import stall_point

TEMP_MARK = "llm-heatmap-tmp"
LOCK_MARK = "llm-heatmap-lock"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary folders (or files) of `path` left by processes that no longer run; returns them."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-[^.]+\.{TEMP_MARK}")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and _process_gone(int(match.group(1))):
            try:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def check_writable(path: Path, *, force: bool) -> None:
    """Refuse early (before any work) when `path` exists or its folder cannot be written; remove
    temporary files of `path` that killed runs left."""
    if path.exists() and not force:
        raise InputError(f"output file {path} already exists; pass force=True to overwrite it or choose another path.")
    _check_folder(path.parent)
    remove_stale_temporaries(path)


def _check_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"output directory {folder} cannot be created ({error.strerror}); choose another directory.") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"output directory {folder} is not writable; choose another directory.")


@contextmanager
def atomic_output(path: str | Path, *, force: bool = False):
    """Yield a temporary path with `path`'s name, in a temporary folder beside it (module docstring);
    rename it to `path` only on success."""
    path = Path(path)
    check_writable(path, force=force)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=f".{TEMP_MARK}"))
    temp = folder / path.name
    try:
        yield temp
        stall_point(f"write:{path.name}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # writers that replace the file through their own temporary leave 0600
        os.replace(temp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{LOCK_MARK}"


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


@contextmanager
def _locked(path: Path):
    """Hold `path`'s lock file for the block (module docstring); the file is removed at the end."""
    lock = _lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise InputError(f"output file {path} is being written by another llm-heatmap run{_holder(lock)}; wait for "
                             "it to finish, or choose another name or directory.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed after this process opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def claim_outputs(paths, *, force: bool):
    """Hold every path of an output set for this run (module docstring), then check that each may be
    written (`check_writable`); a path another run holds is an `InputError`, and nothing is changed."""
    paths = [Path(p) for p in paths]
    for path in paths:
        _check_folder(path.parent)
    with ExitStack() as held:
        for path in sorted(set(paths), key=lambda p: str(p.resolve())):
            held.enter_context(_locked(path))
        for path in paths:
            check_writable(path, force=force)
        yield
