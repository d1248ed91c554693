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
  process that dies, so a killed run blocks nobody. Two outputs of one set naming the same file (also
  through `..` or a symbolic link) are refused first, and a run that fails removes the outputs it wrote,
  so an output set is whole or absent.
- A full disk (ENOSPC, EDQUOT) on any write is one sentence (`disk_full`), whichever library wrote.
"""

from __future__ import annotations

import contextlib
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


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk is full: an OSError with ENOSPC or EDQUOT, or a library's own error
    (safetensors writes through Rust) that carries the system's words for them."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return any(words in str(error) for words in ("No space left on device", "Disk quota exceeded",
                                                 f"os error {errno.ENOSPC}", f"Errno {errno.ENOSPC}]"))


def disk_full(path) -> InputError:
    """The one sentence for a write that found the disk full."""
    return InputError(f"the disk is full while writing {path}; free some space or choose another output "
                      "directory (no half-written file was left).")


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
    rename it to `path` only on success. The writer may make it a file or a directory (a directory
    replaces only an absent or empty `path`). A `path` that is itself inside such a folder (a save inside
    the CLI's atomic output) is yielded as it is: the outer rename makes it atomic."""
    path = Path(path)
    if path.parent.name.endswith(f".{TEMP_MARK}"):  # already the temporary of an outer atomic_output
        yield path
        return
    check_writable(path, force=force)
    folder = None
    try:  # the folder is made inside the try, so a stop that lands right after it still removes it
        try:
            folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=f".{TEMP_MARK}"))
        except OSError as error:
            raise (disk_full(path) if is_disk_full(error) else error) from None
        temp = folder / path.name
        yield temp
        stall_point(f"write:{path.name}")
        umask = os.umask(0)
        os.umask(umask)
        # writers that replace the file through their own temporary leave 0600
        os.chmod(temp, (0o777 if temp.is_dir() else 0o666) & ~umask)
        os.replace(temp, path)
    except Exception as error:
        if is_disk_full(error):
            raise disk_full(path) from None
        raise
    finally:
        if folder is not None:
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
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full(path) from None
            raise InputError(f"output file {path} cannot be claimed: its lock file {lock} cannot be created "
                             f"({error.strerror}); choose another directory.") from None
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
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as error:
            raise (disk_full(path) if is_disk_full(error) else error) from None
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def claim_outputs(paths, *, force: bool, resumable: bool = False):
    """Hold every path of an output set for this run (module docstring), then check that each may be
    written (`check_writable`); a path another run holds, or two paths of the set that are one file, is an
    `InputError`, and nothing is changed. When the run fails, the outputs it wrote are removed, unless the
    run is `resumable` (batch, atlas: its settings file stays with its parts for --resume)."""
    paths = [Path(p) for p in paths]
    check_distinct(paths)
    made = _missing_folders(path.parent for path in paths)
    try:
        for path in paths:
            _check_folder(path.parent)
        with _held(paths, force=force, resumable=resumable):
            yield
    except BaseException:
        for folder in made:  # deepest first; only an empty folder goes (a refused run leaves none behind)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _missing_folders(folders) -> list[Path]:
    """The folders (and their absent parents) that do not exist yet, deepest first."""
    missing = set()
    for folder in folders:
        folder = Path(folder).absolute()
        while not folder.exists() and folder != folder.parent:
            missing.add(folder)
            folder = folder.parent
    return sorted(missing, key=lambda f: len(f.parts), reverse=True)


@contextmanager
def _held(paths: list[Path], *, force: bool, resumable: bool):
    with ExitStack() as held:
        for path in sorted(set(paths), key=lambda p: str(p.resolve())):
            held.enter_context(_locked(path))
        for path in paths:
            check_writable(path, force=force)
        before = {path: _identity(path) for path in paths}
        try:
            yield
        except BaseException as error:
            # a reader of stdout that left (`... | head`) stops only the summary: the outputs are complete
            keep = resumable or isinstance(error, BrokenPipeError)
            for path in [] if keep else paths:
                if _identity(path) not in (None, before[path]):
                    path.unlink(missing_ok=True)
            raise


def check_distinct(paths) -> None:
    """Refuse an output set in which two paths are one file: the same path resolved (`..`, symbolic links
    of the path or its folders), or two names of one existing file."""
    seen = {}
    for path in map(Path, paths):
        key = path.resolve()
        identity = _identity(path)
        for other_key, (other, other_identity) in seen.items():
            if key == other_key or (identity is not None and identity[:2] == (other_identity or ())[:2]):
                raise InputError(f"two outputs of this run are the same file: {other} and {path}; give each "
                                 "output its own path.")
        seen[key] = (path, identity)


def _identity(path: Path):
    """(device, inode, modification time) of the file at `path`, None when absent."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns


def check_cube_path(path) -> Path:
    """`path` as a Path, if it names an existing regular file; else one sentence (before anything heavy loads)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"cube file {path} does not exist; pass a file written by AttentionCube.save or `llm-heatmap grid`.")
    if not path.is_file():
        raise InputError(f"cube file {path} is not a regular file (a folder, pipe or device); pass a file written by "
                         "AttentionCube.save or `llm-heatmap grid`.")
    return path
