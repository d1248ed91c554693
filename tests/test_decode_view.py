"""decode_view: the embedded rows decode (independently of the page's script) to the steps' rows, and in the browser
a click on a generated token selects its step, colours the text before it by the chosen head and draws every head."""

from __future__ import annotations

import base64
import json
import re
import time

import numpy as np
import pytest
import torch

from llm_heatmap.errors import InputError
from llm_heatmap.probes.decode import capture_decode
from llm_heatmap.viz.decode import decode_view
from test_decode import IdTokenizer, prompt
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def steps():
    model, ids = tiny_model("qwen2"), prompt()
    with torch.no_grad():
        return capture_decode(model, IdTokenizer(ids), "p", max_new_tokens=5, do_sample=False)


def embedded(page: str) -> tuple[dict, np.ndarray]:
    meta = json.loads(re.search(r'<script id="dv-meta" type="application/json">(.*?)</script>', page, re.S).group(1))
    data = re.search(r'<script id="dv-data" type="application/octet-stream">(.*?)</script>', page, re.S).group(1)
    return meta, np.frombuffer(base64.b64decode(data), dtype=np.uint8)


def test_the_embedded_rows_are_the_steps_rows(steps):
    meta, data = embedded(decode_view(steps).page)
    layers, heads = len(steps.layers), len(steps.heads)
    assert meta["steps"] == 5 and meta["promptTokens"] == steps.prompt_tokens and len(meta["tokens"]) == len(steps.sequence)
    scales = np.array(meta["scales"]).reshape(5, layers, heads)
    at = 0
    for step, row in enumerate(steps.rows):
        keys = steps.prompt_tokens + step
        block = data[at:at + layers * heads * keys].reshape(layers, heads, keys) / 255 * scales[step][..., None]
        at += layers * heads * keys
        np.testing.assert_allclose(block, row.numpy(), atol=scales[step].max() / 255 / 2 + 1e-7)
    assert at == len(data)


def test_a_notebook_shows_the_view_inline(steps):
    shown = steps._repr_html_()
    assert shown.startswith("<iframe srcdoc=") and "dv-data" in shown


def test_a_page_too_large_is_refused(steps, monkeypatch):
    monkeypatch.setattr("llm_heatmap.viz.decode.MAX_PAGE_MB", 1e-6)
    with pytest.raises(InputError, match="fewer layers or heads"):
        decode_view(steps)


def test_browser_click_a_generated_token_selects_its_step(browser, steps, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    path = decode_view(steps).save(tmp_path / "decode.html")
    browser.get(path.as_uri())

    def wait_for(script: str):
        deadline = time.monotonic() + 30
        while not browser.execute_script(script):
            assert time.monotonic() < deadline, f"never true: {script}"
            time.sleep(0.05)

    wait_for("return document.body.dataset.ready === '1'")
    generated = browser.find_elements(By.CSS_SELECTOR, "#dv-text span.generated")
    assert len(generated) == 5
    generated[3].click()
    wait_for("return document.body.dataset.drawn === '3'")
    Select(browser.find_element(By.ID, "dv-layer")).select_by_index(1)
    Select(browser.find_element(By.ID, "dv-head")).select_by_value("2")
    keys = steps.prompt_tokens + 3
    colours = browser.execute_script(
        "return Array.from(document.querySelectorAll('#dv-text span')).map(s => s.style.background)")
    row = steps.rows[3][1, 2]
    hottest = int(row.argmax())
    assert colours[hottest] == "rgb(255, 135, 25)"  # the head's largest weight gets the full heat colour
    assert all(c == "" for c in colours[keys:])  # the written token and what follows are not coloured
    current = browser.find_element(By.CSS_SELECTOR, "#dv-text span.current")
    assert int(current.get_attribute("data-position")) == keys
    size = browser.execute_script("const c = document.getElementById('dv-grid'); return [c.width, c.height]")
    assert size[1] > len(steps.layers) * len(steps.heads)
