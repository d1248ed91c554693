"""The package root: one import for a notebook, light to import, one error type; batched cubes in analyses."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch

import llm_heatmap
from llm_heatmap.errors import InputError
from tiny_models import VOCAB, tiny_model


def test_root_exports_the_main_names():
    import llm_heatmap.analyses as analyses
    import llm_heatmap.models as models
    import llm_heatmap.probes as probes
    import llm_heatmap.viz as viz

    assert llm_heatmap.__version__.count(".") == 2
    assert llm_heatmap.load_model is models.load_model and llm_heatmap.capture_prompt is probes.capture_prompt
    assert llm_heatmap.head_metrics is analyses.head_metrics and llm_heatmap.save_grid is viz.save_grid
    for name in llm_heatmap.__all__:
        assert getattr(llm_heatmap, name) is not None, name
    assert set(llm_heatmap.__all__) <= set(dir(llm_heatmap))
    with pytest.raises(AttributeError):
        llm_heatmap.no_such_name  # noqa: B018


def test_importing_the_root_and_models_loads_no_torch():
    code = ("import sys, llm_heatmap, llm_heatmap.models as m; "
            "assert m.DEFAULT_MODEL == 'smollm2-135m' and llm_heatmap.InputError; "
            "print(sorted(x for x in ('torch', 'transformers', 'matplotlib', 'pandas') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_error_type_for_every_room():
    from llm_heatmap.models import loading
    from llm_heatmap.probes import cube
    from llm_heatmap.viz import style

    for module in (loading, cube, style):
        assert module.InputError is InputError
    assert issubclass(InputError, ValueError)


def test_table_functions_take_batched_cubes_sequence_by_sequence():
    from llm_heatmap.analyses import head_detector_scores, head_metrics, kv_group_similarity
    from llm_heatmap.probes import capture

    model = tiny_model("llama", "sdpa")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second sequence is left-padded to 6 real tokens
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), capture(model) as probe:
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    batch = probe.cube(ids, mask)
    assert batch.batched
    for function, options in ((head_metrics, {}), (head_detector_scores, {}),
                              (kv_group_similarity, {"n_permutations": 20, "pseudo_group_size": 2})):
        table = function(batch, **options)
        assert table.columns[0] == "sequence" and table["sequence"].unique().tolist() == [0, 1]
        for index in (0, 1):
            alone = function(batch.item(index), **options)
            part = table[table["sequence"] == index].drop(columns="sequence").reset_index(drop=True)
            pd.testing.assert_frame_equal(part, alone)
    assert (head_metrics(batch).query("sequence == 1")["n_rows"] == 5).all(), "padding rows never count"
    with pytest.raises(InputError, match="batch of 2"):
        batch.attendable()


def test_exported_names_are_not_shadowed_by_their_modules():
    """A lazily exported function named like a module of its package would be replaced by that module as soon
    as the module is imported; no room may have such a name."""
    import importlib
    import pkgutil

    for room in ("models", "probes", "analyses", "viz", "cli"):
        package = importlib.import_module(f"llm_heatmap.{room}")
        modules = {info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_")}
        for module in modules:
            importlib.import_module(f"llm_heatmap.{room}.{module}")
        for name in getattr(package, "__all__", []):
            assert not isinstance(getattr(package, name), type(importlib)), f"llm_heatmap.{room}.{name} is a module"
