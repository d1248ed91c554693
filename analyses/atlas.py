"""The head atlas: every head of one or more models characterised over a whole prompt set.

`run_atlas(models, prompts, out_dir)` measures every prompt on every model (`atlas_prompt`: the
per-head metrics, the divergence between every pair of heads, a pooled picture of every head),
keeps each as part files, and summarises them (`atlas_tables`) into tidy Parquet tables:

    OUT/prompt_heads.parquet   one row per model x prompt x head (the metrics of `head_metrics`)
    OUT/heads.parquet          one row per model x head: means and rates with bootstrap intervals, pattern-class
                               frequencies, induction-probe scores, map position and clustering rank
    OUT/layers.parquet         one row per model x layer: KV-group similarity and layer means over prompts
    OUT/models.parquet         one row per model
    OUT/prompt_layers.parquet  one row per model x prompt x layer: KV-group within / between / gap
    OUT/top_prompts.parquet    one row per model x head x ranking metric x rank: where the head scores highest
    OUT/head_distances.parquet one row per model x pair of heads: prompt-mean divergence and similarity

Parts: `OUT/parts/<model key>/<prompt key>.{safetensors,parquet}` per prompt (the parquet, written
last, marks the prompt done), `model.json` (the spec) and `probe.parquet` (induction-probe
scores on repeated random tokens) per model; `OUT/atlas.json` holds the settings the parts were
computed with (`atlas.shard-i-of-n.json` for a shard). `resume=True` computes only prompts
without parts; a model whose parts are all present is not loaded at all.

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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from llm_heatmap.errors import InputError

from .atlas_prompt import THUMBNAIL_SIZE, measure_atlas_prompt
from .bounds import at_least, check_head_measure, check_pseudo_group_size, check_statistics
from .atlas_tables import (Bootstrap, ModelRows, head_table, layer_blocks, layer_table, model_table, prompt_layer_kv,
                           top_prompts)
from .files import atomic_output, check_writable, claim_outputs
from .kv_similarity import divergence_similarity
from .parts import check_settings, part_done, part_key, sealed, shard_suffix, write_part, write_settings
from .progress import RunProgress
from .prompts import Prompt, check_length, shard_prompts
from .ranks import Ranks, launcher_ranks
from .tables import write_table

TABLES = ("prompt_heads", "heads", "layers", "models", "prompt_layers", "top_prompts", "head_distances")
RANK_BY = ("sink_score", "previous_token_score", "duplicate_token_score", "induction_score", "diagonal_score",
           "vertical_score")
FRONT = ["model", "prompt_id", "group", "prompt", "n_tokens"]
DEFAULT_PSEUDO_GROUP_SIZE = 3


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

    def page_inputs(self) -> dict:
        """Keyword arguments of `llm_heatmap.viz.atlas.atlas_view`: tables and small arrays only."""
        if self.tables is None:
            raise InputError("this atlas result holds no tables (a shard, or a rank other than 0); "
                             "run once more without shard and with resume=True to merge the parts.")
        return {"heads": self.tables["heads"], "layers": self.tables["layers"], "models": self.tables["models"],
                "prompt_heads": self.tables["prompt_heads"], "top_prompts": self.tables["top_prompts"],
                "similarity": {name: divergence_similarity(d, self.measure) for name, d in self.distances.items()},
                "thumbnails": self.thumbnails, "prompts": self.prompts, "measure": self.measure}


@dataclass
class _ModelParts:
    """Where one model's parts live."""

    name: str
    folder: Path

    def tensors(self, prompt: Prompt) -> Path:
        return self.folder / f"{part_key(prompt.id)}.safetensors"

    def rows(self, prompt: Prompt) -> Path:
        return self.folder / f"{part_key(prompt.id)}.parquet"

    def done(self, prompt: Prompt) -> bool:
        """Both part files exist and read (`parts.part_done`): the rows, written last, and the tensors."""
        return part_done(self.rows(prompt)) and part_done(self.tensors(prompt))

    @property
    def spec_file(self) -> Path:
        return self.folder / "model.json"

    @property
    def probe_file(self) -> Path:
        return self.folder / "probe.parquet"


def _check_options(measure, thumbnail_size, top_k, n_resamples, confidence, n_permutations, max_rows,
                   pseudo_group_size, probe_length, rank_by, seed) -> None:
    check_head_measure(measure)
    at_least("thumbnail_size", thumbnail_size, 2)
    at_least("top_k", top_k, 1)
    at_least("probe_length", probe_length, 0, " (0 skips the induction probe)")
    check_statistics(n_resamples=n_resamples, n_permutations=n_permutations, confidence=confidence, seed=seed)
    check_pseudo_group_size(pseudo_group_size)
    unknown = [name for name in ([rank_by] if isinstance(rank_by, str) else rank_by) if name not in RANK_BY]
    if unknown:
        raise InputError(f"rank_by={unknown[0]!r} is not a score the atlas ranks prompts by; use some of "
                         f"{', '.join(RANK_BY)}.")
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

    counts = {p.id: check_length(tokenizer, spec, p.text, chat=chat, where=p.where) for p in prompts}
    if counts:
        longest = max(counts, key=counts.get)
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


def _read_prompt_text(path: Path) -> str:
    return str(pd.read_parquet(path, columns=["prompt"])["prompt"].iloc[0])


def run_atlas(
    models,
    prompts: list[Prompt],
    out_dir: str | Path,
    *,
    chat: bool = False,
    measure: str = "js",
    thumbnail_size: int = THUMBNAIL_SIZE,
    max_rows: int | None = None,
    top_k: int = 3,
    rank_by=RANK_BY,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    n_permutations: int = 1000,
    seed: int = 0,
    pseudo_group_size: int | None = None,
    probe_length: int = 50,
    shard: tuple[int, int] | None = None,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    ranks: Ranks | None = None,
    loader: Callable | None = None,
    on_prompt: Callable | None = None,
    max_bytes: int | None = None,
) -> AtlasResult:
    """Measure `prompts` on every model and write the atlas's tables to `out_dir` (module docstring).

    `models`: a list of sources for `load_model` (loaded one at a time; `loader(source)` returns
    `(model, tokenizer, spec)` instead), or a dict `{name: (model, tokenizer, spec)}`. `measure`:
    the head divergence, "js" (exact Jensen-Shannon) or "hellinger". `max_rows`: evenly spaced
    query rows the divergence averages over (default all). `thumbnail_size`: the pooled pictures'
    size. `top_k` prompts per head and `rank_by` metric are kept with their pictures. Intervals:
    `n_resamples` bootstrap resamples of the prompts at `confidence`; layer gap p-values from
    `n_permutations` shuffles of the head grouping (MHA models: pseudo-groups of
    `pseudo_group_size`, default the first GQA model's group size, else 3). `probe_length`:
    random tokens of the induction probe (0 to skip it). `shard`, `resume`, `force`, `ranks`: as
    in `run_batch`. `on_prompt(model_name, prompt)` runs after each finished prompt.
    """
    _check_options(measure, thumbnail_size, top_k, n_resamples, confidence, n_permutations, max_rows,
                   pseudo_group_size, probe_length, rank_by, seed)
    entries = _model_entries(models)
    prompts = _check_prompts(prompts)
    ranks = launcher_ranks() if ranks is None else ranks
    out_dir = Path(out_dir)
    mine = shard_prompts(prompts, shard)
    files = output_paths(out_dir)
    models_parts = [_ModelParts(name, out_dir / "parts" / part_key(name)) for name, _ in entries]
    if not resume and not force:
        existing = [path for path in files.values() if path.exists()] + [
            parts.rows(p) for parts in models_parts for p in mine if parts.rows(p).exists()]
        if existing:
            raise InputError(f"{out_dir} already holds an atlas ({existing[0].relative_to(out_dir)}); pass resume=True "
                             "to continue it, force=True to recompute, or choose another out_dir.")
    for path in files.values() if shard is None else [out_dir / f"atlas{shard_suffix(shard)}.json"]:
        check_writable(path, force=True)
    settings = {"models": [name for name, _ in entries], "chat": chat, "measure": measure,
                "thumbnail_size": thumbnail_size, "max_rows": max_rows, "probe_length": probe_length}
    check_settings(out_dir, "atlas", settings, resume=resume)
    settings_path = out_dir / f"atlas{shard_suffix(shard)}.json"
    with claim_outputs([settings_path] if ranks.is_main else [], force=True, resumable=True):  # one run of this shard at a time
        done = {parts.name: [p for p in mine if resume and parts.done(p)] for parts in models_parts}
        for parts in models_parts:
            for prompt in ranks.share(done[parts.name]):
                if _read_prompt_text(parts.rows(prompt)) != prompt.text:
                    raise InputError(f"prompt '{prompt.id}' changed since the interrupted run; resume with the same prompt "
                                     "file, or pass force=True to recompute.")
        pending = {parts.name: [p for p in mine if p not in done[parts.name]] for parts in models_parts}
        if loader is None:
            from llm_heatmap.models.loading import resolve_source

            for _, source in entries:
                if not isinstance(source, tuple):
                    resolve_source(source)  # a wrong path or name fails here, before anything is written
        # the first model is loaded (and every prompt checked against it) before anything is written
        loaded = {}
        first_name, first_source = entries[0]
        if _needs_model(models_parts[0], ranks.share(pending[first_name]), ranks):
            loaded[first_name] = _model(first_source, loader)
            _check_fits(loaded[first_name][2], loaded[first_name][1], mine, chat, max_bytes, first_name, probe_length)
        ranks.barrier()  # every rank has checked its input; from here on files change

        for parts in models_parts:
            parts.folder.mkdir(parents=True, exist_ok=True)
        if ranks.is_main:
            write_settings(settings_path, settings)
        if force and not resume:
            for parts in models_parts:
                for prompt in ranks.share(pending[parts.name]):
                    parts.rows(prompt).unlink(missing_ok=True)
                    parts.tensors(prompt).unlink(missing_ok=True)
            ranks.barrier()

        result = AtlasResult(out_dir=out_dir, tables=None, files=files, measure=measure,
                             prompts={p.id: p.text for p in mine})
        all_parts = [parts.rows(p) for parts in models_parts for p in mine]
        progress = RunProgress(all_parts, enabled=ranks.is_main and not quiet and sys.stderr.isatty(), desc="atlas")
        options = dict(chat=chat, measure=measure, thumbnail_size=thumbnail_size, max_rows=max_rows)
        with progress:
            for (name, source), parts in zip(entries, models_parts):
                result.skipped[name] = [p.id for p in ranks.share(done[name])]
                result.computed[name] = []
                share = ranks.share(pending[name])
                if not _needs_model(parts, share, ranks):
                    continue
                model, tokenizer, spec = loaded.pop(name) if name in loaded else _model(source, loader)
                counts = _check_fits(spec, tokenizer, mine, chat, max_bytes, name, probe_length)  # every rank, the same verdict
                if ranks.is_main:
                    _write_model_files(parts, name, model, tokenizer, spec, probe_length, force and not resume)
                for prompt in share:
                    _measure_one(parts, name, prompt, counts[prompt.id], model, tokenizer, spec, options)
                    result.computed[name].append(prompt.id)
                    if on_prompt is not None:
                        on_prompt(name, prompt)
                del model
            ranks.barrier()  # every rank has written its parts

        if shard is not None or not ranks.is_main:
            return result
        result.computed = {name: [p.id for p in pending[name]] for name, _ in entries}
        result.skipped = {name: [p.id for p in done[name]] for name, _ in entries}
        _merge(result, models_parts, mine, measure=measure, top_k=top_k, rank_by=rank_by,
               bootstrap=Bootstrap(n_resamples, confidence, seed), n_permutations=n_permutations,
               pseudo_group_size=pseudo_group_size)
        return result


def _needs_model(parts: _ModelParts, share: list[Prompt], ranks: Ranks) -> bool:
    """Whether this rank must load the model: prompts to measure, or (rank 0) the model's files to write."""
    return bool(share) or (ranks.is_main and not (parts.spec_file.exists() and part_done(parts.probe_file)))


def _model(source, loader):
    """(model, tokenizer, spec) of a loaded entry or a source."""
    if isinstance(source, tuple):
        return source
    if loader is not None:
        return loader(source)
    from llm_heatmap.models import load_model

    return load_model(source)


def _write_model_files(parts: _ModelParts, name: str, model, tokenizer, spec, probe_length: int, fresh: bool) -> None:
    """The model's spec and its induction-probe scores (rank 0, once per model)."""
    if fresh or not parts.spec_file.exists():
        with atomic_output(parts.spec_file, force=True) as temp:
            temp.write_text(json.dumps({"name": name, "spec": spec.to_dict()}, indent=2) + "\n")
    if fresh or not sealed(parts.probe_file):
        if probe_length > 0:
            from .induction_probe import induction_probe_scores

            probe = induction_probe_scores(model, tokenizer, spec=spec, length=probe_length)
            probe = probe.drop(columns=["kv_group"])
        else:
            probe = pd.DataFrame(columns=["layer", "head"])
        write_part(parts.probe_file, lambda temp: write_table(probe, temp))


def _measure_one(parts: _ModelParts, name: str, prompt: Prompt, n_tokens: int, model, tokenizer, spec, options) -> None:
    from safetensors.numpy import save_file

    measured = measure_atlas_prompt(model, tokenizer, prompt.text, spec=spec, **options)
    write_part(parts.tensors(prompt), lambda temp: save_file(
        {"divergence": measured.divergence, "thumbnails": measured.thumbnails}, str(temp)))
    heads = measured.heads.reset_index(drop=True)
    front = pd.DataFrame({"model": name, "prompt_id": prompt.id, "group": prompt.group, "prompt": prompt.text,
                          "n_tokens": n_tokens}, index=heads.index)
    table = pd.concat([front, heads.drop(columns=FRONT, errors="ignore")], axis=1)
    table["group"] = table["group"].astype("string")
    write_part(parts.rows(prompt), lambda temp: write_table(table, temp))


def _merge(result: AtlasResult, models_parts: list[_ModelParts], prompts: list[Prompt], *, measure: str, top_k: int,
           rank_by, bootstrap: Bootstrap, n_permutations: int, pseudo_group_size: int | None) -> None:
    """Read every part and write the tables (rank 0, after the barrier)."""
    from safetensors.numpy import load_file

    from llm_heatmap.models import ModelSpec

    specs = {}
    for parts in models_parts:
        if not parts.spec_file.exists():
            raise InputError(f"{parts.folder} has no model.json; run the atlas again with resume=True to write it.")
        specs[parts.name] = ModelSpec.from_dict(json.loads(parts.spec_file.read_text())["spec"])
    if pseudo_group_size is None:
        gqa = [spec.group_size for spec in specs.values() if spec.attention_kind == "GQA"]
        pseudo_group_size = gqa[0] if gqa else DEFAULT_PSEUDO_GROUP_SIZE
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
        top = top_prompts(rows, rank_by, top_k)
        frames["prompt_heads"].append(rows.prompt_heads)
        frames["heads"].append(heads)
        frames["layers"].append(layer_table(rows, kv, bootstrap, n_permutations=n_permutations,
                                            pseudo_group_size=pseudo_group_size))
        frames["models"].append(model_table(rows, kv, bootstrap))
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
