"""Every save of the library writes through `models.files.atomic_output`: a file on disk is the old one or
the complete new one, and a save that fails halfway leaves no temporary behind."""

from __future__ import annotations

import pytest

import llm_heatmap as lh


class DiskFull(Exception):
    pass


def half_written(target, *_args, **_kwargs):
    from pathlib import Path

    Path(str(target)).write_bytes(b"half")
    raise DiskFull


def assert_untouched(folder, path):
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in folder.iterdir()) == [path.name], "no temporary file or folder is left"


def test_figure_and_grid_saves_are_atomic(tmp_path, monkeypatch, tiny_gguf):
    import matplotlib.pyplot as plt

    from llm_heatmap.viz import figures, grid

    model, tokenizer, _ = tiny_gguf
    cube = lh.capture_prompt(model, tokenizer, "ab ab ab")
    path = tmp_path / "grid.svg"
    path.write_bytes(b"old")
    monkeypatch.setattr(grid, "save_deterministic", lambda figure, target, dpi: half_written(target))
    with pytest.raises(DiskFull):
        lh.plot_grid(cube).save(path)  # a vector grid goes through matplotlib
    assert_untouched(tmp_path, path)

    figure = plt.figure()
    monkeypatch.setattr(figures, "save_deterministic", lambda fig, target, dpi: half_written(target))
    with pytest.raises(DiskFull):
        figures.save_figure(figure, path)
    plt.close(figure)
    assert_untouched(tmp_path, path)
    monkeypatch.undo()

    png = tmp_path / "grid.png"
    lh.plot_grid(cube).save(png)
    assert png.read_bytes().startswith(b"\x89PNG") and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "grid.svg"]


def test_cube_and_view_saves_are_atomic(tmp_path, monkeypatch, tiny_gguf):
    from llm_heatmap.probes import cube as cube_module

    model, tokenizer, _ = tiny_gguf
    cube = lh.capture_prompt(model, tokenizer, "ab ab ab")
    path = tmp_path / "run.cube.safetensors"
    path.write_bytes(b"old")
    with monkeypatch.context() as patch:
        patch.setattr(cube_module, "save_file", lambda tensors, target, metadata: half_written(target))
        with pytest.raises(DiskFull):
            cube.save(path)
    assert_untouched(tmp_path, path)
    cube.save(path)
    assert lh.AttentionCube.load(path).pattern.equal(cube.pattern)

    view = lh.html_view(cube)
    page = tmp_path / "deeper" / "view.html"
    assert view.save(page) == page and page.read_text(encoding="utf-8") == view.page
    assert sorted(p.name for p in page.parent.iterdir()) == ["view.html"]
