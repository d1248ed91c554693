"""viz.atlas: the atlas page's embedded data decoded in Python, and the page driven in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llm_heatmap.analyses.atlas.run import run_atlas
from llm_heatmap.analyses.runs.prompts import Prompt
from llm_heatmap.errors import InputError
from llm_heatmap.viz.atlas import atlas_view, write_atlas
from llm_heatmap.viz.raster import colormap_bytes
from rendered import open_rendered

ARTIFACTS = Path(__file__).parent / "artifacts"
PROMPTS = [Prompt("a", "the cat sat on the mat", "simple"), Prompt("b", "a b a b a b c a b", "repeat"),
           Prompt("c", "entropy rises; order falls.", None), Prompt("d", "one two three four five", "simple")]


@pytest.fixture(scope="module")
def result(tiny_gguf, tmp_path_factory):
    return run_atlas({"tiny": tiny_gguf}, PROMPTS, tmp_path_factory.mktemp("atlas"), top_k=2, n_resamples=200,
                     n_permutations=50, probe_length=8, quiet=True)


def embedded(page: str) -> dict:
    return json.loads(re.search(r'<script id="atlas-data" type="application/json">(.*?)</script>', page, re.S).group(1))


def b64(text: str, dtype=np.uint8) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def test_embedded_data_decodes_to_the_tables(result):
    inputs = result.page_inputs()
    data = embedded(atlas_view(**inputs).page)
    heads = inputs["heads"].sort_values(["layer", "head"]).reset_index(drop=True)
    model = data["models"][0]
    assert model["name"] == "tiny" and model["heads"]["layer"] == heads["layer"].tolist()
    np.testing.assert_allclose(model["heads"]["x"], heads["map_x"])
    np.testing.assert_allclose(model["values"]["entropy_mean"], heads["entropy_mean"])
    np.testing.assert_allclose(model["values"]["sink_head_rate"], heads["sink_head_rate"])
    assert "probe_induction_score" in data["metrics"] and "pattern_vertical_rate" in data["metrics"]
    # similarity: clustering order, scaled to the off-diagonal range, 8 bits
    order = np.argsort(heads["cluster_rank"].to_numpy())
    assert model["heads"]["order"] == order.tolist()
    similarity = inputs["similarity"]["tiny"][np.ix_(order, order)]
    low, high = model["simRange"]
    decoded = low + b64(model["similarity"]).reshape(8, 8) / 255 * (high - low)
    off = ~np.eye(8, dtype=bool)
    np.testing.assert_allclose(decoded[off], similarity[off], atol=(high - low) / 510 + 1e-12)
    # histograms: every head's values over the prompts, in equal bins of each metric's range
    counts = b64(model["hist"], "<u2").reshape(len(data["histMetrics"]), 8, data["bins"])
    rows = inputs["prompt_heads"]
    metric = data["histMetrics"].index("entropy")
    low, high = data["histEdges"]["entropy"]
    for unit, (layer, head) in enumerate(zip(heads["layer"], heads["head"])):
        values = rows[(rows["layer"] == layer) & (rows["head"] == head)]["entropy"].to_numpy()
        expected = np.bincount(np.clip(((values - low) / (high - low) * data["bins"]).astype(int), 0, data["bins"] - 1),
                               minlength=data["bins"])
        assert counts[metric, unit].tolist() == expected.tolist()
    # top prompts and their pictures
    ids = [p["id"] for p in data["prompts"]]
    top = inputs["top_prompts"]
    for unit, (layer, head) in enumerate(zip(heads["layer"], heads["head"])):
        listed = model["top"]["induction_score"][unit]
        rows = top[(top["layer"] == layer) & (top["head"] == head) & (top["metric"] == "induction_score")]
        assert [ids[p] for p, _, _ in listed] == rows["prompt_id"].tolist()
        for prompt, _, thumb in listed:
            q, k, text = model["thumbs"][thumb]
            np.testing.assert_array_equal(b64(text).reshape(q, k), inputs["thumbnails"]["tiny"][ids[prompt], layer, head])


def test_page_is_self_contained_and_takes_new_columns(result):
    inputs = result.page_inputs()
    inputs["heads"] = inputs["heads"].assign(noop_sink_rate=0.25, noop_sink_low=0.1, noop_sink_high=0.4)
    page = atlas_view(**inputs, title="</script><b>x</b>").page
    assert "<script src" not in page and "<link" not in page and not re.search(r"(src|href)=\"?https?:", page)
    assert "&lt;&#47;script&gt;" in page and "</script><b>" not in page
    assert "noop_sink_rate" in embedded(page)["metrics"]


def test_bad_tables_are_refused(result):
    inputs = result.page_inputs()
    with pytest.raises(InputError, match="heads has no column 'depth'"):
        atlas_view(**{**inputs, "heads": inputs["heads"].drop(columns="depth")})
    with pytest.raises(InputError, match="must be a pandas DataFrame"):
        atlas_view(**{**inputs, "layers": [1, 2]})
    with pytest.raises(InputError, match="not one row and column per head"):
        atlas_view(**{**inputs, "similarity": {"tiny": np.zeros((3, 3))}})
    with pytest.raises(InputError, match="model 'other' of the models table has no rows"):
        atlas_view(**{**inputs, "models": pd.DataFrame({"model": ["other"]})})


# ---- the browser ------------------------------------------------------------------------------------
def pixel(driver, canvas, x: float, y: float) -> list[int]:
    """RGBA of the canvas pixel under CSS position (x, y)."""
    return driver.execute_script("""
        const [c, x, y] = arguments, r = c.width / c.getBoundingClientRect().width;
        return Array.from(c.getContext('2d').getImageData(Math.floor(x * r), Math.floor(y * r), 1, 1).data);""",
        canvas, x, y)


def test_browser_select_colour_and_top_prompts(browser, result, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    path = write_atlas(tmp_path / "atlas.html", **result.page_inputs())
    open_rendered(browser, path)
    heads = result.tables["heads"]
    strip = browser.find_element(By.CSS_SELECTOR, "#depth-row canvas.hit")
    # layer 1 of 2 is the lower half of the strip; head 2 the third column of 14 px
    ActionChains(browser).move_to_element_with_offset(strip, 2 * 14 + 7 - strip.size["width"] / 2, 75).click().perform()
    assert browser.find_element(By.ID, "detail-title").text == "tiny · L1 H2"
    tops = browser.find_elements(By.CSS_SELECTOR, "#top-prompts .top")
    top = result.tables["top_prompts"]
    expected = top[(top["layer"] == 1) & (top["head"] == 2) & (top["metric"] == "diagonal_score")]
    Select(browser.find_element(By.ID, "rank-by")).select_by_value("diagonal_score")
    tops = browser.find_elements(By.CSS_SELECTOR, "#top-prompts .top")
    assert len(tops) == len(expected) == 2
    texts = {p.id: p.text for p in PROMPTS}
    for card, prompt_id in zip(tops, expected["prompt_id"]):
        assert texts[prompt_id] in card.text and card.find_element(By.TAG_NAME, "canvas").size["width"] > 0

    # colour by a metric: the strip cell has the colormap's colour of the head's value in the shared range
    Select(browser.find_element(By.ID, "color-by")).select_by_value("entropy_mean")
    values = heads["entropy_mean"].to_numpy()
    row = heads[(heads["layer"] == 0) & (heads["head"] == 3)].index[0]
    t = (values[row] - values.min()) / (values.max() - values.min())
    expected_rgb = colormap_bytes("viridis")[min(255, int(t * 256)), :3].tolist()
    assert pixel(browser, strip, 3 * 14 + 7, 40)[:3] == expected_rgb
    assert browser.find_element(By.CSS_SELECTOR, "#detail tr.current").text.startswith("entropy (mean)")

    # the map: clicking a point selects that head
    cards = browser.find_elements(By.CSS_SELECTOR, "#cards .card canvas")
    point = browser.execute_script("""
        const m = arguments[0], xs = m.x, ys = m.y, u = 5, px = 260;
        const span = Math.max(Math.max(...xs) - Math.min(...xs), Math.max(...ys) - Math.min(...ys)) || 1;
        const s = (px - 20) / span, cx = (Math.max(...xs) + Math.min(...xs)) / 2, cy = (Math.max(...ys) + Math.min(...ys)) / 2;
        return [px / 2 + (xs[u] - cx) * s, px / 2 - (ys[u] - cy) * s];""", embedded(path.read_text())["models"][0]["heads"])
    ActionChains(browser).move_to_element_with_offset(cards[0], point[0] - 130, point[1] - 130).click().perform()
    assert browser.find_element(By.ID, "detail-title").text == "tiny · L1 H1"
    ActionChains(browser).move_to_element_with_offset(cards[1], -100, 100).perform()
    assert "similarity" in browser.find_element(By.ID, "tip").text
    # issue 21: model colours are not pattern-class colours; the side panel neither scrolls sideways nor cuts
    # metric names
    class_colours = {"rgb(147, 51, 234)", "rgb(220, 38, 38)", "rgb(37, 99, 235)", "rgb(22, 163, 74)", "rgb(163, 167, 174)"}
    names = browser.find_elements(By.CSS_SELECTOR, "#depth-row .strip .name")
    model_colours = {n.value_of_css_property("color") for n in names if n.text.strip()}
    assert model_colours and not model_colours & class_colours
    wide = browser.execute_script("const a = document.querySelector('aside'), r = a.getBoundingClientRect().right;"
                                  "return [...a.querySelectorAll('*')].filter((e) => e.getBoundingClientRect().right > r + 1)"
                                  ".map((e) => e.tagName + '.' + e.className + ' ' + e.getBoundingClientRect().width);")
    assert not wide, wide
    assert browser.execute_script("return [...document.querySelectorAll('#detail td.name')]"
                                  ".every((td) => td.scrollWidth <= td.clientWidth);")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "atlas_page.png"))


CLASS_METRIC = {"vertical+diagonal": "vertical_score", "vertical": "vertical_score", "diagonal": "diagonal_score",
                "block": "block_score"}


def test_browser_opens_on_the_strongest_classified_head_ranked_by_its_class_score(browser, result, tmp_path):
    """Issue 21: the page opens on the head whose pattern class holds on the most prompts (ties: the highest mean
    of its class's score), with "Top prompts by" on that score; the ranking follows the selected head's class
    until the reader picks a metric."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    inputs = result.page_inputs()
    heads = inputs["heads"].copy()  # the tiny random model's heads are all heterogeneous: give three a class
    for row, name, rate in ((2, "diagonal", 1.0), (5, "vertical", 1.0), (6, "block", 0.75)):
        heads.loc[heads.index[row], ["pattern_class", f"pattern_{name}_rate"]] = [name, rate]
    inputs["heads"] = heads
    path = write_atlas(tmp_path / "atlas.html", **inputs)
    open_rendered(browser, path)
    layers = int(embedded(path.read_text())["models"][0]["numLayers"])
    classified = heads[heads["pattern_class"].isin(CLASS_METRIC)].copy()
    classified["rate"] = classified.apply(lambda r: r[f"pattern_{r.pattern_class.replace('+', '_')}_rate"], axis=1)
    classified["score"] = classified.apply(lambda r: r[f"{CLASS_METRIC[r.pattern_class]}_mean"], axis=1)
    best = classified.sort_values(["rate", "score"], ascending=False).iloc[0]
    rank = Select(browser.find_element(By.ID, "rank-by"))
    assert browser.find_element(By.ID, "detail-title").text == f"tiny · L{best['layer']} H{best['head']}"
    assert rank.first_selected_option.get_attribute("value") == CLASS_METRIC[best["pattern_class"]]
    heading = browser.find_element(By.CSS_SELECTOR, "#detail h3").text.lower()
    assert heading == f"top prompts by {CLASS_METRIC[best['pattern_class']].replace('_', ' ')}"

    # another head of another class: the ranking follows it; once the reader picks a metric, it stays
    row = classified[classified["pattern_class"].map(CLASS_METRIC) != CLASS_METRIC[best["pattern_class"]]].iloc[0]
    click_head(browser, row["layer"], row["head"], layers)
    assert rank.first_selected_option.get_attribute("value") == CLASS_METRIC[row["pattern_class"]]
    rank.select_by_value("sink_score")
    click_head(browser, best["layer"], best["head"], layers)
    assert browser.find_element(By.ID, "detail-title").text == f"tiny · L{best['layer']} H{best['head']}"
    assert rank.first_selected_option.get_attribute("value") == "sink_score"


def click_head(browser, layer: int, head: int, layers: int) -> None:
    """Click the cell of (layer, head) in the first depth strip (cells of 14 px; its 300 px split into `layers` rows)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    strip = browser.find_element(By.CSS_SELECTOR, "#depth-row canvas.hit")
    x = head * 14 + 7 - strip.size["width"] / 2
    y = (layer + 0.5) * 300 / layers - strip.size["height"] / 2
    ActionChains(browser).move_to_element_with_offset(strip, x, y).click().perform()
