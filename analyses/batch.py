"""Batch runs: per-head metrics for every prompt of a file, resumable and shardable.

Layout of an output folder:

    OUT/parts/<prompt key>.parquet   one finished prompt (all its heads), written atomically
    OUT/batch.json                   the settings the parts were computed with
    OUT/heads.parquet, OUT/heads.csv one row per prompt x head (`heads.shard-i-of-n.*` for a shard)

A prompt counts as done exactly when its part file exists, so after an interruption
`resume=True` recomputes only the prompts without a part. Shard `(i, n)` takes prompt k (file
order) when `k % n == i`; shards of one job array share `parts/` and never touch each other's
prompts.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from llm_heatmap.errors import InputError

from .files import atomic_output, check_writable
from .measure import stream_head_metrics
from .prompts import Prompt, check_length, shard_prompts
from .tables import write_table

ROW_COLUMNS = ["model", "prompt_id", "group", "prompt", "n_tokens"]


def part_key(prompt_id: str) -> str:
    """A file name for a prompt id: readable prefix plus a hash, so any id maps to one safe name."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", prompt_id)[:40]
    return f"{readable}-{hashlib.sha1(prompt_id.encode()).hexdigest()[:10]}"


def output_paths(out_dir: str | Path, shard: tuple[int, int] | None = None) -> tuple[Path, Path]:
    """(parquet, csv) paths of the final table of a batch (or of one shard)."""
    out_dir = Path(out_dir)
    stem = "heads" if shard is None else f"heads.shard-{shard[0]}-of-{shard[1]}"
    return out_dir / f"{stem}.parquet", out_dir / f"{stem}.csv"


@dataclass
class BatchResult:
    table: pd.DataFrame
    parquet: Path
    csv: Path
    computed: list[str] = field(default_factory=list)  # prompt ids measured in this run
    skipped: list[str] = field(default_factory=list)  # prompt ids found already done


def _progress(total: int, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="batch", unit="prompt", file=sys.stderr, disable=quiet or not sys.stderr.isatty())


def _check_settings(path: Path, settings: dict, *, resume: bool) -> None:
    if resume and path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous is not None and previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise InputError(
                f"{path.parent} holds a batch run with other settings ({', '.join(changed)} differ); "
                "resume with the same options, or use another out_dir."
            )
    with atomic_output(path, force=True) as temp:
        temp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def run_batch(
    model,
    tokenizer,
    prompts: list[Prompt],
    out_dir: str | Path,
    *,
    spec=None,
    source: str | None = None,
    chat: bool = False,
    shard: tuple[int, int] | None = None,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    on_prompt: Callable[[Prompt, pd.DataFrame], None] | None = None,
    measure: Callable[..., pd.DataFrame] | None = None,
    **capture_options,
) -> BatchResult:
    """Measure every prompt of `prompts` (or of `shard=(i, n)`) and write one row per prompt x head.

    Every prompt is checked (non-empty, fits `spec.max_positions`) before anything is written.
    `resume=True` skips prompts whose part file exists (their rows are read back, not recomputed);
    without it an existing batch in `out_dir` is an `InputError` unless `force=True`, which
    recomputes this shard's prompts. `on_prompt(prompt, table)` runs after each finished prompt.
    `measure(model, tokenizer, text, spec=, chat=, **capture_options)` defaults to
    `stream_head_metrics`.
    """
    from llm_heatmap.models import spec_from_model

    spec = spec or spec_from_model(model)
    measure = measure or stream_head_metrics
    out_dir = Path(out_dir)
    mine = shard_prompts(prompts, shard)
    counts = {p.id: check_length(tokenizer, spec, p.text, chat=chat, where=f"prompt '{p.id}'") for p in mine}

    parquet_path, csv_path = output_paths(out_dir, shard)
    parts = out_dir / "parts"
    part_paths = {p.id: parts / f"{part_key(p.id)}.parquet" for p in mine}
    if not resume and not force:
        for path in [parquet_path, csv_path, *part_paths.values()]:
            if path.exists():
                raise InputError(
                    f"{out_dir} already holds results of a batch ({path.name}); pass resume=True to continue it, "
                    "force=True to recompute, or choose another out_dir."
                )
    for path in (parquet_path, csv_path):
        check_writable(path, force=True)
    parts.mkdir(parents=True, exist_ok=True)
    if force and not resume:
        for path in part_paths.values():
            path.unlink(missing_ok=True)
    model_name = source or spec.architecture
    settings = {"model": model_name, "spec": spec.summary, "chat": chat,
                "capture_options": {k: repr(v) for k, v in sorted(capture_options.items())}}
    _check_settings(out_dir / "batch.json", settings, resume=resume)

    result = BatchResult(table=pd.DataFrame(), parquet=parquet_path, csv=csv_path)
    tables = []
    with _progress(len(mine), quiet) as bar:
        for prompt in mine:
            path = part_paths[prompt.id]
            if resume and path.exists():
                table = pd.read_parquet(path)
                if table["prompt"].iloc[0] != prompt.text:
                    raise InputError(
                        f"prompt '{prompt.id}' changed since the interrupted run; resume with the same prompt file, "
                        "or pass force=True to recompute."
                    )
                result.skipped.append(prompt.id)
            else:
                table = measure(model, tokenizer, prompt.text, spec=spec, chat=chat, **capture_options)
                table = table.reset_index(drop=True)
                front = pd.DataFrame({"model": model_name, "prompt_id": prompt.id, "group": prompt.group,
                                      "prompt": prompt.text, "n_tokens": counts[prompt.id]}, index=table.index)
                table = pd.concat([front, table.drop(columns=ROW_COLUMNS, errors="ignore")], axis=1)
                table["group"] = table["group"].astype("string")
                write_table(table, path, force=True)
                table = pd.read_parquet(path)  # same dtypes whether a prompt was computed now or resumed
                result.computed.append(prompt.id)
                if on_prompt is not None:
                    on_prompt(prompt, table)
            tables.append(table)
            bar.update(1)

    result.table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=ROW_COLUMNS)
    write_table(result.table, parquet_path, force=True)
    write_table(result.table, csv_path, force=True)
    return result


def read_batch(out_dir: str | Path) -> pd.DataFrame:
    """The rows of a finished batch folder: `heads.parquet`, or all shard tables concatenated."""
    out_dir = Path(out_dir)
    whole, _ = output_paths(out_dir)
    if whole.exists():
        return pd.read_parquet(whole)
    shards = sorted(out_dir.glob("heads.shard-*-of-*.parquet"))
    if not shards:
        raise InputError(f"{out_dir} holds no batch results (heads.parquet); run `llm-heatmap batch` first.")
    return pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)
