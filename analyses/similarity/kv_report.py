"""The cross-model KV-group report: do heads sharing a KV head attend alike, GQA vs MHA?

`kv_report(models, prompts)` captures every prompt on every model, runs
`kv_similarity.kv_group_similarity` on each cube and stacks the per-layer rows (model, prompt,
layer, measure, first_token, within, between, gap, p_value) into one table. GQA models are
grouped by their real KV heads; MHA models by consecutive pseudo-groups of the GQA models'
group size (3 for SmolLM2), so both kinds answer the same question in one table.

The model-level summary has one row per model x measure x first-token handling: the means of
within, between and gap over all (prompt, layer) rows, the share of rows whose gap is positive
(`share_gap_positive`), and the share whose permutation p-value is below 0.05 (`share_significant`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from llm_heatmap.errors import InputError

from llm_heatmap.analyses.bounds import check_pseudo_group_size, check_statistics, pseudo_group_size_of
from llm_heatmap.analyses.runs.engine import PromptSetRun, RunOptions, Section, run_prompt_set
from llm_heatmap.analyses.runs.parts import part_key
from llm_heatmap.analyses.runs.prompts import Prompt, check_prompt
from llm_heatmap.analyses.runs.table_files import write_table

SUMMARY_KEYS = ["model", "attention_kind", "grouping", "group_size", "measure", "first_token"]


@dataclass
class KVReport:
    layers: pd.DataFrame  # one row per model x prompt x layer x measure x first_token
    summary: pd.DataFrame  # one row per model x measure x first_token

    def _repr_html_(self) -> str:
        from llm_heatmap.notebook import tables_html

        return tables_html("KVReport: KV-group similarity", {"summary": self.summary, "layers": self.layers})


def summarize(layers: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Model-level summary of a per-layer KV table (module docstring)."""
    grouped = layers.assign(gap_positive=layers["gap"] > 0, significant=layers["p_value"] < alpha).groupby(
        SUMMARY_KEYS, sort=False)
    summary = grouped.agg(n_prompts=("prompt", "nunique"), n_layers=("layer", "nunique"), within=("within", "mean"),
                          between=("between", "mean"), gap=("gap", "mean"), gap_positive=("gap_positive", "mean"),
                          significant=("significant", "mean")).reset_index()
    return summary.rename(columns={"gap_positive": "share_gap_positive", "significant": "share_significant"})


class _ModelSection(Section):
    """One model of the report: loaded in `open` (a source) or given loaded; a prompt's rows are
    `kv_group_similarity` of its cube."""

    def __init__(self, name: str, folder: Path, entry, load, prompts: list[Prompt], chat: bool, similarity: dict,
                 site: str | None = None):
        super().__init__(name, folder)
        self.entry, self.load, self.prompts, self.chat, self.similarity = entry, load, prompts, chat, similarity
        self.site = site
        self.loaded = None  # (model, tokenizer, runs.sites.ResolvedSite, processor)

    def load_and_check(self) -> dict[str, int]:
        """Load the model (once) and check every prompt against it; the token counts."""
        from llm_heatmap.analyses.runs.sites import check_site_run, loaded_with_processor, record_lengths, resolve_site

        if self.loaded is None:
            model, tokenizer, spec, processor = loaded_with_processor(self.entry, self.load, self.prompts)
            site = resolve_site(model, spec, self.site, self.name, "the KV report reads one")
            self.loaded = model, tokenizer, site, processor
        model, tokenizer, site, processor = self.loaded
        check_site_run(model, processor, site, self.prompts, chat=self.chat, name=self.name)
        return record_lengths(tokenizer, site.spec, self.prompts, chat=self.chat, name=self.name)

    def open(self, share, ranks):
        return self.load_and_check() if share else None

    def measure(self, prompt: Prompt) -> pd.DataFrame:
        from llm_heatmap.analyses.runs.sites import site_cube
        from llm_heatmap.analyses.similarity.kv_similarity import kv_group_similarity

        model, tokenizer, site, processor = self.loaded
        cube = site_cube(model, tokenizer, prompt, site, processor, chat=self.chat)
        table = kv_group_similarity(cube, **self.similarity)
        table.insert(0, "attention_kind", site.spec.attention_kind)
        return table

    def close(self) -> None:
        self.loaded = None


def _head_counts(entries):
    """(query heads, KV heads) of each entry, from a loaded spec or the source's config (`models.counts`), before
    any model loads (a source whose config does not say counts as MHA)."""
    from llm_heatmap.models.counts import attention_counts

    for _, value in entries:
        if isinstance(value, tuple):
            yield value[2].num_heads, value[2].num_kv_heads
        else:
            counts = attention_counts(value)
            yield (counts.heads, counts.kv_heads) if counts else (1, 1)


def kv_report(models, prompts, *, pseudo_group_size: int | None = None, chat: bool = False, measures=None,
              n_permutations: int = 1000, seed: int = 0, loader=None, out_dir=None,
              run: RunOptions | None = None, site: str | None = None) -> KVReport:
    """Per-layer KV-group similarity of every model on every prompt, plus a model-level summary.

    `models`: a dict `{name: (model, tokenizer, spec)}` of loaded models, or a list of sources
    for `load_model` (loaded one at a time; `loader(source)` overrides `load_model`).
    `prompts`: strings or `runs.prompts.Prompt`s. `pseudo_group_size` (default: the group size of the
    first GQA model, else 3) forms the pseudo-groups of MHA/MQA models. The measuring is one resumable,
    shardable, data-parallel run of `runs.engine` into `out_dir` (default: a temporary folder), resumed
    or forced with `run` (`runs.engine.RunOptions`); `kv.parquet` there holds every model's rows.
    `site` names the attention site read on every model (`runs.sites`: a model with several sites, an
    encoder-decoder or a VLM, needs it; records give their images and targets as in a batch).
    """
    from llm_heatmap.models import load_model

    check_statistics(n_permutations=n_permutations)
    check_pseudo_group_size(pseudo_group_size)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InputError("the KV report needs at least one prompt; pass prompts, a list of strings.")
    if not models:
        raise InputError("the KV report needs at least one model; pass models, a list of sources or a dict of loaded models.")
    prompts = [p if isinstance(p, Prompt) else Prompt(str(i + 1), check_prompt(p, f"prompt {i + 1}"))
               for i, p in enumerate(prompts)]
    entries = list(models.items()) if isinstance(models, dict) else [(str(source), source) for source in models]
    from llm_heatmap.analyses.similarity.kv_similarity import MEASURES

    similarity = dict(measures=tuple(measures or MEASURES), pseudo_group_size=pseudo_group_size_of(_head_counts(entries), pseudo_group_size),
                      n_permutations=n_permutations, seed=seed)
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="llm-heatmap-kv-") as folder:
            return kv_report(models, prompts, chat=chat, loader=loader, out_dir=folder, run=run, site=site, **similarity)
    out_dir = Path(out_dir)
    sections = [_ModelSection(name, out_dir / "parts" / part_key(name), value, loader or load_model, prompts, chat,
                              similarity, site) for name, value in entries]
    report = {}

    def merge(record) -> None:
        layers = pd.concat([record.tables(section) for section in sections], ignore_index=True)
        columns = ["model", "attention_kind", "grouping", "group_size", "prompt", "n_tokens", "layer", "measure",
                   "first_token", "within", "between", "gap", "p_value", "n_permutations"]
        layers = layers[columns + [c for c in layers.columns if c not in columns]]
        write_table(layers, out_dir / "kv.parquet", force=True)
        report["result"] = KVReport(layers=layers, summary=summarize(layers))

    settings = {"models": [name for name, _ in entries], "chat": chat, **({"site": site} if site else {}),
                "similarity": {k: list(v) if isinstance(v, tuple) else v for k, v in similarity.items()}}
    def check(pending) -> None:  # the first model's verdict on the prompts comes before anything is written
        if pending[sections[0].name]:
            sections[0].load_and_check()

    record = run_prompt_set(PromptSetRun(kind="kv", title="a KV report", sections=sections, settings=settings,
                                         outputs=[out_dir / "kv.parquet"], check=check, merge=merge),
                            prompts, out_dir, run or RunOptions())
    return report.get("result") if record.ranks.is_main else None
