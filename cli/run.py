"""Steps that commands share while they run: loading the model, showing progress, printing the summary."""

from __future__ import annotations

import json
import sys

from llm_heatmap.errors import InputError


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


def load(args, source: str | None = None, device: str | None = None):
    """(model, tokenizer, spec) for `source` (default --model) with the loading options of `args`;
    `device` (a launched rank's GPU) stands in for --device."""
    from llm_heatmap.models import load_model
    from llm_heatmap.stall import stall_point

    stall_point("model-loading")
    return load_model(args.model if source is None else source, dtype=args.dtype, device_map=device or args.device,
                      quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                      progress=progress_printer(args))


def launched(args):
    """The ranks of a torchrun / accelerate launch run (one process: rank 0 of 1). Ranks other than 0
    stay quiet; one model per process means --device cannot spread a model over several devices."""
    from llm_heatmap.analyses.runs.ranks import launcher_ranks, launcher_world_size

    world_size = launcher_world_size()
    if world_size > 1 and args.device not in (None, "cpu"):
        raise InputError(f"--device {args.device} cannot be combined with a launcher's {world_size} processes: each "
                         "process loads its own copy of the model on the GPU of its LOCAL_RANK; drop --device, "
                         "or run one process.")
    ranks = launcher_ranks()
    if not ranks.is_main:
        args.quiet = True
    return ranks


class Steps:
    """A progress bar over the named steps of a command: `step(name)` starts the next one."""

    def __init__(self, args, names: list[str]):
        from llm_heatmap.analyses.runs.progress import progress_bar

        self.bar = progress_bar(len(names), "", enabled=not progress_off(args))
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
