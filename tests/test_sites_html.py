"""The HTML view of a multi-site capture: one page whose selector switches between the sites' views, the
image shown above a vision site, hover naming query and key tokens (target over source for cross-attention,
patch row and column for a vision tower); the notebook display of `SiteCubes` is the same page."""

from __future__ import annotations

import html
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from llm_heatmap.probes import capture_sites
from llm_heatmap.viz import sites_view

from rendered import open_rendered

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy_models"
sys.path.insert(0, str(TOY))
from train_digit_reverser import BOS, EOS, digit_tokenizer, tokens  # noqa: E402

VISION = dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=32)


def reverser_cubes():
    model = transformers.BartForConditionalGeneration.from_pretrained(TOY / "digit-reverser").eval()
    source, target = torch.tensor([tokens("271") + [EOS]]), torch.tensor([[BOS] + tokens("17")])
    with torch.no_grad(), capture_sites(model) as probe:
        model(input_ids=source, decoder_input_ids=target)
    return probe.cubes(source, decoder_input_ids=target, tokenizer=digit_tokenizer())


def vit_cubes():
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**VISION)).eval()
    with torch.no_grad(), capture_sites(model) as probe:
        model(pixel_values=torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    return probe.cubes()


def frames(page: str) -> dict[str, str]:
    return {site: html.unescape(doc) for site, doc in
            re.findall(r'<iframe data-site="([^"]+)"[^>]*srcdoc="([^"]*)"', page)}


def test_one_page_holds_every_site_and_the_notebook_shows_it():
    cubes = reverser_cubes()
    page = sites_view(cubes).page
    assert list(frames(page)) == ["encoder", "decoder", "cross"]
    assert re.findall(r'<option value="([^"]+)"', page) == ["encoder", "decoder", "cross"]
    assert 'srcdoc="' in cubes._repr_html_() and "site-select" in html.unescape(cubes._repr_html_())


def wait_for(driver, script: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := driver.execute_script(script)):
        assert time.monotonic() < deadline, f"never true: {script}; {driver.get_log('browser')}"
        time.sleep(0.02)
    return value


def hover_labels(driver, frame, query: int, key: int) -> tuple[str, str]:
    """Open layer 0 head 0 of the site shown in `frame` and hover cell (query, key): the readout's tokens."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.switch_to.frame(frame)
    try:
        wait_for(driver, "return document.body && document.body.dataset.ready === '1'")
        driver.find_element(By.CSS_SELECTOR, '#grid td[data-layer="0"][data-head="0"] canvas').click()
        canvas = driver.find_element(By.ID, "z-canvas")
        cell = driver.execute_script("return arguments[0].getBoundingClientRect().width", canvas) / \
            len(driver.execute_script("return Array.from(document.querySelectorAll('#z-cols div'))"))
        ActionChains(driver).move_to_element_with_offset(
            canvas, int((key + 0.5) * cell - canvas.size["width"] / 2),
            int((query + 0.5) * cell - canvas.size["height"] / 2)).perform()
        wait_for(driver, f"return document.getElementById('z-readout').dataset.query === '{query}'")
        codes = driver.find_elements(By.CSS_SELECTOR, "#z-readout code")
        return codes[0].text, codes[1].text
    finally:
        driver.switch_to.default_content()


def test_browser_site_switch_hover_and_image(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    path = sites_view(reverser_cubes()).save(tmp_path / "reverser.html")
    open_rendered(browser, path)
    assert browser.execute_script("return document.body.dataset.site") == "encoder"
    Select(browser.find_element(By.ID, "site-select")).select_by_value("cross")
    assert browser.execute_script("return document.body.dataset.site") == "cross"
    shown = [f for f in browser.find_elements(By.CSS_SELECTOR, "#site-frames iframe") if f.is_displayed()]
    assert [f.get_attribute("data-site") for f in shown] == ["cross"]
    assert not browser.find_element(By.ID, "site-image").is_displayed()
    assert hover_labels(browser, shown[0], 2, 0) == ("7", "2")  # target "7" (row 2) over source "2" (key 0)

    picture = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype("uint8"))
    path = sites_view(vit_cubes(), image=picture).save(tmp_path / "vit.html")
    open_rendered(browser, path)
    assert browser.find_element(By.CSS_SELECTOR, "#site-image img").is_displayed()
    (frame,) = [f for f in browser.find_elements(By.CSS_SELECTOR, "#site-frames iframe") if f.is_displayed()]
    assert hover_labels(browser, frame, 0, 4) == ("[CLS]", "r1,c1")
