"""One progress component for every long step (issue 21, item 2): shown inside `progress_shown(True)` (the CLI
on a terminal without --quiet), also where the terminal reports no width; silent otherwise."""

from __future__ import annotations

import io
import os

import torch

from llm_heatmap.analyses.heads.measure import stream_head_metrics
from llm_heatmap.analyses.runs.progress import RunProgress, progress_bar, progress_shown, terminal_size


def test_bar_is_silent_unless_shown():
    stream = io.StringIO()
    with progress_bar(3, "work", file=stream) as bar:
        bar.update(3)
    assert stream.getvalue() == ""
    with progress_shown(True):
        with progress_bar(3, "work", file=stream) as bar:
            bar.update(3)
    assert "work" in stream.getvalue() and "/3 " in stream.getvalue()


def test_bar_draws_where_the_terminal_reports_no_width(monkeypatch, tmp_path):
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=(80, 24): os.terminal_size((0, 0)))
    assert terminal_size() == (80, 24)
    stream = io.StringIO()
    paths = [tmp_path / f"{i}.parquet" for i in range(2)]
    with RunProgress(paths, enabled=True, desc="batch", interval=60, file=stream) as progress:
        paths[0].write_text("x")
        progress.refresh()
    assert "batch" in stream.getvalue() and "1/2" in stream.getvalue()


def test_a_streamed_capture_ticks_once_per_layer(tiny_gguf, capsys):
    model, tokenizer, spec = tiny_gguf
    with torch.no_grad():
        stream_head_metrics(model, tokenizer, "the cat sat on the mat", spec=spec)
        assert capsys.readouterr().err == ""
        with progress_shown(True):
            stream_head_metrics(model, tokenizer, "the cat sat on the mat", spec=spec)
    err = capsys.readouterr().err
    assert "capturing" in err and f"/{spec.num_layers} " in err and "layer" in err
