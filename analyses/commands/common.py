"""Options and steps that several subcommands share: model choice, prompt input, output files."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from llm_heatmap.models import DEFAULT_MODEL, InputError, load_model


def add_model_options(parser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"offline model name, local directory, .gguf file or hub id (default: {DEFAULT_MODEL})")
    group.add_argument("--quantize", choices=["4bit", "8bit"], help="load quantized with bitsandbytes")
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="weights dtype (default float32)")
    group.add_argument("--device", help="device or accelerate device_map, e.g. cpu, cuda, auto")
    group.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with a hub model to run")


def add_prompt_options(parser, *, required: bool = True) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt text")
    parser.add_argument("--prompt-file", type=Path, help="read the prompt from this file instead")
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (instruct models)")


def add_output_options(parser, *, default_out: str = "heatmaps") -> None:
    parser.add_argument("--out", type=Path, default=Path(default_out), help=f"output directory (default: ./{default_out}/)")
    parser.add_argument("--name", help="base name of the output files (default: from the model and prompt)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")


def read_prompt(args) -> str:
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise InputError("give the prompt either as an argument or with --prompt-file, not both.")
        try:
            prompt = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"prompt file {args.prompt_file} cannot be read ({error}); pass a readable UTF-8 text file.") from None
        prompt = prompt.strip("\n")
    else:
        prompt = args.prompt
    if prompt is None or not prompt.strip():
        raise InputError("the prompt is empty; pass some text as PROMPT or with --prompt-file.")
    return prompt


def progress_printer(args):
    """A function printing progress lines to stderr, or None when quiet or not on a terminal."""
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
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
    return words[:limit].rstrip("-") or "prompt"


def base_name(args, prompt: str) -> str:
    return args.name or f"{slug(Path(str(args.model)).stem, 24)}_{slug(prompt)}"
