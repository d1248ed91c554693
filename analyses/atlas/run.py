"""The head atlas: every head of one or more models characterised over a whole prompt set.

`run_atlas(models, prompts, out_dir)` measures every prompt on every model, on one attention site of each
(`site`; `atlas/sites.py` holds the table of what each site reads and which measures apply) (`atlas/prompt.py`:
the site's per-head metrics, the divergence between every pair of heads, a pooled picture of every head),
keeps each as part files, and summarises them (`atlas/summary.py`) into tidy Parquet tables:

    OUT/prompt_heads.parquet   one row per model x prompt x head (the site's metrics, `site_metrics`)
    OUT/heads.parquet          one row per model x head: means and rates with bootstrap intervals, pattern-class
                               frequencies, induction- and retrieval-probe scores, map position and clustering rank
    OUT/layers.parquet         one row per model x layer: KV-group similarity and layer means over prompts
    OUT/models.parquet         one row per model, with its site and the note of probes skipped for the site
    OUT/prompt_layers.parquet  one row per model x prompt x layer: KV-group within / between / gap
    OUT/top_prompts.parquet    one row per model x head x ranking metric x rank: where the head scores highest
    OUT/head_distances.parquet one row per model x pair of heads: prompt-mean divergence and similarity

Parts: `OUT/parts/<model key>/<prompt key>.{safetensors,parquet}` per prompt (the parquet, written
last, marks the prompt done), `model.json` (the spec) and `probe.parquet` (induction-probe
scores on repeated random tokens, retrieval-probe scores on needle prompts) per model;
`OUT/atlas.json` holds the settings the parts were computed with (`atlas.shard-i-of-n.json` for a
shard). `resume=True` computes only prompts without parts; a model whose parts are all present is
not loaded at all.

Distributed: under torchrun / accelerate launch (`ranks.launcher_ranks`), each rank loads each
model on its own device and measures its share of the prompts still to do; after a barrier rank 0
reads every part and writes the tables. `shard=(i, n)` (a job of an array) measures prompts with
k % n == i (split again between the shard's ranks) and writes parts only; a final run without
`shard` and with `resume=True` finds every part and writes the tables. Every rank checks the
input before any rank writes. A prompt too long for a model is found when that model is loaded,
so an earlier model's parts may exist by then (kept for `resume`); no table is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from llm_heatmap.analyses.atlas.probes import site_probe_scores
from llm_heatmap.analyses.atlas.prompt import THUMBNAIL_SIZE, measure_atlas_prompt, measure_atlas_site_prompt
from llm_heatmap.analyses.atlas.sites import ATLAS_SITES, RANKABLE, SELF, atlas_site, check_site_records, skipped_probes
from llm_heatmap.analyses.atlas.summary import (ModelRows, head_table, layer_blocks, layer_table, model_table,
                                                prompt_layer_kv, top_prompts)
from llm_heatmap.analyses.bounds import (at_least, check_head_measure, check_needle_grid, check_pseudo_group_size,
                                         check_statistics, pseudo_group_size_of)
from llm_heatmap.analyses.heads.needle import DEPTHS
from llm_heatmap.analyses.runs.engine import PromptSetRun, RunOptions, Section, run_prompt_set
from llm_heatmap.models.files import atomic_output
from llm_heatmap.analyses.runs.parts import part_done, part_key, sealed, write_part
from llm_heatmap.analyses.runs.prompts import Prompt, shard_prompts
from llm_heatmap.analyses.runs.ranks import Ranks, launcher_ranks
from llm_heatmap.analyses.runs.sites import check_site_run, loaded_with_processor, record_lengths, resolve_site
from llm_heatmap.analyses.runs.table_files import write_table
from llm_heatmap.analyses.similarity.kv_similarity import divergence_similarity
from llm_heatmap.analyses.stats import Bootstrap
from llm_heatmap.errors import InputError
from llm_heatmap.options import spread

TABLES = ("prompt_heads", "heads", "layers", "models", "prompt_layers", "top_prompts", "head_distances")


def output_paths(out_dir: str | Path) -> dict[str, Path]:
    return {name: Path(out_dir) / f"{name}.parquet" for name in TABLES}


@dataclass
class AtlasResult:
    """The atlas's tables (None on ranks other than 0, and for a shard), what each rank computed, and
    the inputs of the page (`page_inputs`)."""

    out_dir: Path
    tables: dict[str, pd.DataFrame] | None
    files: dict[str, Path]
    computed: dict[str, list[str]] = field(default_factory=dict)  # model -> prompt ids measured in this run
    skipped: dict[str, list[str]] = field(default_factory=dict)  # model -> prompt ids found done
    distances: dict[str, np.ndarray] = field(default_factory=dict)  # model -> prompt-mean divergence "n n"
    thumbnails: dict[str, dict] = field(default_factory=dict)  # model -> {(prompt_id, layer, head): uint8 "q k"}
    prompts: dict[str, str] = field(default_factory=dict)  # prompt id -> text
    measure: str = "js"

    def _repr_html_(self) -> str:
        from llm_heatmap.notebook import tables_html

        tables = self.tables or {}
        return tables_html(f"AtlasResult: {self.out_dir}", {"models": tables.get("models"), "heads": tables.get("heads")})

    def page_inputs(self) -> dict:
        """Keyword arguments of `llm_heatmap.viz.atlas.atlas_view`: tables and small arrays only."""
        if self.tables is None:
            raise InputError("this atlas result holds no tables (a shard, or a rank other than 0); "
                             "run once more without shard and with resume=True to merge the parts.")
        return {"heads": self.tables["heads"], "layers": self.tables["layers"], "models": self.tables["models"],
                "prompt_heads": self.tables["prompt_heads"], "top_prompts": self.tables["top_prompts"],
                "similarity": {name: divergence_similarity(d, self.measure) for name, d in self.distances.items()},
                "thumbnails": self.thumbnails, "prompts": self.prompts, "measure": self.measure}


class _ModelParts(Section):
    """One model of the atlas: its part files (the tensors, then the rows) and its model files, and how a
    prompt is measured on it (loaded in `open`, on the ranks with prompts to measure or files to write)."""

    def __init__(self, name: str, folder: Path, source, loader, prompts: list[Prompt], options: dict,
                 max_bytes: int | None, probe_length: int, fresh: bool, retrieval_lengths: tuple[int, ...] = (),
                 ablation: "Ablation | None" = None, site: str | None = None):
        super().__init__(name, folder)
        self.source, self.loader, self.prompts, self.options, self.site = source, loader, prompts, options, site
        self.max_bytes, self.probe_length, self.fresh = max_bytes, probe_length, fresh
        self.retrieval_lengths, self.ablation = retrieval_lengths, ablation
        self.loaded = None  # (model, tokenizer, runs.sites.ResolvedSite, processor) while open, or loaded early by the check

    def tensors(self, prompt: Prompt) -> Path:
        return self.folder / f"{part_key(prompt.id)}.safetensors"

    def part_files(self, prompt: Prompt) -> list[Path]:
        return [self.tensors(prompt), self.rows(prompt)]

    @property
    def spec_file(self) -> Path:
        return self.folder / "model.json"

    @property
    def probe_file(self) -> Path:
        return self.folder / "probe.parquet"

    def needs_model(self, share: list[Prompt], ranks: Ranks) -> bool:
        """Whether this rank must load the model: prompts to measure, or (rank 0) the model's files to write."""
        return bool(share) or (ranks.is_main and not (self.spec_file.exists() and part_done(self.probe_file)))

    def load(self) -> dict[str, int]:
        """Load the model (once) and check every prompt of the run against it; the token counts."""
        if self.loaded is None:
            model, tokenizer, spec, processor = loaded_with_processor(self.source, self.loader, self.prompts)
            self.loaded = model, tokenizer, resolve_site(model, spec, self.site, self.name, "an atlas covers one"), processor
        model, tokenizer, site, processor = self.loaded
        check_site_run(model, processor, site, self.prompts, chat=self.options["chat"], name=self.name)
        probe_length = self.probe_length if atlas_site(site.name).induction_probe is None else 0
        counts = _check_fits(site.spec, tokenizer, self.prompts, self.options["chat"], self.max_bytes, self.name,
                             probe_length)
        if self.ablation is not None:
            self.ablation.prepare(model, tokenizer, site, processor, self.options["chat"], self.name)
        return counts

    def open(self, share, ranks):
        if not self.needs_model(share, ranks):
            return None
        counts = self.load()  # every rank, the same verdict
        if ranks.is_main:
            model, tokenizer, site, _ = self.loaded
            _write_model_files(self, self.name, model, tokenizer, site, self.probe_length, self.fresh,
                               self.retrieval_lengths)
        return counts

    def measure(self, prompt: Prompt) -> pd.DataFrame:
        from safetensors.numpy import save_file

        model, tokenizer, site, processor = self.loaded
        spec = site.spec
        if site.through_sites:
            options = {k: v for k, v in self.options.items() if k != "chat"}
            measured = measure_atlas_site_prompt(model, tokenizer, prompt, site=site.key, processor=processor, **options)
        else:
            measured = measure_atlas_prompt(model, tokenizer, prompt.text, spec=spec, **self.options)
        write_part(self.tensors(prompt), lambda temp: save_file(
            {"divergence": measured.divergence, "thumbnails": measured.thumbnails}, str(temp)))
        if self.ablation is None:
            return measured.heads
        return measured.heads.merge(self.ablation.columns(model, tokenizer, site, processor, prompt, self.options["chat"]),
                                    on=["layer", "head"], how="left")

    def close(self) -> None:
        self.loaded = None


class Ablation:
    """The atlas's importance columns: every head ablated alone on each prompt ("zero", or "mean": its mean
    output over every prompt of the run, computed once per model when it loads). A decoder LLM's prediction is
    scored through its one stack; the site of an encoder-decoder or an image classifier by that model's output
    (`importance.site_ablation`)."""

    def __init__(self, mode: str, prompts: list[Prompt]):
        from llm_heatmap.analyses.importance.ablation import ABLATION_MODES

        if mode not in ABLATION_MODES:
            raise InputError(f"ablation={mode!r} is not an ablation mode; use one of {', '.join(ABLATION_MODES)}.")
        self.mode, self.prompts, self.means, self.output = mode, prompts, None, None

    def prepare(self, model, tokenizer, site, processor, chat: bool, name: str) -> None:
        from llm_heatmap.analyses.importance.ablation import mean_head_outputs
        from llm_heatmap.probes.capture import encode_prompt

        spec = site.spec
        if site.through_sites:
            from llm_heatmap.analyses.importance.site_ablation import record_inputs, site_mean_head_outputs, site_output

            self.output = site_output(model)
            if self.mode == "mean":
                self.means = site_mean_head_outputs(
                    model, [record_inputs(model, tokenizer, processor, p) for p in self.prompts], spec)
            return
        if not spec.causal or model.get_output_embeddings() is None:
            raise InputError(f"ablation needs decoders with an LM head, and {name} has none; leave it out of this atlas "
                             "or drop the ablation.")
        if self.mode == "mean":
            self.means = mean_head_outputs(model, [encode_prompt(tokenizer, p.text, chat=chat)[0] for p in self.prompts],
                                           spec)

    def columns(self, model, tokenizer, site, processor, prompt: Prompt, chat: bool) -> pd.DataFrame:
        from llm_heatmap.analyses.importance.ablation import head_ablation_rows
        from llm_heatmap.probes.capture import encode_prompt

        if site.through_sites:
            from llm_heatmap.analyses.importance.site_ablation import record_inputs, site_head_ablation_rows

            rows = site_head_ablation_rows(model, record_inputs(model, tokenizer, processor, prompt), spec=site.spec,
                                           output=self.output, means=self.means)
        else:
            rows = head_ablation_rows(model, encode_prompt(tokenizer, prompt.text, chat=chat)[0], spec=site.spec,
                                      means=self.means)
        return rows[["layer", "head", "delta_log_prob", "delta_loss"]].rename(
            columns={"delta_log_prob": "ablation_delta_log_prob", "delta_loss": "ablation_delta_loss"})


def _check_options(measure, thumbnail_size, top_k, n_resamples, confidence, n_permutations, max_rows,
                   pseudo_group_size, probe_length, rank_by, seed, retrieval_lengths=()) -> None:
    check_head_measure(measure)
    at_least("thumbnail_size", thumbnail_size, 2)
    at_least("top_k", top_k, 1)
    at_least("probe_length", probe_length, 0, " (0 skips the induction probe)")
    if retrieval_lengths:
        check_needle_grid(retrieval_lengths, DEPTHS)
    check_statistics(n_resamples=n_resamples, n_permutations=n_permutations, confidence=confidence, seed=seed)
    check_pseudo_group_size(pseudo_group_size)
    unknown = [name for name in ([rank_by] if isinstance(rank_by, str) else rank_by or ()) if name not in RANKABLE]
    if unknown:
        raise InputError(f"rank_by={unknown[0]!r} is not a score the atlas ranks prompts by; use some of "
                         f"{', '.join(RANKABLE)}.")
    if max_rows is not None:
        at_least("max_rows", max_rows, 1, ", or None for every row")


def _model_entries(models) -> list[tuple[str, object]]:
    entries = list(models.items()) if isinstance(models, dict) else [(str(source), source) for source in models]
    if not entries:
        raise InputError("the atlas needs at least one model; pass models, a list of sources or a dict of loaded models.")
    twice = _first_repeated(name for name, _ in entries)
    if twice is not None:
        raise InputError(f"model '{twice}' is given twice; give each model once.")
    return entries


def _first_repeated(values):
    """The first value that occurs a second time, or None (one pass: prompt sets run to many thousands)."""
    seen = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def _check_prompts(prompts) -> list[Prompt]:
    prompts = list(prompts)
    if not prompts:
        raise InputError("the atlas needs at least one prompt; pass prompts, e.g. read_prompts('prompts.txt').")
    twice = _first_repeated(p.id for p in prompts)
    if twice is not None:
        raise InputError(f"prompt id '{twice}' is used twice; give every prompt a unique id.")
    return prompts


def _check_fits(spec, tokenizer, prompts: list[Prompt], chat: bool, max_bytes: int | None, name: str,
                probe_length: int = 0) -> dict[str, int]:
    """Token counts of `prompts` on one model, refused when a prompt (or the induction probe of
    `probe_length`) is too long for it or its cube would not fit."""
    from llm_heatmap.probes.capture import estimate_cube_bytes
    from llm_heatmap.probes.memory import cube_fits

    counts = record_lengths(tokenizer, spec, prompts, chat=chat)
    counted = {key: count for key, count in counts.items() if count is not None}
    if counted:
        longest = max(counted, key=counted.get)
        size = estimate_cube_bytes(spec, counts[longest])
        if not cube_fits(size, max_bytes):
            raise InputError(f"prompt '{longest}' has {counts[longest]} tokens, and the atlas keeps one prompt's whole "
                             f"attention cube on {name} ({size / 2**30:.1f} GiB), more than fits in memory; "
                             "shorten or leave out the longest prompts.")
    if probe_length > 0:
        vocabulary = len(tokenizer) - len(set(tokenizer.all_special_ids))
        probe_tokens = 1 + 2 * probe_length
        if probe_length > vocabulary or (spec.max_positions and probe_tokens > spec.max_positions) \
                or not cube_fits(estimate_cube_bytes(spec, probe_tokens), max_bytes):
            limit = min(vocabulary, (spec.max_positions - 1) // 2 if spec.max_positions else vocabulary)
            raise InputError(f"probe_length={probe_length} is too long for {name}: its induction probe of "
                             f"{probe_tokens} tokens must fit the model's context and vocabulary (at most "
                             f"{limit}) and memory; pick a shorter probe_length.")
    return counts


@dataclass(frozen=True)
class AtlasOptions:
    """What the atlas measures on every prompt and how it summarises the prompts (`run_atlas`)."""

    chat: bool = False
    measure: str = "js"
    thumbnail_size: int = THUMBNAIL_SIZE
    max_rows: int | None = None
    top_k: int = 3
    rank_by: tuple | None = None  # default: the site's (sites.ATLAS_SITES)
    n_permutations: int = 1000
    pseudo_group_size: int | None = None
    probe_length: int = 50
    max_bytes: int | None = None
    retrieval_lengths: tuple[int, ...] = ()
    ablation: str | None = None
    site: str | None = None  # the attention site characterised on every model (`atlas/sites.py`)


def run_atlas(models, prompts: list[Prompt], out_dir: str | Path, options: AtlasOptions | None = None, *,
              bootstrap: Bootstrap | None = None, run: RunOptions | None = None, loader: Callable | None = None,
              on_prompt: Callable | None = None, **keywords) -> AtlasResult:
    """Measure `prompts` on every model and write the atlas's tables to `out_dir` (module docstring).

    `models`: a list of sources for `load_model` (loaded one at a time; `loader(source)` returns
    `(model, tokenizer, spec)` or `(model, tokenizer, spec, processor)` instead), or a dict `{name: (model,
    tokenizer, spec[, processor])}`; a source's own image processor is loaded when a prompt names an image.
    `site`: the attention site characterised (`sites.ATLAS_SITES`; a model with several needs it); a prompt's
    `image` and `target` are what the site reads, checked before anything is written. `measure`:
    the head divergence, "js" (exact Jensen-Shannon) or "hellinger". `max_rows`: evenly spaced
    query rows the divergence averages over (default all). `thumbnail_size`: the pooled pictures'
    size. `top_k` prompts per head and `rank_by` metric (default: the site's) are kept with their pictures. Intervals:
    `n_resamples` bootstrap resamples of the prompts at `confidence`; layer gap p-values from
    `n_permutations` shuffles of the head grouping (MHA models: pseudo-groups of
    `pseudo_group_size`, default the first GQA model's group size, else 3). `probe_length`:
    random tokens of the induction probe (0 to skip it). `retrieval_lengths`: context lengths of the
    retrieval probe's needle prompts (`retrieval_head_scores`, five depths each; empty skips it).
    `ablation` ("zero" or "mean"; None skips it): every head ablated alone on every prompt
    (`importance.ablation.head_ablation_rows`), its change in log p of the prediction and in the loss as the
    per-prompt columns `ablation_delta_log_prob` and `ablation_delta_loss` (a decoder LLM's prediction; on a site of an
    encoder-decoder or an image classifier, its target or its predicted class: `importance.site_ablation`).
    `shard`, `resume`, `force`, `ranks`: as in `run_batch`. `on_prompt(model_name, prompt)` runs after each finished prompt. The options come
    in three groups, `options` (`AtlasOptions`), `bootstrap` (`stats.Bootstrap`: n_resamples, confidence,
    seed) and `run` (`RunOptions`: shard, resume, force, quiet, ranks), and each also as a keyword.
    """
    options, bootstrap, run = spread(keywords, options or AtlasOptions(), bootstrap or Bootstrap(), run or RunOptions())
    chat, measure, thumbnail_size, max_rows = options.chat, options.measure, options.thumbnail_size, options.max_rows
    top_k, rank_by, n_permutations = options.top_k, options.rank_by, options.n_permutations
    rank_by = (rank_by,) if isinstance(rank_by, str) else rank_by
    pseudo_group_size, probe_length, max_bytes = options.pseudo_group_size, options.probe_length, options.max_bytes
    retrieval_lengths = tuple(int(n) for n in options.retrieval_lengths)
    atlas_site(options.site)
    n_resamples, confidence, seed = bootstrap.n_resamples, bootstrap.confidence, bootstrap.seed
    shard, resume, force, ranks = run.shard, run.resume, run.force, run.ranks
    _check_options(measure, thumbnail_size, top_k, n_resamples, confidence, n_permutations, max_rows,
                   pseudo_group_size, probe_length, rank_by, seed, retrieval_lengths)
    entries = _model_entries(models)
    prompts = _check_prompts(prompts)
    check_site_records(options.site, prompts)
    ranks = launcher_ranks() if ranks is None else ranks
    out_dir = Path(out_dir)
    mine = shard_prompts(prompts, shard)
    files = output_paths(out_dir)
    per_prompt = dict(chat=chat, measure=measure, thumbnail_size=thumbnail_size, max_rows=max_rows)
    models_parts = [_ModelParts(name, out_dir / "parts" / part_key(name), source, loader, mine, per_prompt, max_bytes,
                                probe_length, fresh=force and not resume, retrieval_lengths=retrieval_lengths,
                                ablation=Ablation(options.ablation, prompts) if options.ablation else None,
                                site=options.site)
                    for name, source in entries]
    settings = {"models": [name for name, _ in entries], "chat": chat, "measure": measure,
                "thumbnail_size": thumbnail_size, "max_rows": max_rows, "probe_length": probe_length,
                "retrieval_lengths": list(retrieval_lengths)}
    # absent when unused, so atlases written before sites and ablation still resume
    if options.site not in (None, "self"):
        settings["site"] = options.site
    if options.ablation:
        settings["ablation"] = options.ablation
    for key, field in (("images", "image"), ("targets", "target")):  # the whole file's: every shard records the same
        named = {p.id: getattr(p, field) for p in prompts if getattr(p, field) is not None}
        if named:
            settings[key] = named
    result = AtlasResult(out_dir=out_dir, tables=None, files=files, measure=measure,
                         prompts={p.id: prompt_label(p) for p in mine})

    def check(pending: dict[str, list[Prompt]]) -> None:
        if loader is None:
            from llm_heatmap.models.loading import resolve_source

            for _, source in entries:
                if not isinstance(source, tuple):
                    resolve_source(source)  # a wrong path or name fails here, before anything is written
        # the first model is loaded (and every prompt checked against it) before anything is written
        first = models_parts[0]
        if first.needs_model(pending[first.name], ranks):
            first.load()

    def merge(record) -> None:
        if shard is None:
            _merge(result, models_parts, mine, measure=measure, top_k=top_k, rank_by=rank_by, probe_length=probe_length,
                   retrieval_lengths=retrieval_lengths, bootstrap=bootstrap, n_permutations=n_permutations,
                   pseudo_group_size=pseudo_group_size)

    prompt_set = PromptSetRun(kind="atlas", title="an atlas", sections=models_parts, settings=settings,
                       outputs=list(files.values()), check=check, merge=merge,
                       on_prompt=None if on_prompt is None else lambda name, prompt, _: on_prompt(name, prompt))
    record = run_prompt_set(prompt_set, prompts, out_dir, replace(run, ranks=ranks))
    result.computed, result.skipped = record.computed, record.skipped
    return result


def prompt_label(prompt: Prompt) -> str:
    """How the page names a prompt: its text, the image's file name, the target after an arrow."""
    label = " ".join(part for part in (Path(prompt.image).name if prompt.image else "", prompt.text) if part)
    return label if prompt.target is None else f"{label} \u2192 {prompt.target}"



def _write_model_files(parts: _ModelParts, name: str, model, tokenizer, site, probe_length: int, fresh: bool,
                       retrieval_lengths: tuple[int, ...] = ()) -> None:
    """The model's spec and site, and its induction- and retrieval-probe scores where they apply to the site
    (rank 0, once per model)."""
    if fresh or not parts.spec_file.exists():
        with atomic_output(parts.spec_file, force=True) as temp:
            temp.write_text(json.dumps({"name": name, "spec": site.spec.to_dict(), "site": site.name}, indent=2) + "\n")
    if fresh or not sealed(parts.probe_file):
        probe = site_probe_scores(model, tokenizer, site, probe_length=probe_length, retrieval_lengths=retrieval_lengths)
        write_part(parts.probe_file, lambda temp: write_table(probe, temp))


def _merge(result: AtlasResult, models_parts: list[_ModelParts], prompts: list[Prompt], *, measure: str, top_k: int,
           probe_length: int, retrieval_lengths: tuple[int, ...], rank_by, bootstrap: Bootstrap, n_permutations: int,
           pseudo_group_size: int | None) -> None:
    """Read every part and write the tables (rank 0, after the barrier)."""
    from safetensors.numpy import load_file

    from llm_heatmap.models import ModelSpec

    specs, sites = {}, {}
    for parts in models_parts:
        if not parts.spec_file.exists():
            raise InputError(f"{parts.folder} has no model.json; run the atlas again with resume=True to write it.")
        written = json.loads(parts.spec_file.read_text())
        specs[parts.name] = ModelSpec.from_dict(written["spec"])
        sites[parts.name] = written.get("site", specs[parts.name].site or SELF)  # model.json before sites: its spec's
    pseudo_group_size = pseudo_group_size_of(((s.num_heads, s.num_kv_heads) for s in specs.values()), pseudo_group_size)
    frames: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
    for parts in models_parts:
        spec = specs[parts.name]
        tables, total, blocks = [], None, []
        for prompt in prompts:
            tables.append(pd.read_parquet(parts.rows(prompt)))
            divergence = load_file(str(parts.tensors(prompt)))["divergence"].astype(np.float64)
            total = divergence if total is None else total + divergence
            blocks.append(layer_blocks(divergence, spec.num_layers, measure))
        rows = ModelRows(parts.name, spec, pd.concat(tables, ignore_index=True), total / len(prompts),
                         torch.stack(blocks), measure)
        kv = prompt_layer_kv(rows, pseudo_group_size)
        heads = head_table(rows, bootstrap)
        probe = pd.read_parquet(parts.probe_file)
        if len(probe):
            heads = heads.merge(probe, on=["layer", "head"], how="left")
        top = top_prompts(rows, rank_by or ATLAS_SITES[sites[parts.name]].rank_by, top_k)
        frames["prompt_heads"].append(rows.prompt_heads)
        frames["heads"].append(heads)
        frames["layers"].append(layer_table(rows, kv, bootstrap, n_permutations=n_permutations,
                                            pseudo_group_size=pseudo_group_size))
        frames["models"].append(model_table(rows, kv, bootstrap).assign(
            site=sites[parts.name], notes=skipped_probes(sites[parts.name], induction=probe_length > 0,
                                                         retrieval=bool(retrieval_lengths))))
        frames["prompt_layers"].append(kv)
        frames["top_prompts"].append(top)
        frames["head_distances"].append(_distance_table(rows))
        result.distances[parts.name] = rows.mean_divergence
        result.thumbnails[parts.name] = _thumbnails(parts, top, prompts, rows.units)
    result.tables = {name: pd.concat(pieces, ignore_index=True) for name, pieces in frames.items()}
    for name, path in result.files.items():
        write_table(result.tables[name], path, force=True)


def _distance_table(rows: ModelRows) -> pd.DataFrame:
    n = len(rows.units)
    a, b = np.divmod(np.arange(n * n), n)
    units = np.asarray(rows.units)
    divergence = rows.mean_divergence.reshape(-1)
    return pd.DataFrame({"model": rows.name, "layer_a": units[a, 0], "head_a": units[a, 1], "layer_b": units[b, 0],
                         "head_b": units[b, 1], "measure": rows.measure, "divergence": divergence,
                         "similarity": divergence_similarity(divergence, rows.measure)})


def _thumbnails(parts: _ModelParts, top: pd.DataFrame, prompts: list[Prompt], units) -> dict:
    """{(prompt_id, layer, head): uint8 "q k"} for every head's top prompts."""
    from safetensors.numpy import load_file

    by_id = {p.id: p for p in prompts}
    index = {unit: i for i, unit in enumerate(units)}
    layers = sorted({layer for layer, _ in units})
    per_layer = len(units) // len(layers)
    out = {}
    for prompt_id, group in top.groupby("prompt_id", sort=False):
        pictures = load_file(str(parts.tensors(by_id[prompt_id])))["thumbnails"]
        for layer, head in set(zip(group["layer"], group["head"])):
            i = index[(int(layer), int(head))]
            out[prompt_id, int(layer), int(head)] = pictures[i // per_layer, i % per_layer]
    return out
