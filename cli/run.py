"""Steps that commands share while they run: loading the model, showing progress, printing the summary."""

from __future__ import annotations

import json
import sys


def progress_off(args) -> bool:
    """Progress output goes to stderr only on a terminal and without --quiet."""
    return bool(getattr(args, "quiet", False)) or not sys.stderr.isatty()


def progress_printer(args):
    """A function printing progress lines to stderr, or None when quiet or not on a terminal."""
    if progress_off(args):
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
        return None
    return lambda message: print(message, file=sys.stderr)


def load(args, source: str | None = None):
    """(model, tokenizer, spec) for `source` (default --model) with the loading options of `args`."""
    from llm_heatmap.models import load_model

    return load_model(args.model if source is None else source, dtype=args.dtype, device_map=args.device,
                      quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                      progress=progress_printer(args))


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


def emit(args, text_lines: list[str], payload: dict) -> None:
    """Print the summary: `payload` as JSON with --json, otherwise the text lines."""
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print("\n".join(text_lines))
    sys.stdout.flush()
