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

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import pandas as pd

from llm_heatmap.analyses.heads.measure import measure_sites, stream_head_metrics
from llm_heatmap.errors import InputError

from .engine import FRONT, PromptSetRun, RunOptions, Section, run_prompt_set
from .parts import part_key, shard_suffix
from .prompts import Prompt, check_length, shard_prompts
from .ranks import Ranks
from .table_files import write_table


def check_fresh_run(out_dir, prompts, shard=None, *, resume: bool, force: bool) -> None:
    """Refuse to start a batch over results already in `out_dir` unless resumed or forced (cheap: callers
    run it before loading a model)."""
    if resume or force:
        return
    out_dir = Path(out_dir)
    paths = [*output_paths(out_dir, shard),
             *(out_dir / "parts" / f"{part_key(p.id)}.parquet" for p in shard_prompts(prompts, shard))]
    for path in paths:
        if path.exists():
            raise InputError(f"{out_dir} already holds results of a batch ({path.name}); pass resume=True to continue "
                             "it, force=True to recompute, or choose another out_dir.")


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

    def _repr_html_(self) -> str:
        from llm_heatmap.notebook import tables_html

        return tables_html("BatchResult: per-head metrics of a prompt set", {"heads": self.table})


class _Model(Section):
    """The batch's one model: a prompt's rows are `measure(model, tokenizer, text, spec=, chat=, **options)`."""

    def __init__(self, name, folder, model, tokenizer, spec, counts, measure, chat, capture_options):
        super().__init__(name, folder)
        self.model, self.tokenizer, self.spec, self.counts = model, tokenizer, spec, counts
        self.measure_text, self.chat, self.capture_options = measure, chat, capture_options

    def open(self, share, ranks):
        return self.counts

    def measure(self, prompt: Prompt) -> pd.DataFrame:
        # only a measure over sites gets an image and a target (and no text where the record has none)
        inputs = {name: value for name, value in [("image", prompt.image), ("target", prompt.target)] if value is not None}
        text = prompt.text or None if inputs else prompt.text
        return self.measure_text(self.model, self.tokenizer, text, spec=self.spec, chat=self.chat,
                                 **inputs, **self.capture_options)


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
    sites: list[str] | None = None,
    processor=None,
    **capture_options,
) -> BatchResult:
    """Measure every prompt of `prompts` (or of `shard=(i, n)`) and write one row per prompt x head.

    Every prompt is checked (non-empty, fits `spec.max_positions`) before anything is written.
    `resume=True` skips prompts whose part file exists (their rows are read back, not recomputed);
    without it an existing batch in `out_dir` is an `InputError` unless `force=True`, which
    recomputes this shard's prompts. `ranks` (default: from the launcher's environment) splits
    the prompts to compute between processes (module docstring). `on_prompt(prompt, table)` runs
    after each finished prompt. `measure(model, tokenizer, text, spec=, chat=, **capture_options)`
    defaults to `stream_head_metrics`. `sites` (names of the model's attention sites) measures those sites
    instead (`heads.measure.measure_sites`: a `site` column first; every site when a prompt names an image or
    a target): a prompt's `image` (its path, prepared by `processor`) and `target` go to the measure, and the
    sites, images and targets are part of the settings a resumed run must find unchanged. `quiet` turns off
    the progress bar (shown by rank 0 only, on a terminal).
    """
    from llm_heatmap.models import spec_from_model

    spec = spec or spec_from_model(model)
    out_dir = Path(out_dir)
    mine = shard_prompts(prompts, shard)
    sites = _measured_sites(model, prompts, sites)
    if sites is not None:
        measure = measure or partial(measure_sites, processor=processor, sites=sites)
        check_site_prompts(model, processor, mine)
    counts = {p.id: None if p.image is not None else check_length(tokenizer, spec, p.text, chat=chat, where=p.where)
              for p in mine}
    parquet_path, csv_path = output_paths(out_dir, shard)
    model_name = source or spec.architecture
    section = _Model(model_name, out_dir / "parts", model, tokenizer, spec, counts, measure or stream_head_metrics,
                     chat, capture_options)
    settings = {"model": model_name, "spec": spec.summary, "chat": chat,
                "capture_options": {k: repr(v) for k, v in sorted(capture_options.items())}}
    if sites is not None:  # the whole file's images and targets: every shard records the same settings
        settings.update(sites=sites, images={p.id: p.image for p in prompts if p.image is not None},
                        targets={p.id: p.target for p in prompts if p.target is not None})
    result = BatchResult(table=pd.DataFrame(), parquet=parquet_path, csv=csv_path)

    def merge(record) -> None:
        # rows read back from the parts: the same dtypes whether a prompt was computed now or resumed
        result.table = record.tables(section)
        write_table(result.table, parquet_path, force=True)
        write_table(result.table, csv_path, force=True)

    run = PromptSetRun(kind="batch", title="results of a batch", sections=[section], settings=settings,
                       outputs=[parquet_path, csv_path], merge=merge,
                       on_prompt=None if on_prompt is None else lambda _, prompt, rows: on_prompt(prompt, rows))
    record = run_prompt_set(run, prompts, out_dir, RunOptions(shard=shard, resume=resume, force=force, quiet=quiet,
                                                              ranks=ranks))
    result.computed, result.skipped = record.computed[model_name], record.skipped[model_name]
    if not record.ranks.is_main:
        mine_rows = record.rows[model_name]
        tables = [mine_rows[p.id] for p in mine if p.id in mine_rows]
        result.table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=FRONT)
    return result


def _measured_sites(model, prompts: list[Prompt], sites: list[str] | None) -> list[str] | None:
    """`sites` checked against the model's, every site where a prompt names an image or a target, else None."""
    from llm_heatmap.models import site_specs

    specs = site_specs(model)
    if sites is None:
        return list(specs) if any(p.image is not None or p.target is not None for p in prompts) else None
    unknown = [site for site in sites if site not in specs]
    if unknown:
        raise InputError(f"site={unknown[0]!r} is not a site of {type(model).__name__}; its sites are {', '.join(specs)}.")
    return list(sites)


def check_site_prompts(model, processor, prompts: list[Prompt]) -> None:
    """Every prompt's text, image and target checked against what the model reads, before any is measured."""
    from llm_heatmap.models import site_specs
    from llm_heatmap.models.inputs import check_site_inputs

    specs = site_specs(model)
    for prompt in prompts:
        check_site_inputs(model, processor, specs, prompt=prompt.text or None, image=prompt.image,
                          target=prompt.target, where=prompt.where)


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
