"""Shared fixtures: the two real offline models, loaded once per test session."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, spec) of SmolLM2-135M-Instruct, default (sdpa) kernel."""
    from llm_heatmap.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_eager():
    from llm_heatmap.models import load_model

    return load_model("smollm2-135m", attn_implementation="eager")


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer, spec) of all-MiniLM-L6-v2, default (sdpa) kernel."""
    from llm_heatmap.models import load_model

    return load_model("minilm-l6")


@pytest.fixture(scope="session")
def minilm_eager():
    from llm_heatmap.models import load_model

    return load_model("minilm-l6", attn_implementation="eager")
