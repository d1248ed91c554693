"""Shared fixtures: the two real offline models, loaded once per test session."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
# Under pytest-xdist the cores are shared out among the workers (and the processes the tests start), so that
# two workers on two cores do not each run two torch threads.
_THREADS = str(max(1, min(4, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)
torch.set_num_threads(int(_THREADS))

REAL_MODEL_FIXTURES = {"smollm2", "smollm2_eager", "minilm", "minilm_eager"}


# The files whose tests take longest (notebook kernels, launched processes) run first, so that under
# pytest-xdist the workers do not end with one of them running alone.
LONGEST_FIRST = ("test_notebooks.py", "test_distributed.py", "test_hostile_processes.py")


def pytest_collection_modifyitems(items):
    """A test that takes a real offline model is `slow`, marked or not, so `-m "not slow"` never loads one."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def seeded_random():
    """Every test starts from the same random state, whatever ran before it: unseeded inputs are fixed too."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def softmax_path(request, monkeypatch):
    """Which softmax captures use, by parameter: "native" (the compiled kernel, required) or "torch"."""
    from llm_heatmap.probes import native_softmax

    if request.param == "native" and shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine: the torch softmax is used")
    monkeypatch.setenv("LLM_HEATMAP_NATIVE", "1" if request.param == "native" else "0")
    native_softmax._kernel.cache_clear()
    yield request.param
    monkeypatch.undo()
    native_softmax._kernel.cache_clear()


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


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """(model, tokenizer, spec) of a tiny random GQA Llama read from a GGUF (2 layers, 4 heads on 2 KV heads)
    with its byte-level tokenizer: a real loading path and tokenizer in about a second."""
    from llm_heatmap.models import load_model
    from tiny_models import write_tiny_gguf

    folder = tmp_path_factory.mktemp("tiny-gguf")
    patch = pytest.MonkeyPatch()
    patch.setenv("LLM_HEATMAP_CACHE", str(folder / "cache"))
    try:  # its own cache for this load only: the rest of the session keeps the cache it was started with
        return load_model(write_tiny_gguf(folder / "tiny.gguf"))
    finally:
        patch.undo()


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium / chromedriver not installed (apt-get install -y chromium chromium-driver)")
    pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    from browser import headless_chromium

    with headless_chromium() as driver:
        yield driver
