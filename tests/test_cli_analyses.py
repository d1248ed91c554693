"""The analysis subcommands (`metrics`, `compare`, `kv-similarity`, `batch`) run through the CLI's `main`.

The real offline models come from the session fixtures (the CLI's loader is pointed at them), so
these tests exercise argument parsing, files, exit codes and messages without reloading models.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from llm_heatmap import cli as cli_module
from llm_heatmap.analyses.runs.batch import run_batch
from llm_heatmap.analyses.runs.prompts import read_prompts
from llm_heatmap.cli import batch as batch_command
from llm_heatmap.cli import compare as compare_command
from llm_heatmap.cli import kv_similarity as kv_similarity_command
from llm_heatmap.cli import metrics as metrics_command
from llm_heatmap.probes import AttentionCube

pytestmark = pytest.mark.slow
MINE = [metrics_command, compare_command, kv_similarity_command, batch_command]


@pytest.fixture
def run(monkeypatch, capsys, smollm2, minilm):
    models = {"smollm2-135m": smollm2, "minilm-l6": minilm,
              "tiny-context": (smollm2[0], smollm2[1], replace(smollm2[2], max_positions=4))}
    loads = []

    def fake_load(source, **options):
        loads.append(source)
        return models[str(source)]

    monkeypatch.setattr("llm_heatmap.models.load_model", fake_load)
    registered = [c for c in cli_module.command_modules() if c not in MINE]
    monkeypatch.setattr(cli_module, "command_modules", lambda: registered + MINE)

    def invoke(*argv):
        capsys.readouterr()
        code = cli_module.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    invoke.loads = loads
    return invoke


def one_sentence(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llm-heatmap {command}: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", ["metrics", "compare", "kv-similarity", "batch"])
def test_help_has_an_example(run, command):
    with pytest.raises(SystemExit) as exit_:
        run(command, "--help")
    assert exit_.value.code == 0


def test_help_text(run, capsys):
    for command in ("metrics", "compare", "kv-similarity", "batch"):
        with pytest.raises(SystemExit):
            cli_module.main([command, "--help"])
        assert f"llm-heatmap {command}" in capsys.readouterr().out.split("example")[1]


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json", "md"])
def test_metrics_writes_each_format(run, tmp_path, suffix):
    out = tmp_path / f"sky.{suffix}"
    code, stdout, _ = run("metrics", "the sky is blue", "--model", "minilm-l6", "--out", out,
                          "--metric", "norm_entropy,sink_score", "--metric", "pattern_class")
    assert code == 0
    assert "minilm-l6: dense encoder, MHA 12q:12kv x 6 layers" in stdout and "strongest sink heads" in stdout
    assert out.exists() and [p.name for p in tmp_path.iterdir()] == [out.name]
    if suffix == "md":
        header = out.read_text().splitlines()[0]
        assert header == "| layer | head | kv_group | norm_entropy | sink_score | pattern_class |"
        return
    table = {"csv": pd.read_csv, "parquet": pd.read_parquet, "json": pd.read_json}[suffix](out)
    assert list(table.columns) == ["layer", "head", "kv_group", "norm_entropy", "sink_score", "pattern_class"]
    assert len(table) == 72


def test_metrics_json_and_stdout_table(run, tmp_path):
    code, stdout, _ = run("--quiet", "metrics", "the sky is blue", "--model", "minilm-l6", "--json",
                          "--metric", "entropy")
    payload = json.loads(stdout)
    assert code == 0 and payload["tokens"] == 6 and payload["heads"] == 72 and len(payload["digest"]) == 5
    assert set(payload["table"][0]) == {"layer", "head", "kv_group", "entropy"}
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("the sky is blue\n")
    code, stdout, _ = run("metrics", "--prompt-file", prompt_file, "--model", "minilm-l6", "--quiet")
    assert code == 0 and "| layer | head | kv_group | entropy |" in stdout


@pytest.mark.parametrize("argv, message", [
    (["metrics", "   "], "the prompt is empty"),
    (["metrics", "--prompt-file", "/nonexistent/prompt.txt"], "does not exist"),
    (["metrics", "the sky", "--metric", "entropi"], "metric 'entropi' does not exist; valid metrics are: entropy, "),
    (["metrics", "the sky is blue today", "--model", "tiny-context"],
     "has 5 tokens but the model's context holds 4"),
    (["metrics", "the sky", "--out", "OUT/table.xlsx"], "end it with .csv, .parquet, .json or .md"),
    (["compare", "the sky is blue", "run a self-meta-cognitive diagnostic", "--model", "minilm-l6", "--out", "OUT/d.csv"],
     "prompt A has 6 tokens and prompt B has 10, so their patterns cannot be subtracted; pass --metrics-only"),
    (["compare", "", "b"], "prompt A is empty"),
    (["kv-similarity"], "no prompt given"),
    (["batch", "OUT/missing.txt", "--out", "OUT/b"], "does not exist"),
    (["batch", "OUT/../prompts.txt", "--out", "OUT/b", "--shard", "2/2"], "shard '2/2' is out of range"),
])
def test_bad_input_exits_2_with_one_sentence_and_no_file(run, tmp_path, argv, message):
    (tmp_path / "prompts.txt").write_text("the sky is blue\n")
    out = tmp_path / "OUT"
    argv = [a.replace("OUT", str(out)) for a in argv]
    code, stdout, err = run(*argv)
    assert code == 2
    assert message in one_sentence(err, argv[0])
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_existing_output_needs_force(run, tmp_path):
    out = tmp_path / "m.csv"
    out.write_text("keep me\n")
    code, _, err = run("metrics", "the sky", "--model", "minilm-l6", "--out", out)
    assert code == 2 and "already exists; pass --force" in one_sentence(err, "metrics")
    assert out.read_text() == "keep me\n" and run.loads == []  # refused before loading the model
    code, _, _ = run("metrics", "the sky", "--model", "minilm-l6", "--out", out, "--force")
    assert code == 0 and pd.read_csv(out).shape[0] == 72


def test_compare_equal_length_prompts(run, tmp_path, smollm2):
    out, cube_out = tmp_path / "exp2.csv", tmp_path / "exp2.safetensors"
    simple, complex_ = "Tell me a very simple short story.", "Explain the core idea behind quantum entanglement."
    code, stdout, _ = run("compare", simple, complex_, "--out", out, "--cube-out", cube_out, "--quiet")
    assert code == 0 and "A: 8 tokens, B: 8 tokens" in stdout and "difference cube computed" in stdout
    deltas = pd.read_csv(out)
    assert list(deltas.columns) == ["layer", "head", "kv_group", "metric", "a", "b", "delta"]
    assert len(deltas["metric"].unique()) > 10 and len(deltas) % 270 == 0
    difference = AttentionCube.load(cube_out)
    model, tokenizer, spec = smollm2
    from llm_heatmap.probes import capture_prompt

    with torch.no_grad():
        a, b = (capture_prompt(model, tokenizer, p, spec=spec) for p in (simple, complex_))
    torch.testing.assert_close(difference.pattern, b.pattern - a.pattern)
    assert difference.metadata["prompt_a"] == simple and difference.metadata["prompt_b"] == complex_
    assert (tmp_path / "exp2.diff.png").stat().st_size > 0  # the old --out FILE spelling: drawing beside it


def test_compare_writes_table_drawing_and_cube_by_default(run, tmp_path):
    """Two prompts and no file flags: the deltas, the B - A grid (PNG and HTML) and the cube land in --out,
    under a name that tells two prompt pairs with the same first words apart."""
    simple, complex_ = "Tell me a very simple short story.", "Explain the core idea behind quantum entanglement."
    code, stdout, _ = run("compare", simple, complex_, "--out", tmp_path, "--html", "--quiet", "--json")
    files = {key: Path(value) for key, value in json.loads(stdout)["files"].items()}
    assert code == 0 and set(files) == {"deltas", "grid", "html", "cube"} and all(p.parent == tmp_path for p in files.values())
    assert AttentionCube.load(files["cube"]).difference and "signed" in files["html"].read_text()
    code, stdout, _ = run("compare", "Tell me a very simple short poem.", complex_, "--out", tmp_path, "--quiet", "--json")
    assert code == 0 and set(json.loads(stdout)["files"].values()).isdisjoint(map(str, files.values()))
    code, _, err = run("compare", simple, complex_, "--out", tmp_path, "--no-cube", "--cube-out", tmp_path / "x")
    assert code == 2 and "contradict" in err


def test_compare_metrics_only_and_sets(run, tmp_path):
    code, stdout, _ = run("compare", "the sky is blue", "run a self-meta-cognitive diagnostic", "--model",
                          "minilm-l6", "--metrics-only", "--metric", "norm_entropy", "--json", "--out", tmp_path)
    payload = json.loads(stdout)
    assert code == 0 and payload["tokens"] == {"a": 6, "b": 10} and payload["digest"][0].startswith("norm_entropy")

    simple, hard = tmp_path / "simple.txt", tmp_path / "complex.jsonl"
    simple.write_text("the sky is blue\ncats sleep a lot\n")
    hard.write_text('{"prompt": "define an integral"}\n{"prompt": "prove a theorem"}\n')
    out = tmp_path / "sets.heads.csv"
    code, stdout, _ = run("compare", simple, hard, "--sets", "--model", "minilm-l6", "--out", out,
                          "--resamples", "200", "--permutations", "100", "--metric", "norm_entropy")
    assert code == 0 and "set A: 2 prompts" in stdout
    heads, layers = pd.read_csv(out), pd.read_csv(tmp_path / "sets.layers.csv")
    assert len(heads) == 72 and len(layers) == 6
    # 2 vs 2 prompts: 6 label splits, enumerated exactly, so p >= 1/3
    assert (heads["p_value"] >= 1 / 3 - 1e-9).all()
    assert (heads["ci_low"] <= heads["delta"]).all() and (heads["delta"] <= heads["ci_high"]).all()
    # the prompts' rows are a resumable run beside the tables: a second run is refused, --resume takes it up
    assert len(pd.read_parquet(tmp_path / "sets.sets" / "sets.parquet")) == 4 * 72
    again = ["compare", simple, hard, "--sets", "--model", "minilm-l6", "--out", out, "--resamples", "200",
             "--permutations", "100", "--metric", "norm_entropy"]
    code, _, err = run(*again)
    assert code == 2 and "--force" in err
    code, stdout, err = run(*again, "--resume")
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(out), heads)


def test_kv_similarity_two_models(run, tmp_path):
    out = tmp_path / "kv.csv"
    code, stdout, _ = run("kv-similarity", "--model", "smollm2-135m", "--model", "minilm-l6", "the sky is blue",
                          "cats sleep", "--measure", "js", "--permutations", "50", "--out", out, "--quiet")
    assert code == 0
    charts = {model: tmp_path / f"kv.{model}.png" for model in ("smollm2-135m", "minilm-l6")}
    assert all(path.stat().st_size > 0 for path in charts.values()) and str(charts["minilm-l6"]) in stdout
    layers, summary = pd.read_csv(out), pd.read_csv(tmp_path / "kv.summary.csv")
    assert layers.groupby("model")["layer"].nunique().to_dict() == {"smollm2-135m": 30, "minilm-l6": 6}
    kinds = summary.set_index("model")
    assert kinds.loc["smollm2-135m", "grouping"].tolist() == ["kv", "kv"]
    assert kinds.loc["minilm-l6", "grouping"].tolist() == ["pseudo", "pseudo"]
    assert (summary["group_size"] == 3).all() and set(summary["first_token"]) == {"kept", "dropped"}
    assert "smollm2-135m (GQA, kv groups of 3)" in stdout and "minilm-l6 (MHA, pseudo groups of 3)" in stdout
    assert set(layers["measure"]) == {"js"} and ((layers["p_value"] > 0) & (layers["p_value"] <= 1)).all()
    # the chart draws the table's per-layer means over the two prompts, first token kept
    from llm_heatmap.cli.kv_similarity import figure_paths, kv_chart

    kept = layers[(layers["model"] == "minilm-l6") & (layers["first_token"] == "kept")].groupby("layer")
    chart = kv_chart(layers, "minilm-l6")
    within, between = (line.get_ydata() for line in chart.axes[0].get_lines())
    assert np.allclose(within, kept["within"].mean()) and np.allclose(between, kept["between"].mean())
    assert "mean over 2 prompts" in chart._suptitle.get_text()
    gap_axis = chart.axes[1]  # the gap per layer, its interval around the mean over the prompts
    assert np.allclose(gap_axis.get_lines()[0].get_ydata(), kept["gap"].mean())
    (low, high) = np.array([segment[:, 1] for segment in gap_axis.collections[0].get_segments()]).T
    assert (low <= kept["gap"].mean().to_numpy() + 1e-12).all() and (kept["gap"].mean().to_numpy() <= high + 1e-12).all()
    assert (low <= kept["gap"].min().to_numpy() + 1e-12).all() and (kept["gap"].max().to_numpy() <= high + 1e-12).all()
    assert figure_paths(out, ["minilm-l6"]) == {"minilm-l6": charts["minilm-l6"]}
    assert len(set(figure_paths(out, ["a/model", "b/model"]).values())) == 2
    code, stdout, _ = run("kv-similarity", "--model", "minilm-l6", "cats sleep", "--measure", "js", "--permutations", "10",
                          "--out", tmp_path / "again.csv", "--quiet", "--json")
    assert code == 0 and json.loads(stdout)["files"]["figures"] == [str(tmp_path / "again.minilm-l6.png")]


def test_batch_resume_and_shards(run, tmp_path, minilm):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("the sky is blue\ncats sleep\nhello there\n")
    out = tmp_path / "run"
    model, tokenizer, spec = minilm

    class Stop(Exception):
        pass

    def stop(prompt, table):
        raise Stop

    with pytest.raises(Stop):  # an interrupted run: one prompt done
        run_batch(model, tokenizer, read_prompts(prompt_file), out, spec=spec, source="minilm-l6", quiet=True,
                  on_prompt=stop)
    code, _, err = run("batch", prompt_file, "--out", out, "--model", "minilm-l6")
    assert code == 2 and "--resume" in one_sentence(err, "batch")
    code, stdout, _ = run("batch", prompt_file, "--out", out, "--model", "minilm-l6", "--resume", "--json")
    payload = json.loads(stdout)
    assert code == 0 and payload["skipped"] == ["0"] and payload["computed"] == ["1", "2"] and payload["rows"] == 216
    assert pd.read_parquet(out / "heads.parquet").shape[0] == 216 and pd.read_csv(out / "heads.csv").shape[0] == 216

    sharded = tmp_path / "sharded"
    code, stdout, _ = run("batch", prompt_file, "--out", sharded, "--model", "minilm-l6", "--shard", "1/2", "--json")
    assert code == 0 and json.loads(stdout)["computed"] == ["1"]
    assert (sharded / "heads.shard-1-of-2.parquet").exists() and (sharded / "heads.shard-1-of-2.csv").exists()


def test_prompt_sets_experiment_script(monkeypatch, tmp_path, minilm, capsys):
    from experiments import prompt_sets

    monkeypatch.setattr("llm_heatmap.models.load_model", lambda source, **options: minilm)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [
        {"id": "s1", "group": "simple", "pair": 1, "prompt": "the cat sat"},
        {"id": "c1", "group": "complex", "pair": 1, "prompt": "define integrals"},
        {"id": "s2", "group": "simple", "pair": 2, "prompt": "dogs run fast"},
        {"id": "c2", "group": "complex", "pair": 2, "prompt": "prove the theorem"}]) + "\n")
    out = tmp_path / "out"
    code = prompt_sets.main(["--model", "minilm-l6", "--out", str(out), "--pairs", str(pairs), "--resamples", "100",
                             "--permutations", "100", "--quiet"])
    assert code == 0
    heads = pd.read_csv(out / "sets.heads.csv")
    assert len(heads) == 72 * heads["metric"].nunique() and (heads["p_value"] >= 0.5).all()  # 2 pairs: 4 flips
    assert (out / "sets.layers.md").read_text().startswith("| layer | metric |")
    assert pd.read_csv(out / "seed_exp2.deltas.csv")["metric"].nunique() > 10
    assert not (out / "seed_exp2.difference.safetensors").exists()  # 10 vs 12 WordPiece tokens on MiniLM
    reading = (out / "reading.md").read_text()
    assert "2 length-matched pairs" in reading and "token counts differ: metrics only" in reading
    assert reading == capsys.readouterr().out


def test_metric_choices_are_the_tables_real_columns(run):
    """Every column the default table prints is a valid --metric (the value-norm columns were refused)."""
    code, stdout, _ = run("metrics", "the sky is blue", "--model", "minilm-l6", "--json")
    columns = [c for c in json.loads(stdout)["table"][0] if c not in ("layer", "head", "kv_group")]
    assert code == 0 and "norm_sink_score" in columns
    code, stdout, err = run("metrics", "the sky is blue", "--model", "minilm-l6", "--json",
                            *[arg for column in columns for arg in ("--metric", column)])
    assert code == 0, err
    assert list(json.loads(stdout)["table"][0]) == ["layer", "head", "kv_group", *columns]
    code, _, err = run("metrics", "the sky", "--induction-probe", "4", "--metric", "probe_induction_score",
                       "--model", "minilm-l6", "--json")
    assert code == 0, err


def test_compare_sets_of_the_shipped_pairs_file(run, tmp_path):
    """`experiments/data/length_matched_pairs.jsonl` works as shipped: one file, split by group, paired by pair."""
    data = Path(__file__).parents[1] / "experiments" / "data" / "length_matched_pairs.jsonl"
    code, stdout, err = run("compare", data, "--sets", "--group-column", "group", "--paired", "pair", "--model",
                            "minilm-l6", "--out", tmp_path, "--metric", "norm_entropy", "--resamples", "200", "--quiet")
    assert code == 0, err
    assert "set A: 8 prompts (group 'simple'" in stdout and "paired by pair (8 pairs, sign-flip test)" in stdout
    heads = pd.read_csv(next(tmp_path.glob("*.heads.csv")))
    assert (heads[["n_a", "n_b"]] == 8).all().all()
    # 2^8 sign flips are enumerated: every p-value is a multiple of 1/256, and at least 2/256
    assert np.allclose(heads["p_value"] * 256, np.round(heads["p_value"] * 256)) and heads["p_value"].min() >= 2 / 256
    code, _, err = run("compare", data, "--sets", "--group-column", "group", "--groups", "simple,hard",
                       "--out", tmp_path / "x", "--model", "minilm-l6")
    assert code == 2 and "not two of the file's groups" in err and run.loads.count("minilm-l6") == 1
    code, _, err = run("compare", data, "--sets", "--model", "minilm-l6", "--out", tmp_path / "x")
    assert code == 2 and "--group-column" in err
