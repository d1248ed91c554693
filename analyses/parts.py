"""Per-prompt part files of a resumable run, and the settings file that says how they were computed.

A run (`batch`, `atlas`) writes each finished prompt to its own file under `parts/`, named by
`part_key(prompt id)`, atomically; a prompt counts as done exactly when its file exists, so a
resumed run computes only the others, with any number of ranks or shards. Beside the parts, each
run writes its settings as JSON (one file per shard: shards never write the same file); a resumed
run must find the same settings in every settings file of the folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from llm_heatmap.errors import InputError

from .files import atomic_output


def part_key(prompt_id: str) -> str:
    """A file name for a prompt id: readable prefix plus a hash, so any id maps to one safe name."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", prompt_id)[:40]
    return f"{readable}-{hashlib.sha1(prompt_id.encode()).hexdigest()[:10]}"


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
