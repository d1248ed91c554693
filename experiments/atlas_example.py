"""The README's atlas example: the shipped length-matched prompts on SmolLM2 and MiniLM, and a screenshot.

    python -m experiments.atlas_example --out atlas-example --png docs/atlas.png

Runs `llm-heatmap atlas experiments/data/length_matched_pairs.jsonl --model smollm2-135m --model
minilm-l6 --out OUT` (one thread, so the numbers repeat), then opens OUT/atlas.html in headless
Chromium, colours the heads by `--color` (a column of the heads table), clicks SmolLM2's head
`--head` (layer, head) in the depth strip, ranks its top prompts by `--rank-by` and saves the
window as PNG. Needs selenium and Debian's chromium and chromedriver (`make browser`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llm_heatmap.errors import InputError

from tests.browser import headless_chromium

from .prompt_sets import data_path

STRIP_CELL, STRIP_HEIGHT = 14, 300  # viz/assets/atlas.js: CELL, STRIP_PX


def screenshot(page: Path, png: Path, *, color: str, head: tuple[int, int], rank_by: str, num_layers: int) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    with headless_chromium(1680, 1050) as driver:
        driver.get(page.resolve().as_uri())
        deadline = time.monotonic() + 60
        while driver.execute_script("return document.body && document.body.dataset.ready") != "1":
            if time.monotonic() > deadline:
                raise InputError(f"{page} did not finish rendering in Chromium within a minute.")
            time.sleep(0.1)
        Select(driver.find_element(By.ID, "color-by")).select_by_value(color)
        Select(driver.find_element(By.ID, "rank-by")).select_by_value(rank_by)
        strip = driver.find_elements(By.CSS_SELECTOR, "#depth-row canvas.hit")[0]
        layer, index = head
        x = (index + 0.5) * STRIP_CELL - strip.size["width"] / 2
        y = (layer + 0.5) / num_layers * STRIP_HEIGHT - strip.size["height"] / 2
        ActionChains(driver).move_to_element_with_offset(strip, x, y).click().perform()
        ActionChains(driver).move_to_element(driver.find_element(By.ID, "title")).perform()  # no tooltip in the picture
        png.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(png))


def main(argv=None) -> int:
    from llm_heatmap.cli import main as cli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("atlas-example"))
    parser.add_argument("--png", type=Path, default=Path("docs/atlas.png"))
    parser.add_argument("--color", default="sink_score_no_q0_mean")
    parser.add_argument("--head", default="16,0", help="SmolLM2 layer,head to select (default 16,0)")
    parser.add_argument("--rank-by", default="previous_token_score")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    code = cli(["atlas", str(data_path("length_matched_pairs.jsonl")), "--model", "smollm2-135m", "--model",
                "minilm-l6", "--out", str(args.out), "--resume"])
    if code:
        return code
    layer, head = (int(x) for x in args.head.split(","))
    screenshot(args.out / "atlas.html", args.png, color=args.color, head=(layer, head), rank_by=args.rank_by,
               num_layers=30)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
