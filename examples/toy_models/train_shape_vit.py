"""Train the toy ViT shipped in `shape-vit/`: a 2-layer ViT that says where a bright square is in a noisy picture.

Each 32 x 32 picture is dark noise with one bright 6 x 6 square at a random place; the label is the cell of the
4 x 4 patch grid (8 x 8 pixels a patch) that holds the square's centre, one of 16 classes. The answer is known,
so the attention that must carry it is too: the [CLS] token has to find the square's patches. `tests/test_toy_vit.py`
checks on the shipped weights that it does (its [CLS] attention lands on the square's patches) and that it
solves the task. Run `python examples/toy_models/train_shape_vit.py` to train it again (under a minute on two
CPU cores, fixed seed); `example.png` beside the weights is one picture of the task.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

SIZE, PATCH, SQUARE = 32, 8, 6
GRID = SIZE // PATCH
OUT = Path(__file__).parent / "shape-vit"


def pictures(generator: torch.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels `"b 3 h w"` in [0, 1], labels (the centre's cell, row-major), the squares' top-left corners `"b 2"`)."""
    pixels = torch.rand(count, 1, SIZE, SIZE, generator=generator) * 0.35
    corners = torch.randint(0, SIZE - SQUARE + 1, (count, 2), generator=generator)
    for picture, (top, left) in zip(pixels, corners.tolist()):
        picture[:, top:top + SQUARE, left:left + SQUARE] = 0.8 + 0.2 * torch.rand(1, SQUARE, SQUARE, generator=generator)
    centres = (corners + SQUARE // 2) // PATCH
    return pixels.expand(-1, 3, -1, -1).contiguous(), centres[:, 0] * GRID + centres[:, 1], corners


def square_patches(corner: tuple[int, int]) -> torch.Tensor:
    """bool `[GRID * GRID]`: the patches (row-major) that the square with this top-left corner overlaps."""
    top, left = corner
    rows = range(top // PATCH, (top + SQUARE - 1) // PATCH + 1)
    cols = range(left // PATCH, (left + SQUARE - 1) // PATCH + 1)
    covered = torch.zeros(GRID * GRID, dtype=torch.bool)
    for r in rows:
        for c in cols:
            covered[r * GRID + c] = True
    return covered


def processor() -> ViTImageProcessorPil:
    """Pixels in [0, 1] pass unchanged apart from the standard (x - 0.5) / 0.5 the model was trained on."""
    return ViTImageProcessorPil(do_resize=True, size={"height": SIZE, "width": SIZE}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def config() -> ViTConfig:
    return ViTConfig(image_size=SIZE, patch_size=PATCH, num_channels=3, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=GRID * GRID)


def train(steps: int = 1200, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ViTForImageClassification(config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        pixels, labels, _ = pictures(generator, 64)
        loss = model(pixel_values=(pixels - 0.5) / 0.5, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")
    return model.eval()


def main() -> None:
    from PIL import Image

    model = train()
    OUT.mkdir(exist_ok=True)
    model.save_pretrained(OUT)
    processor().save_pretrained(OUT)
    pixels, labels, _ = pictures(torch.Generator().manual_seed(1234), 1)
    Image.fromarray((pixels[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(OUT / "example.png")
    print(f"wrote {OUT} (example.png: the square's centre is in cell {int(labels[0])})")


if __name__ == "__main__":
    main()
