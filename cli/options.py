"""Every flag that several commands share, declared once here, and the functions that read them back.

Nothing imported at module level may import torch, transformers or matplotlib: `--help` and argument
errors must not. The choices come from where the library defines them (`llm_heatmap.choices`,
`analyses.bounds`), both light.
"""

from __future__ import annotations

import argparse
import re
import shutil
import textwrap
from pathlib import Path

from llm_heatmap.choices import ATTENTION_OUTPUTS, BACKGROUNDS, DTYPES, PROJECTIONS, QUANTIZE, SCALES, SINK_MODES, SITES, WEIGHTINGS  # noqa: F401
from llm_heatmap.errors import InputError
from llm_heatmap.models.offline import DEFAULT_MODEL
from llm_heatmap.analyses.bounds import HEAD_MEASURES, MAX_INDEX, MEASURES, PSEUDO_GROUP_SIZE, check_needle_grid
from llm_heatmap.viz.style import MAX_PIXELS


def add_command(subparsers, name: str, run, *, summary: str, description: str, example: str):
    """The parser of one command that does `run(args)`: `summary` in the list of commands; in its --help,
    `description` wrapped to the terminal, then `example` as written."""
    width = min(shutil.get_terminal_size().columns - 2, 100)
    parser = subparsers.add_parser(name, help=summary, description=f"{textwrap.fill(description, width)}\n\n{example}",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(run=run)
    return parser


def add_quiet_option(parser) -> None:
    """--quiet on the main parser and after each command; SUPPRESS keeps a value given before the command."""
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output on stderr")


def add_force_option(parser, help: str = "overwrite existing output files") -> None:
    parser.add_argument("--force", action="store_true", help=help)


def add_json_option(parser, help: str = "print the summary as JSON") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_run_options(parser) -> None:
    """--force, --json and --quiet: what every command that writes files and prints a summary takes."""
    add_force_option(parser)
    add_json_option(parser)
    add_quiet_option(parser)


def add_attention_output_option(parser) -> None:
    parser.add_argument("--attention-output", choices=ATTENTION_OUTPUTS, default="auto",
                        help="who computes each layer's attention output while the pattern is captured: 'computed' "
                        "(the capture's own softmax blocks times the values: attention once, equal to the model's "
                        "kernel within fp32 rounding), 'model' (the model's kernel untouched: bit-identical output), "
                        "'auto' (computed when streaming, else the model's kernel)")


def compute_output(args) -> bool | None:
    """The capture's `compute_output` for --attention-output."""
    return {"auto": None, "computed": True, "model": False}[args.attention_output]


def add_loading_options(parser) -> None:
    """How to load a model: quantization, dtype, device and remote code."""
    parser.add_argument("--quantize", choices=QUANTIZE, help="load quantized with bitsandbytes")
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default float32)")
    parser.add_argument("--device", help="device or accelerate device_map, e.g. cpu, cuda, auto")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with a hub model to run")


def add_model_options(parser, *, several: bool = False) -> None:
    """--model (repeatable when `several`; then None means the default model) and how to load it."""
    group = parser.add_argument_group("model")
    source = "offline model name, local directory, .gguf file or hub id"
    if several:
        group.add_argument("--model", action="append", help=f"{source}; repeat for several (default: {DEFAULT_MODEL})")
    else:
        group.add_argument("--model", default=DEFAULT_MODEL, action=_OneModel,
                           help=f"{source} (default: {DEFAULT_MODEL}); one model (atlas and kv-similarity take several)")
    add_loading_options(group)


class _OneModel(argparse.Action):
    """--model of a command that runs one model: given twice is refused (it used to keep the last silently)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if getattr(namespace, "_model_given", False):
            raise InputError("--model is given twice, but this command runs one model; run it once per model, or "
                             "use atlas or kv-similarity, which take several.")
        namespace._model_given = True
        setattr(namespace, self.dest, value)


def add_chat_option(parser) -> None:
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (instruct models)")


def add_prompt_file_option(parser, help: str = "read the prompt from this file instead (the whole file is one prompt)") -> None:
    parser.add_argument("--prompt-file", type=Path, help=help)


def table_or_folder(out: Path, name: str, kind: str) -> Path:
    """Where a command's table goes: --out is a folder (NAME.KIND.csv inside it); an --out with a file
    extension that is not an existing folder is the table's own path (the older spelling, still accepted)."""
    if out.suffix and not out.is_dir():
        return out  # a file: its extension is checked as a table format (.xlsx is refused, not made a folder)
    return out / f"{name}.{kind}.csv"


def add_prompt_options(parser) -> None:
    """PROMPT or --prompt-file, and --chat."""
    parser.add_argument("prompt", nargs="?", help="the prompt text")
    add_prompt_file_option(parser)
    add_chat_option(parser)


def add_site_option(parser, what: str = "one set of files per site") -> None:
    parser.add_argument("--site", help=f"the attention site to capture, one of {', '.join(SITES)} (default: every "
                        f"site of the model, {what})")


def add_site_options(parser) -> None:
    """--site, --image and --target: which attention site, and the inputs of vision, VLM and encoder-decoder models."""
    group = parser.add_argument_group("sites and inputs")
    add_site_option(group)
    group.add_argument("--image", type=Path, action="append", metavar="PATH",
                       help="an image for a vision model or VLM, prepared by the model's own processor (repeat for "
                       "several: a vision model or CLIP gets one capture per image)")
    group.add_argument("--audio", type=Path, metavar="WAV",
                       help="a speech model's recording (Whisper): a PCM WAV file at the sample rate of the model's "
                       "feature extractor, no longer than its window; no PROMPT then (--target gives the decoder's text)")
    group.add_argument("--target", metavar="TEXT",
                       help="an encoder-decoder model's decoder input (PROMPT is the source); default: what the model "
                       "generates greedily from the source")


def check_site_options(args) -> None:
    """--site, --image, --audio and --target checked before a model loads: a site name that exists somewhere,
    images that open, a WAV file that reads, a target that is not empty."""
    site = getattr(args, "site", None)
    if site is not None and site not in SITES:
        raise InputError(f"--site {site!r} is not an attention site; the sites are {', '.join(SITES)}.")
    for path in getattr(args, "image", None) or []:
        read_image(path)
    if getattr(args, "audio", None) is not None:
        if getattr(args, "image", None):
            raise InputError("--audio and --image go to different models (a speech model, a vision model); give one.")
        from llm_heatmap.models.audio import read_wav

        read_wav(args.audio)
    target = getattr(args, "target", None)
    if target is not None and not target.strip():
        raise InputError("--target is empty; give the decoder's text, or drop --target to let the model generate it.")


def read_image(path: Path):
    """The RGB image at `path`, or one sentence saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"--image {path} does not exist; give the path of a PNG or JPEG file.") from None
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"--image {path} cannot be read as an image ({type(error).__name__}); give a PNG or JPEG "
                         "file.") from None


def add_output_options(parser, *, default_out: str = "heatmaps") -> None:
    """An output directory and base name for commands that write several files, with --force and --quiet."""
    parser.add_argument("--out", type=Path, default=Path(default_out), help=f"output directory (default: ./{default_out}/)")
    parser.add_argument("--name", help="base name of the output files (default: from the model and prompt)")
    add_force_option(parser)
    add_quiet_option(parser)


def add_metric_option(parser) -> None:
    parser.add_argument("--metric", action="append", metavar="NAME",
                        help="keep only this metric column (repeat, or separate names with commas); default: all")


def add_permutation_options(parser, *, default: int, help: str) -> None:
    """--permutations (`help` says what is permuted) and the --seed of the random draws."""
    parser.add_argument("--permutations", type=int, default=default, help=f"{help} (default {default})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def add_bootstrap_options(parser) -> None:
    """--resamples and --confidence of the bootstrap intervals over prompts."""
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the prompts (default 2000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")


def add_prompt_set_options(parser, name: str) -> None:
    """The prompt file (positional `name`), --column, --out, --resume, --shard and --chat of runs over a
    prompt file that keep one part file per prompt in OUT (batch, atlas)."""
    parser.add_argument(name.lower(), type=Path, metavar=name, help="prompt file (.txt, .jsonl, .csv or .parquet)")
    parser.add_argument("--column", default="prompt",
                        help="the field (JSONL) or column (CSV, Parquet) holding the prompts (default: prompt)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--resume", action="store_true", help="keep prompts already done in OUT, compute the rest")
    parser.add_argument("--shard", metavar="i/n", help="only prompts k with k %% n == i (one job of an array)")
    add_chat_option(parser)


def add_pseudo_group_option(parser) -> None:
    parser.add_argument("--pseudo-group-size", type=int,
                        help=f"group size for MHA models (default: the first GQA model's, else {PSEUDO_GROUP_SIZE})")


def add_drawing_options(parser) -> None:
    """The fields of `viz.GridStyle`, the layers and heads to draw, and --html."""
    group = parser.add_argument_group("drawing")
    group.add_argument("--format", choices=["png", "svg", "pdf"], default="png", help="grid file format (default png)")
    group.add_argument("--scale", choices=SCALES, default="auto",
                       help="colour scale (default auto: linear, or log where long prompts are downsampled)")
    group.add_argument("--gamma", type=float, default=0.5, help="exponent of --scale power (default 0.5)")
    group.add_argument("--sink", choices=SINK_MODES, default="exclude",
                       help="first-token column: keep it in the colour range, exclude it from the range (default), or mask it")
    group.add_argument("--per-head-range", action="store_true", help="one colour range per head")
    group.add_argument("--background", choices=BACKGROUNDS, default="white")
    group.add_argument("--cmap", default="viridis", help="any matplotlib colormap (default viridis)")
    group.add_argument("--cell-px", type=int, help="pixels per token cell")
    group.add_argument("--size", help="target pixel size: WIDTH or WIDTHxHEIGHT")
    group.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                       help=f"refuse a grid image of more pixels than this (default {MAX_PIXELS}: 1 GiB as RGBA)")
    group.add_argument("--layers", help="layers to draw, e.g. 0,2,5-7 (default all)")
    group.add_argument("--heads", help="heads to draw, e.g. 0-3 (default all)")
    group.add_argument("--max-tokens", type=int, default=256,
                       help="panels longer than this are area-downsampled (default 256)")
    group.add_argument("--weighting", choices=WEIGHTINGS, default="weights",
                       help="draw attention weights, or the norm-weighted pattern ||alpha v W_O|| (what each key's "
                       "value writes; default weights)")
    group.add_argument("--html", action="store_true", help="also write the interactive HTML view")


def read_prompt(args, optional: bool = False) -> str | None:
    """The prompt from PROMPT or --prompt-file (exactly one of them), never empty; None where it is
    `optional` (an image given) and absent."""
    from llm_heatmap.analyses.runs.prompts import check_prompt, read_prompt_text

    if args.prompt_file is not None:
        if args.prompt is not None:
            raise InputError("give the prompt either as an argument or with --prompt-file, not both.")
        return read_prompt_text(args.prompt_file)
    if args.prompt is None and optional:
        return None
    if args.prompt is None:
        raise InputError("the prompt is empty; pass some text as PROMPT or with --prompt-file.")
    return check_prompt(args.prompt)


def add_retrieval_probe_option(parser) -> None:
    parser.add_argument("--retrieval-probe", metavar="LENGTHS",
                        help="also score every head as a retrieval head on needle-in-a-haystack prompts of these "
                        "comma-separated context lengths in tokens, 5 needle depths each (probe_retrieval_* columns)")


def needle_lengths(value: str | None) -> tuple[int, ...]:
    """The `--retrieval-probe` context lengths, checked before any work; () without the flag."""
    if value is None:
        return ()
    try:
        lengths = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--retrieval-probe {value!r} is not a list of context lengths; write e.g. 250,500.") from None
    return check_needle_grid(lengths, [0.5])[0]


def selected_metrics(args) -> list[str] | None:
    """The `--metric` names, checked before any work; None when all metrics are wanted."""
    if not args.metric:
        return None
    from llm_heatmap.analyses.bounds import metric_choices

    valid = metric_choices(probe=bool(getattr(args, "induction_probe", 0)),
                           retrieval=bool(getattr(args, "retrieval_probe", None)), sites=bool(getattr(args, "site", None)))
    names = [name.strip() for value in args.metric for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise InputError(f"metric '{unknown[0]}' does not exist; valid metrics are: {', '.join(valid)}.")
    return list(dict.fromkeys(names))


def slug(text: str, limit: int = 40) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    if len(words) > limit:
        cut = words[:limit + 1]
        words = cut[:cut.rfind("-")] if "-" in cut else words[:limit]
    return words.rstrip("-") or "prompt"


MAX_NAME = 160  # leaves room for the suffixes and the temporary files' marks within a 255-byte file name


def plain_name(name: str | None) -> str | None:
    """--name as given, refused unless it is a plain file name (the folder is --out's)."""
    if name is None:
        return None
    if name in ("", ".", "..") or "/" in name or "\\" in name or any(ord(c) < 32 for c in name) \
            or len(name.encode()) > MAX_NAME:
        raise InputError(f"--name {name!r} is not a plain file name; give a name without slashes or control "
                         f"characters, other than '.' and '..', of at most {MAX_NAME} bytes (choose the folder with --out).")
    return name


def prompt_hash(*texts) -> str:
    """Six hex digits of sha1 over `texts`: what tells apart prompts whose names would otherwise match."""
    import hashlib

    return hashlib.sha1("\0".join(map(str, texts)).encode()).hexdigest()[:6]


def prompt_slug(prompt: str, limit: int = 40) -> str:
    """The prompt's first words, with a short hash of the whole prompt where they do not say all of it
    (cut, or punctuation, case or spacing dropped), so two prompts never share a name."""
    words = slug(prompt, limit)
    plain = " ".join(prompt.split()).lower().replace(" ", "-")
    return words if words == plain else f"{words}-{prompt_hash(prompt)}"


def base_name(args, prompt: str) -> str:
    """--name, or one made from the model and the prompt (and --chat, which changes what is captured)."""
    chat = "_chat" if getattr(args, "chat", False) else ""
    model = slug(Path(str(args.model)).stem, 24)
    target = f"_to_{prompt_slug(args.target, 24)}" if getattr(args, "target", None) else ""
    if prompt is None:  # an image or a recording alone: its file's name follows (`cli.sites.runs`)
        return plain_name(args.name) or model + target
    return plain_name(args.name) or f"{model}{chat}_{prompt_slug(prompt)}{target}"


def drawing_suffix(args) -> str:
    """The drawing options that differ from their defaults, as a short part of a default file name
    (".L0-3.H2.log.norms"), so that drawing the same prompt two ways never writes to one name."""
    defaults = {"scale": "auto", "sink": "exclude", "weighting": "weights", "cmap": "viridis", "max_tokens": 256,
                "background": "white"}
    parts = [f"L{args.layers}" if getattr(args, "layers", None) else "", f"H{args.heads}" if getattr(args, "heads", None) else ""]
    for option, default in defaults.items():
        value = getattr(args, option, default)
        if value != default:
            parts.append(f"t{value}" if option == "max_tokens" else str(value))
    if getattr(args, "scale", None) == "power":
        parts.append(f"g{args.gamma:g}")
    if getattr(args, "per_head_range", False):
        parts.append("per-head")
    return "".join("." + re.sub(r"[^A-Za-z0-9_-]+", "-", part) for part in parts if part)


def parse_indices(text: str | None, flag: str) -> list[int] | None:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]; every index and range checked (0 to `MAX_INDEX`, ranges rising)
    before any range is expanded."""
    if text is None:
        return None
    ranges = []
    try:
        for piece in text.split(","):
            start, dash, stop = piece.strip().partition("-")
            ranges.append((int(start), int(stop) if dash else int(start)))
    except ValueError:
        raise InputError(f"{flag} '{text}' is not a list of indices; write it like 0,2,5-7.") from None
    for start, stop in ranges:
        if not 0 <= start <= MAX_INDEX or not 0 <= stop <= MAX_INDEX:
            raise InputError(f"{flag} '{text}' names an index past {MAX_INDEX}; models have fewer layers and heads.")
        if start > stop:
            raise InputError(f"{flag} '{text}' has the range {start}-{stop}, which runs backwards; write it as "
                             f"{stop}-{start}.")
    return [index for start, stop in ranges for index in range(start, stop + 1)]


def parse_size(text: str | None):
    if text is None:
        return None
    width, _, height = text.lower().partition("x")
    try:
        return (int(width), int(height)) if height else int(width)
    except ValueError:
        raise InputError(f"--size '{text}' is not a pixel size; write WIDTH or WIDTHxHEIGHT, e.g. 4000x6000.") from None


def max_bytes(megabytes: float | None) -> int | None:
    """--max-cube-mb in bytes, checked by `probes.memory.check_max_bytes`."""
    if megabytes is None:
        return None
    from llm_heatmap.probes.memory import check_max_bytes

    check_max_bytes(megabytes * 2**20)
    return int(megabytes * 2**20)


def grid_style(args):
    """(GridStyle, layers, heads) from the drawing options."""
    from llm_heatmap.viz import GridStyle

    style = GridStyle(scale=args.scale, gamma=args.gamma, sink=args.sink, per_head_range=args.per_head_range,
                      background=args.background, cmap=args.cmap, cell_px=args.cell_px, size=parse_size(args.size),
                      max_tokens=args.max_tokens, weighting=args.weighting, max_pixels=args.max_pixels)
    return style, parse_indices(args.layers, "--layers"), parse_indices(args.heads, "--heads")


def check_model_indices(model, layers: list[int] | None, heads: list[int] | None,
                        flags: tuple[str, str] = ("--layers", "--heads")) -> None:
    """Layers and heads past `model`'s counts (read from its config, `models.counts`), refused before it loads;
    a model whose config does not say is checked after loading, where the capture refuses them."""
    if not layers and not heads:
        return
    from llm_heatmap.models.counts import attention_counts

    counts = attention_counts(model)
    if counts is None:
        return
    for flag, wanted, count, what in ((flags[0], layers, counts.layers, "layers"), (flags[1], heads, counts.heads, "heads")):
        past = [index for index in wanted or () if index >= count]
        if past:
            raise InputError(f"{flag} names {what[:-1]} {past[0]}, but {model} has {count} {what} "
                             f"(0-{count - 1}); pick indices in that range.")
