"""All-heads grid: the seed's per-axes seaborn rendering vs `save_grid`, at the same output pixel size.

Run: /work/venv/bin/python benchmarks/bench_grid.py [--quick]

For each cube (all-MiniLM 6x12 and SmolLM2-135M 30x9, eager `output_attentions` of a short prompt)
it times, in one run:
  baseline   the seed's method: plt.subplots(L, H), one sns.heatmap per head, savefig(dpi, tight)
  save_grid  llm_heatmap.viz.save_grid at the baseline PNG's exact pixel size
  encode     PNG encoding alone of the grid's final canvas (an RGBA array of that size), the way a
             general encoder does it (PIL at its defaults) and with save_grid's own encoder
             (viz/png.py, which deflates each repeated row once)
Targets: save_grid >= 50x faster than the baseline, and <= 2x PIL's encoding of the final canvas.
The seed's cost grows with the number of heads, not pixels (seaborn draws the whole figure once per
heatmap to check tick-label overlap), so SmolLM2's 270 heads take minutes at any size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

from llm_heatmap.models import load_model  # noqa: E402
from llm_heatmap.probes import AttentionCube  # noqa: E402
from llm_heatmap.viz import plot_grid, save_grid  # noqa: E402
from llm_heatmap.viz.png import encode_png  # noqa: E402

PROMPTS = {
    "minilm-l6": "Explain the core idea behind quantum entanglement.",
    "smollm2-135m": "Run a self meta-cognitive audit where you are self-aware about being an LLM",
}


def eager_cube(name: str) -> AttentionCube:
    model, tokenizer, spec = load_model(name, attn_implementation="eager")
    encoded = tokenizer(PROMPTS[name], return_tensors="pt")
    with torch.no_grad():
        out = model(**encoded, output_attentions=True)
    ids = encoded["input_ids"][0]
    return AttentionCube.from_pattern(torch.stack(out.attentions, 1)[0].float(), spec, ids,
                                      tokenizer.convert_ids_to_tokens(ids), prompt=PROMPTS[name], source=name)


def seed_baseline(cube: AttentionCube, path: Path, inches_per_head: float, dpi: int) -> None:
    """The seed's approach, with the counts read from the cube instead of typed in."""
    num_layers, num_heads = cube.num_layers, cube.num_heads
    tokens = cube.tokens
    fig, axes = plt.subplots(num_layers, num_heads, figsize=(num_heads * inches_per_head, num_layers * inches_per_head),
                             facecolor="none", squeeze=False)
    fig.suptitle(f"All {num_heads} Attention Heads Across {num_layers} Layers", fontsize=20, y=0.998,
                 bbox=dict(facecolor="none"))
    for layer_idx in range(num_layers):
        for head_idx in range(num_heads):
            ax = axes[layer_idx, head_idx]
            attn = cube.pattern[layer_idx, head_idx].numpy()
            kv_idx = cube.spec.kv_group(head_idx)
            sns.heatmap(attn, xticklabels=tokens, yticklabels=tokens, cmap="viridis", ax=ax, cbar=False, annot=False)
            ax.set_title(f"L{layer_idx + 1} H{head_idx + 1} (KV{kv_idx})", fontsize=10)
            ax.tick_params(axis="both", which="both", length=0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("none")
    plt.tight_layout(rect=[0, 0.01, 1, 0.99])
    plt.savefig(path, format="png", dpi=dpi, transparent=True, bbox_inches="tight")
    plt.close(fig)


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not the reported numbers)")
    parser.add_argument("--models", nargs="+", choices=list(PROMPTS), default=list(PROMPTS), help="which cubes to time")
    args = parser.parse_args()
    # (model, inches per head, dpi): MiniLM at the seed's 300 dpi; SmolLM2 at a dpi that keeps the baseline near a minute
    cases = [("minilm-l6", 3.0, 300), ("smollm2-135m", 3.0, 100)]
    if args.quick:
        cases = [("minilm-l6", 1.0, 100), ("smollm2-135m", 1.0, 40)]
    cases = [case for case in cases if case[0] in args.models]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, inches, dpi in cases:
            cube = eager_cube(name)
            base_path = tmp / f"{name}-seed.png"
            t_base = timed(lambda: seed_baseline(cube, base_path, inches, dpi))
            with PIL.Image.open(base_path) as image:
                size = image.size
            grid_path = tmp / f"{name}-grid.png"
            repeat = 3
            t_grid = timed(lambda: save_grid(cube, grid_path, size=size), repeat)
            with PIL.Image.open(grid_path) as image:
                assert image.size == size, (image.size, size)
                mode = image.mode
                canvas = np.ascontiguousarray(np.asarray(image.convert("RGBA")))
            t_fig = timed(lambda: plot_grid(cube, size=size), repeat)
            t_ours = timed(lambda: encode_png(canvas, tmp / "floor.png"), repeat)
            pil_image = PIL.Image.fromarray(canvas, "RGBA")
            if mode == "RGB":
                pil_image = pil_image.convert("RGB")
            t_pil = timed(lambda: pil_image.save(tmp / "floor.png", format="png"), repeat)
            rows.append((name, f"{cube.num_layers}x{cube.num_heads}", cube.num_keys, f"{size[0]}x{size[1]}", dpi,
                         t_base, t_grid, t_fig, t_ours, t_pil, mode))
            print(f"done {name}", file=sys.stderr, flush=True)
    header = ("model", "grid", "tokens", "PNG px", "seed dpi", "seed s", "save_grid s", "(figure s)",
              "PIL encode s", "encode_png s", "speed-up", "save_grid / PIL encode", "save_grid / encode_png")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    ok = True
    for name, grid, tokens, px, dpi, t_base, t_grid, t_fig, t_ours, t_pil, mode in rows:
        speedup, ratio = t_base / t_grid, t_grid / t_pil
        ok &= speedup >= 50 and ratio <= 2
        print(f"| {name} | {grid} | {tokens} | {px} | {dpi} | {t_base:.2f} | {t_grid:.3f} | {t_fig:.3f} | "
              f"{t_pil:.3f} | {t_ours:.3f} | {speedup:.0f}x | {ratio:.2f} | {t_grid / t_ours:.2f} |")
    print(f"\ntargets (>= 50x the seed, <= 2x PIL's PNG encode): {'met' if ok else 'MISSED'}")
    print("save_grid s: best of 3, whole call (cube -> PNG file); (figure s): plot_grid's Figure alone;"
          " encode: the final canvas alone (RGB where opaque, as save_grid writes it), best of 3, with"
          " PIL's defaults and with save_grid's encoder (viz/png.py).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
