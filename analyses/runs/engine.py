"""The one resumable, shardable, data-parallel run over a prompt set; an analysis supplies the rest.

An analysis over a prompt set (`batch`, `atlas`, and the next ones) says only how one prompt
becomes rows on each of its sections (`Section.measure`: a model of the atlas, the one model of a
batch) and how the finished parts become its tables (`PromptSetRun.merge`). The engine does the
rest, in this order, the same for every analysis:

1. refuse an output folder that already holds results (without `resume` or `force`), a folder that
   cannot be written, and settings that differ from those of the run being resumed;
2. claim the run's settings file (`models.files.claim_outputs`: one run of a shard at a time);
3. find the prompts already done (`Section.done`) and refuse one whose text changed since;
4. let the analysis check what needs its models (`PromptSetRun.check`), on every rank, then a barrier:
   bad input stops every rank before any file changes;
5. write the settings (rank 0), remove the old parts of a forced run (and a barrier);
6. measure this rank's share of the prompts still to do, writing each prompt's rows (behind the
   `FRONT` columns) atomically to its part file, while rank 0 shows the progress of the whole run;
7. a barrier, then rank 0 merges every part (`PromptSetRun.merge`).

The part files and the settings file are described in `parts.py`, ranks and shards in `ranks.py`
and `prompts.shard_prompts`.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from llm_heatmap.errors import InputError

from llm_heatmap.models.files import check_writable, claim_outputs
from .parts import check_settings, part_done, part_key, shard_suffix, write_part, write_settings
from .progress import RunProgress
from .prompts import Prompt, shard_prompts
from .ranks import Ranks, launcher_ranks
from .table_files import write_table

FRONT = ["model", "prompt_id", "group", "prompt", "n_tokens"]  # the columns in front of every part's rows


@dataclass(frozen=True)
class RunOptions:
    """How a run goes, whatever it computes. `shard=(i, n)`: prompts k with k % n == i. `resume`: keep
    the prompts already done. `force`: recompute over an earlier run's files. `quiet`: no progress bar.
    `ranks`: this process's place in a launched run (default: from the launcher's environment)."""

    shard: tuple[int, int] | None = None
    resume: bool = False
    force: bool = False
    quiet: bool = False
    ranks: Ranks | None = None


class Section:
    """One stream of part files of a run, under `folder`: the rows of each prompt (written last, so they
    mark it done) and any other files `part_files` names. Subclasses say how a prompt is measured."""

    def __init__(self, name: str, folder: Path):
        self.name = name
        self.folder = Path(folder)

    def rows(self, prompt: Prompt) -> Path:
        return self.folder / f"{part_key(prompt.id)}.parquet"

    def part_files(self, prompt: Prompt) -> list[Path]:
        """Every file of a finished prompt, the rows last."""
        return [self.rows(prompt)]

    def done(self, prompt: Prompt) -> bool:
        """Every part file of the prompt exists and reads (`parts.part_done`)."""
        return all(part_done(path) for path in self.part_files(prompt))

    def open(self, share: list[Prompt], ranks: Ranks) -> dict[str, int] | None:
        """Get ready to measure `share` (e.g. load the model) and return every prompt's token count, or
        None when this rank has nothing to do here. Called on every rank, before any `measure`."""
        return {} if share else None

    def measure(self, prompt: Prompt) -> pd.DataFrame:
        """One prompt -> its rows (the engine puts the `FRONT` columns before them)."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what `open` took (a model)."""


@dataclass
class PromptSetRun:
    """What one analysis over a prompt set gives the engine. `kind` names the settings file
    (`KIND.json`) and the progress bar; `title` says what a folder holding its results holds ("an
    atlas"); `outputs`: the final files (refused when present without resume or force); `check(pending)`:
    checks needing the models, on every rank before anything is written (pending: section -> this
    rank's prompts still to do); `merge(record)`: rank 0, once every part is written."""

    kind: str
    title: str
    sections: list[Section]
    settings: dict
    outputs: list[Path] = field(default_factory=list)
    check: Callable[[dict[str, list[Prompt]]], None] | None = None
    merge: Callable[["RunRecord"], None] | None = None
    on_prompt: Callable[[str, Prompt, pd.DataFrame], None] | None = None


@dataclass
class RunRecord:
    """What a run did: the prompts of this run (or shard), and per section the prompt ids computed now and
    found done (on rank 0 after the merge, those of every rank; on another rank, its share), and the rows
    of this rank's share."""

    out_dir: Path
    shard: tuple[int, int] | None
    ranks: Ranks
    prompts: list[Prompt]
    sections: list[Section]
    computed: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)

    def tables(self, section: Section, prompts: list[Prompt] | None = None) -> pd.DataFrame:
        """The rows of `prompts` (default: every prompt of the run) read back from their part files."""
        tables = [pd.read_parquet(section.rows(p)) for p in (self.prompts if prompts is None else prompts)]
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=FRONT)


def read_rows(section: Section, prompt: Prompt) -> pd.DataFrame:
    """A finished prompt's rows, refused when the prompt's text changed since they were written."""
    table = pd.read_parquet(section.rows(prompt))
    if len(table) and table["prompt"].iloc[0] != prompt.text:
        raise InputError(f"prompt '{prompt.id}' changed since the interrupted run; resume with the same prompt "
                         "file, or pass force=True to recompute.")
    return table


def with_front(rows: pd.DataFrame, model: str, prompt: Prompt, n_tokens: int | None) -> pd.DataFrame:
    """`rows` behind the `FRONT` columns (model, prompt_id, group, prompt, n_tokens) of `prompt`."""
    rows = rows.reset_index(drop=True)
    front = pd.DataFrame({"model": model, "prompt_id": prompt.id, "group": prompt.group, "prompt": prompt.text,
                          "n_tokens": n_tokens}, index=rows.index)
    table = pd.concat([front, rows.drop(columns=FRONT, errors="ignore")], axis=1)
    table["group"] = table["group"].astype("string")
    return table


def run_prompt_set(run: PromptSetRun, prompts: list[Prompt], out_dir: str | Path,
                   options: RunOptions = RunOptions()) -> RunRecord:
    """Run `run` over `prompts` (or its shard) into `out_dir` (module docstring). A run that stops on an
    error leaves no empty folder it made (a refused run leaves nothing)."""
    out_dir = Path(out_dir)
    made = not out_dir.exists()
    try:
        return _run_prompt_set(run, prompts, out_dir, options)
    except BaseException:
        if made:
            _remove_empty_folders(out_dir)
        raise


def _remove_empty_folders(folder: Path) -> None:
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()  # only an empty folder goes
    with contextlib.suppress(OSError):
        folder.rmdir()


def _run_prompt_set(run: PromptSetRun, prompts: list[Prompt], out_dir: Path, options: RunOptions) -> RunRecord:
    ranks = launcher_ranks() if options.ranks is None else options.ranks
    resume, force = options.resume, options.force
    mine = shard_prompts(prompts, options.shard)
    if not resume and not force:
        existing = [p for p in run.outputs if p.exists()] + [
            section.rows(p) for section in run.sections for p in mine if section.rows(p).exists()]
        if existing:
            raise InputError(f"{out_dir} already holds {run.title} ({existing[0].relative_to(out_dir)}); pass resume=True "
                             "to continue it, force=True to recompute, or choose another out_dir.")
    settings_path = out_dir / f"{run.kind}{shard_suffix(options.shard)}.json"
    for path in [*run.outputs, settings_path]:
        check_writable(path, force=True)
    check_settings(out_dir, run.kind, run.settings, resume=resume)
    record = RunRecord(out_dir=out_dir, shard=options.shard, ranks=ranks, prompts=mine, sections=run.sections)
    with claim_outputs([settings_path] if ranks.is_main else [], force=True, resumable=True):  # one run of this shard at a time
        done = {s.name: [p for p in mine if resume and s.done(p)] for s in run.sections}
        for section in run.sections:  # each rank checks its share
            record.rows[section.name] = {p.id: read_rows(section, p) for p in ranks.share(done[section.name])}
        pending = {s.name: [p for p in mine if p not in done[s.name]] for s in run.sections}
        if run.check is not None:
            run.check({name: ranks.share(prompts) for name, prompts in pending.items()})
        ranks.barrier()  # every rank has checked its input; from here on files change

        for section in run.sections:
            section.folder.mkdir(parents=True, exist_ok=True)
        if ranks.is_main:
            write_settings(settings_path, run.settings)
        if force and not resume:
            # an interrupted forced run must not leave old parts that a later resume would take as done
            for section in run.sections:
                for prompt in ranks.share(pending[section.name]):
                    for path in section.part_files(prompt):
                        path.unlink(missing_ok=True)
            ranks.barrier()

        every_part = [section.rows(p) for section in run.sections for p in mine]
        enabled = ranks.is_main and not options.quiet and sys.stderr.isatty()
        with RunProgress(every_part, enabled=enabled, desc=run.kind):
            for section in run.sections:
                record.skipped[section.name] = [p.id for p in ranks.share(done[section.name])]
                record.computed[section.name] = []
                _measure_share(run, section, ranks.share(pending[section.name]), ranks, record)
            ranks.barrier()  # every rank has written its parts

        if ranks.is_main:
            record.computed = {s.name: [p.id for p in pending[s.name]] for s in run.sections}  # by every rank
            record.skipped = {s.name: [p.id for p in done[s.name]] for s in run.sections}
            if run.merge is not None:
                run.merge(record)
    return record


def _measure_share(run: PromptSetRun, section: Section, share: list[Prompt], ranks: Ranks, record: RunRecord) -> None:
    counts = section.open(share, ranks)
    if counts is None:
        return
    try:
        for prompt in share:
            table = with_front(section.measure(prompt), section.name, prompt, counts.get(prompt.id))
            write_part(section.rows(prompt), lambda temp: write_table(table, temp))
            record.computed[section.name].append(prompt.id)
            record.rows[section.name][prompt.id] = pd.read_parquet(section.rows(prompt))  # the dtypes of a resumed prompt
            if run.on_prompt is not None:
                run.on_prompt(section.name, prompt, record.rows[section.name][prompt.id])
    finally:
        section.close()


class _FunctionSection(Section):
    def __init__(self, name: str, folder: Path, measure: Callable[[Prompt], pd.DataFrame]):
        super().__init__(name, folder)
        self._measure = measure

    def measure(self, prompt: Prompt) -> pd.DataFrame:
        return self._measure(prompt)


def run_per_prompt(measure: Callable[[Prompt], pd.DataFrame], prompts: list[Prompt], out_dir: str | Path, *,
                   kind: str, settings: dict | None = None, options: RunOptions = RunOptions()) -> RunRecord:
    """The smallest analysis over a prompt set: `measure(prompt) -> rows`, merged into `OUT/KIND.parquet`
    (`OUT/KIND.shard-i-of-n.parquet` for a shard), resumable, shardable and data-parallel like every run.
    `settings` (JSON-able) are what a resumed run must find unchanged."""
    out_dir = Path(out_dir)
    table = out_dir / f"{kind}{shard_suffix(options.shard)}.parquet"
    section = _FunctionSection(kind, out_dir / "parts", measure)

    def merge(record: RunRecord) -> None:
        write_table(record.tables(section), table, force=True)

    run = PromptSetRun(kind=kind, title=f"a {kind} run", sections=[section], settings=settings or {}, outputs=[table],
                       merge=merge)
    return run_prompt_set(run, prompts, out_dir, options)
