"""Per-prompt part files of a resumable run, and the settings file that says how they were computed.

A run (`batch`, `atlas`) writes each finished prompt to its own file under `parts/`, named by
`part_key(prompt id)`, atomically and sealed (`write_part`: the SHA-256 of its bytes in a file beside it,
written before the part is renamed into place); a prompt counts as done exactly when its file exists,
reads and matches its seal (`part_done`: an
empty, truncated or overwritten file, which only a damaged disk or a hand can leave, is computed again,
never merged), so a resumed run computes only the others, with any number of ranks or shards. Beside the
parts, each run writes its settings as JSON (one file per shard: shards never write the same file);
a resumed run must find the same settings in every settings file of the folder. The settings file
is also what a run claims (`files.claim_outputs`, by rank 0 for all its ranks), so two runs of one
shard (or two whole runs) on one folder never compute side by side.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

from llm_heatmap.errors import InputError

from llm_heatmap.models.files import atomic_output


def part_key(prompt_id: str) -> str:
    """A file name for a prompt id: readable prefix plus a hash, so any id maps to one safe name."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", prompt_id)[:40]
    return f"{readable}-{hashlib.sha1(prompt_id.encode()).hexdigest()[:10]}"


def seal_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_part(path: Path, write) -> Path:
    """`write(temporary path)` writes the part; its seal (the SHA-256 of those bytes) is written beside
    `path` before the part is renamed into place, so every part file in place has its seal (a run killed in
    between leaves a seal without its part, which is not done)."""
    with atomic_output(path, force=True) as temp:
        write(temp)
        with atomic_output(seal_path(path), force=True) as seal:
            seal.write_text(_digest(temp) + "\n")
    return path


def sealed(path: Path) -> bool:
    """Whether the file `path` exists with the bytes its seal (`seal_part`) names."""
    try:
        return seal_path(path).read_text().strip() == _digest(path)
    except OSError:
        return False


def part_done(path: Path) -> bool:
    """Whether a part file is `sealed` and reads: a Parquet file with rows (its footer), or a safetensors
    file (its header)."""
    if not sealed(path):
        return False
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows > 0
        with safe_open(str(path), framework="numpy") as handle:
            return bool(list(handle.keys()))
    except (OSError, ValueError, SafetensorError):  # missing, empty, truncated or not the format: not done
        return False


def shard_suffix(shard: tuple[int, int] | None) -> str:
    """"" for a whole run, ".shard-i-of-n" for one shard of a job array (in the names of its own files)."""
    return "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"


def check_settings(folder: Path, stem: str, settings: dict, *, resume: bool) -> None:
    """With `resume`, refuse when a settings file `stem*.json` in `folder` holds other settings."""
    if not resume:
        return
    for path in sorted(folder.glob(f"{stem}*.json")):
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise InputError(
                f"{folder} holds a {stem} run with other settings ({', '.join(changed)} differ); "
                "resume with the same options, or use another out_dir."
            )


def write_settings(path: Path, settings: dict) -> None:
    with atomic_output(path, force=True) as temp:
        temp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
