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

from dataclasses import dataclass

import pandas as pd

from llm_heatmap.errors import InputError

from llm_heatmap.analyses.bounds import PSEUDO_GROUP_SIZE, check_pseudo_group_size, check_statistics
from llm_heatmap.analyses.runs.prompts import check_length

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


def _or_default(pseudo_group_size: int | None) -> int:
    return PSEUDO_GROUP_SIZE if pseudo_group_size is None else pseudo_group_size


def _kind(spec) -> str:
    return spec.attention_kind


def kv_report(models, prompts, *, pseudo_group_size: int | None = None, chat: bool = False, measures=None,
              n_permutations: int = 1000, seed: int = 0, loader=None, progress=None) -> KVReport:
    """Per-layer KV-group similarity of every model on every prompt, plus a model-level summary.

    `models`: a dict `{name: (model, tokenizer, spec)}` of loaded models, or a list of sources
    for `load_model` (loaded one at a time; `loader(source)` overrides `load_model`).
    `prompts`: a list of strings. `pseudo_group_size` (default: the group size of the first
    GQA model, else 3) forms the pseudo-groups of MHA/MQA models.
    """
    from llm_heatmap.probes import capture_prompt

    from llm_heatmap.analyses.similarity.kv_similarity import MEASURES, kv_group_similarity

    check_statistics(n_permutations=n_permutations)
    check_pseudo_group_size(pseudo_group_size)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InputError("the KV report needs at least one prompt; pass prompts, a list of strings.")
    if not models:
        raise InputError("the KV report needs at least one model; pass models, a list of sources or a dict of loaded models.")
    measures = tuple(measures or MEASURES)
    from llm_heatmap.models import load_model

    load = loader or load_model
    entries = list(models.items()) if isinstance(models, dict) else [(str(source), source) for source in models]

    def loaded(entry):
        name, value = entry
        return value if isinstance(value, tuple) else load(value)

    def measure(name, model, tokenizer, spec, size):
        frames = []
        for index, prompt in enumerate(prompts):
            check_length(tokenizer, spec, prompt, chat=chat, where=f"prompt {index + 1}")
        for index, prompt in enumerate(prompts):
            if progress:
                progress(f"{name}: prompt {index + 1}/{len(prompts)}")
            cube = capture_prompt(model, tokenizer, prompt, spec=spec, chat=chat)
            table = kv_group_similarity(cube, measures=measures, pseudo_group_size=size,
                                        n_permutations=n_permutations, seed=seed)
            table.insert(0, "prompt", prompt)
            table.insert(0, "n_tokens", cube.num_keys)
            table.insert(0, "attention_kind", _kind(spec))
            table.insert(0, "model", name)
            frames.append(table)
        return pd.concat(frames, ignore_index=True)

    results: dict[str, pd.DataFrame] = {}
    deferred = []
    for entry in entries:
        model, tokenizer, spec = loaded(entry)
        if _kind(spec) == "GQA" and pseudo_group_size is None:
            pseudo_group_size = spec.group_size
        if _kind(spec) == "GQA" or pseudo_group_size is not None:
            results[entry[0]] = measure(entry[0], model, tokenizer, spec, _or_default(pseudo_group_size))
        else:
            deferred.append((entry[0], (model, tokenizer, spec)))  # waits for a GQA model's group size
        del model
    for name, (model, tokenizer, spec) in deferred:
        results[name] = measure(name, model, tokenizer, spec, _or_default(pseudo_group_size))
    layers = pd.concat([results[name] for name, _ in entries], ignore_index=True)
    columns = ["model", "attention_kind", "grouping", "group_size", "prompt", "n_tokens", "layer", "measure",
               "first_token", "within", "between", "gap", "p_value", "n_permutations"]
    layers = layers[columns + [c for c in layers.columns if c not in columns]]
    return KVReport(layers=layers, summary=summarize(layers))
