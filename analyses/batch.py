"""Batch runs: per-head metrics for every prompt of a file, resumable, shardable, data-parallel.

Layout of an output folder:

    OUT/parts/<prompt key>.parquet   one finished prompt (all its heads), written atomically
    OUT/batch.json                   the settings the parts were computed with (`batch.shard-i-of-n.json`)
    OUT/heads.parquet, OUT/heads.csv one row per prompt x head (`heads.shard-i-of-n.*` for a shard)

A prompt counts as done exactly when its part file exists, so after an interruption
`resume=True` recomputes only the prompts without a part. Shard `(i, n)` takes prompt k (file
order) when `k % n == i`; shards of one job array share `parts/` and never touch each other's
prompts. Under a launcher (`ranks.launcher_ranks`: torchrun, accelerate launch) the prompts of
the run (or of its shard) still to compute are split between the ranks; each rank writes its
own parts, and after a barrier rank 0 merges every part into the tables. Every rank checks the
input before any rank writes, so bad input stops all of them alike.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from llm_heatmap.errors import InputError

from .files import check_writable, claim_outputs
from .measure import stream_head_metrics
from .parts import check_settings, part_done, part_key, shard_suffix, write_part, write_settings
from .progress import RunProgress
from .prompts import Prompt, check_length, shard_prompts
from .ranks import Ranks, launcher_ranks
from .tables import write_table

ROW_COLUMNS = ["model", "prompt_id", "group", "prompt", "n_tokens"]


def output_paths(out_dir: str | Path, shard: tuple[int, int] | None = None) -> tuple[Path, Path]:
    """(parquet, csv) paths of the final table of a batch (or of one shard)."""
    out_dir = Path(out_dir)
    stem = f"heads{shard_suffix(shard)}"
    return out_dir / f"{stem}.parquet", out_dir / f"{stem}.csv"


@dataclass
class BatchResult:
    """What a run did. On rank 0 `table`, `computed` and `skipped` cover every prompt of the run (or
    shard); on another rank of a launched run, only the prompts of that rank's share."""

    table: pd.DataFrame
    parquet: Path
    csv: Path
    computed: list[str] = field(default_factory=list)  # prompt ids measured in this run
    skipped: list[str] = field(default_factory=list)  # prompt ids found already done


def read_part(path: Path, prompt: Prompt) -> pd.DataFrame:
    """A finished prompt's rows, refused when the prompt's text changed since they were written."""
    table = pd.read_parquet(path)
    if table["prompt"].iloc[0] != prompt.text:
        raise InputError(
            f"prompt '{prompt.id}' changed since the interrupted run; resume with the same prompt file, "
            "or pass force=True to recompute."
        )
    return table


def _concat(tables: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=ROW_COLUMNS)


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
    ranks: Ranks | None = None,
    on_prompt: Callable[[Prompt, pd.DataFrame], None] | None = None,
    measure: Callable[..., pd.DataFrame] | None = None,
    **capture_options,
) -> BatchResult:
    """Measure every prompt of `prompts` (or of `shard=(i, n)`) and write one row per prompt x head.

    Every prompt is checked (non-empty, fits `spec.max_positions`) before anything is written.
    `resume=True` skips prompts whose part file exists (their rows are read back, not recomputed);
    without it an existing batch in `out_dir` is an `InputError` unless `force=True`, which
    recomputes this shard's prompts. `ranks` (default: from the launcher's environment) splits
    the prompts to compute between processes (module docstring). `on_prompt(prompt, table)` runs
    after each finished prompt. `measure(model, tokenizer, text, spec=, chat=, **capture_options)`
    defaults to `stream_head_metrics`. `quiet` turns off the progress bar (shown by rank 0 only,
    on a terminal).
    """
    from llm_heatmap.models import spec_from_model

    spec = spec or spec_from_model(model)
    ranks = launcher_ranks() if ranks is None else ranks
    measure = measure or stream_head_metrics
    out_dir = Path(out_dir)
    mine = shard_prompts(prompts, shard)
    counts = {p.id: check_length(tokenizer, spec, p.text, chat=chat, where=p.where) for p in mine}

    parquet_path, csv_path = output_paths(out_dir, shard)
    part_paths = {p.id: out_dir / "parts" / f"{part_key(p.id)}.parquet" for p in mine}
    if not resume and not force:
        for path in [parquet_path, csv_path, *part_paths.values()]:
            if path.exists():
                raise InputError(
                    f"{out_dir} already holds results of a batch ({path.name}); pass resume=True to continue it, "
                    "force=True to recompute, or choose another out_dir."
                )
    for path in (parquet_path, csv_path):
        check_writable(path, force=True)
    model_name = source or spec.architecture
    settings = {"model": model_name, "spec": spec.summary, "chat": chat,
                "capture_options": {k: repr(v) for k, v in sorted(capture_options.items())}}
    check_settings(out_dir, "batch", settings, resume=resume)
    settings_path = out_dir / f"batch{shard_suffix(shard)}.json"
    with claim_outputs([settings_path] if ranks.is_main else [], force=True, resumable=True):  # one run of this shard at a time
        parts = out_dir / "parts"
        done = [p for p in mine if resume and part_done(part_paths[p.id])]
        tables = {p.id: read_part(part_paths[p.id], p) for p in ranks.share(done)}  # each rank checks its share
        pending = [p for p in mine if p not in done]
        ranks.barrier()  # every rank has checked its input; from here on files change

        parts.mkdir(parents=True, exist_ok=True)
        if ranks.is_main:
            write_settings(settings_path, settings)
        if force and not resume:
            # an interrupted forced run must not leave old parts that a later resume would take as done
            for prompt in ranks.share(pending):
                part_paths[prompt.id].unlink(missing_ok=True)
            ranks.barrier()
        result = BatchResult(table=pd.DataFrame(), parquet=parquet_path, csv=csv_path,
                             skipped=[p.id for p in ranks.share(done)])
        progress = RunProgress(part_paths.values(), enabled=ranks.is_main and not quiet and sys.stderr.isatty(), desc="batch")
        with progress:
            for prompt in ranks.share(pending):
                path = part_paths[prompt.id]
                table = measure(model, tokenizer, prompt.text, spec=spec, chat=chat, **capture_options)
                table = table.reset_index(drop=True)
                front = pd.DataFrame({"model": model_name, "prompt_id": prompt.id, "group": prompt.group,
                                      "prompt": prompt.text, "n_tokens": counts[prompt.id]}, index=table.index)
                table = pd.concat([front, table.drop(columns=ROW_COLUMNS, errors="ignore")], axis=1)
                table["group"] = table["group"].astype("string")
                write_part(path, lambda temp: write_table(table, temp))
                result.computed.append(prompt.id)
                tables[prompt.id] = pd.read_parquet(path)  # the same dtypes as a resumed prompt's
                if on_prompt is not None:
                    on_prompt(prompt, tables[prompt.id])
            ranks.barrier()  # every rank has written its parts

        if not ranks.is_main:
            result.table = _concat([tables[p.id] for p in mine if p.id in tables])
            return result
        result.computed, result.skipped = [p.id for p in pending], [p.id for p in done]  # by every rank
        # rows read back from the parts: the same dtypes whether a prompt was computed now or resumed
        result.table = _concat([pd.read_parquet(part_paths[p.id]) for p in mine])
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
