"""Options and steps that several subcommands share: model choice, prompt input, output files."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from llm_heatmap.errors import InputError
from llm_heatmap.models import DEFAULT_MODEL, load_model

from ..prompts import check_prompt, read_prompt_text


def add_model_options(parser, *, several: bool = False) -> None:
    """--model (repeatable when `several`; then None means the default model) and how to load it."""
    group = parser.add_argument_group("model")
    source = "offline model name, local directory, .gguf file or hub id"
    if several:
        group.add_argument("--model", action="append", help=f"{source}; repeat for several (default: {DEFAULT_MODEL})")
    else:
        group.add_argument("--model", default=DEFAULT_MODEL, help=f"{source} (default: {DEFAULT_MODEL})")
    group.add_argument("--quantize", choices=["4bit", "8bit"], help="load quantized with bitsandbytes")
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="weights dtype (default float32)")
    group.add_argument("--device", help="device or accelerate device_map, e.g. cpu, cuda, auto")
    group.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with a hub model to run")


def add_prompt_options(parser, *, required: bool = True) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt text")
    parser.add_argument("--prompt-file", type=Path, help="read the prompt from this file instead")
    add_chat_option(parser)


def add_chat_option(parser) -> None:
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (instruct models)")


def add_quiet_option(parser) -> None:
    """--quiet after the subcommand; SUPPRESS keeps `llm-heatmap --quiet grid ...` working as well."""
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output on stderr")


def add_output_options(parser, *, default_out: str = "heatmaps") -> None:
    parser.add_argument("--out", type=Path, default=Path(default_out), help=f"output directory (default: ./{default_out}/)")
    parser.add_argument("--name", help="base name of the output files (default: from the model and prompt)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    add_quiet_option(parser)


def read_prompt(args) -> str:
    """The prompt from PROMPT or --prompt-file (exactly one of them), never empty."""
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise InputError("give the prompt either as an argument or with --prompt-file, not both.")
        return read_prompt_text(args.prompt_file)
    if args.prompt is None:
        raise InputError("the prompt is empty; pass some text as PROMPT or with --prompt-file.")
    return check_prompt(args.prompt)


def progress_off(args) -> bool:
    """Progress output goes to stderr only on a terminal and without --quiet."""
    return bool(getattr(args, "quiet", False)) or not sys.stderr.isatty()


class Steps:
    """A progress bar over the named steps of a command: `step(name)` starts the next one."""

    def __init__(self, args, names: list[str]):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), file=sys.stderr, leave=False, disable=progress_off(args),
                        bar_format="{desc} {bar:20} {n}/{total}")
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_description_str(name)

    def close(self) -> None:
        self.bar.update()
        self.bar.close()


def progress_printer(args):
    """A function printing progress lines to stderr, or None when quiet or not on a terminal."""
    if progress_off(args):
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
        return None
    return lambda message: print(message, file=sys.stderr)


def load(args):
    """(model, tokenizer, spec) for the model options in `args`."""
    return load_model(args.model, dtype=args.dtype, device_map=args.device, quantize=args.quantize,
                      trust_remote_code=args.trust_remote_code, progress=progress_printer(args))


def slug(text: str, limit: int = 40) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    if len(words) > limit:
        cut = words[:limit + 1]
        words = cut[:cut.rfind("-")] if "-" in cut else words[:limit]
    return words.rstrip("-") or "prompt"


def base_name(args, prompt: str) -> str:
    return args.name or f"{slug(Path(str(args.model)).stem, 24)}_{slug(prompt)}"


def parse_indices(text: str | None, what: str) -> list[int] | None:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]."""
    if text is None:
        return None
    values = []
    try:
        for piece in text.split(","):
            start, _, stop = piece.strip().partition("-")
            values.extend(range(int(start), int(stop) + 1) if stop else [int(start)])
    except ValueError:
        raise InputError(f"--{what} '{text}' is not a list of indices; write it like 0,2,5-7.") from None
    return values


def parse_size(text: str | None):
    if text is None:
        return None
    width, _, height = text.lower().partition("x")
    try:
        return (int(width), int(height)) if height else int(width)
    except ValueError:
        raise InputError(f"--size '{text}' is not a pixel size; write WIDTH or WIDTHxHEIGHT, e.g. 4000x6000.") from None


def add_grid_options(parser) -> None:
    group = parser.add_argument_group("drawing")
    group.add_argument("--format", choices=["png", "svg", "pdf"], default="png", help="grid file format (default png)")
    group.add_argument("--scale", choices=["auto", "linear", "log", "power", "row"], default="auto",
                       help="colour scale (default auto: linear, or log where long prompts are downsampled)")
    group.add_argument("--gamma", type=float, default=0.5, help="exponent of --scale power (default 0.5)")
    group.add_argument("--sink", choices=["keep", "exclude", "mask"], default="exclude",
                       help="first-token column: keep it in the colour range, exclude it from the range (default), or mask it")
    group.add_argument("--per-head-range", action="store_true", help="one colour range per head")
    group.add_argument("--background", choices=["white", "transparent"], default="white")
    group.add_argument("--cmap", default="viridis", help="any matplotlib colormap (default viridis)")
    group.add_argument("--cell-px", type=int, help="pixels per token cell")
    group.add_argument("--size", help="target pixel size: WIDTH or WIDTHxHEIGHT")
    group.add_argument("--layers", help="layers to draw, e.g. 0,2,5-7 (default all)")
    group.add_argument("--heads", help="heads to draw, e.g. 0-3 (default all)")
    group.add_argument("--max-tokens", type=int, default=256,
                       help="panels longer than this are area-downsampled (default 256)")
    group.add_argument("--html", action="store_true", help="also write the interactive HTML view")


def grid_style(args):
    """(GridStyle, layers, heads) from the drawing options."""
    from llm_heatmap.viz import GridStyle

    style = GridStyle(scale=args.scale, gamma=args.gamma, sink=args.sink, per_head_range=args.per_head_range,
                      background=args.background, cmap=args.cmap, cell_px=args.cell_px, size=parse_size(args.size),
                      max_tokens=args.max_tokens)
    return style, parse_indices(args.layers, "layers"), parse_indices(args.heads, "heads")
