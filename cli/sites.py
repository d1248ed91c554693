"""What `grid` and `metrics` do for a model with several attention sites, or when --site, --image or --target
is given: one forward pass per input (`models.inputs.site_inputs`), one cube per site (`capture_sites`), and
per site a set of files whose names carry the site (NAME.cross.png, NAME.cross.metrics.csv, ...)."""

from __future__ import annotations

from pathlib import Path

from llm_heatmap.errors import InputError

from . import options


def wants_sites(args, specs: dict) -> bool:
    """Whether this run goes through the sites: asked for by a flag, or the model has more than one kind of
    attention (anything but a single self-attention stack)."""
    return bool(args.site or args.image or getattr(args, "audio", None) or args.target is not None) \
        or set(specs) != {"self"}


def one_site(args, model, specs: dict, command: str) -> str:
    """The one site a command that draws one site reads: --site, or the model's only site."""
    if args.site is None and len(specs) > 1:
        raise InputError(f"{args.model} has several attention sites ({', '.join(specs)}) and {command} reads one; "
                         f"pass --site (e.g. --site {next(iter(specs))}).")
    return chosen_sites(args, model, specs)[0]


def chosen_sites(args, model, specs: dict) -> list[str]:
    """--site (checked against the model's sites) or every site of the model."""
    if args.site is None:
        return list(specs)
    if args.site not in specs:
        raise InputError(f"--site {args.site} is not a site of {args.model} ({type(model).__name__}); its sites are "
                         f"{', '.join(specs)}.")
    return [args.site]


def runs(args, prompt: str | None, name: str = "") -> list[tuple[str, object]]:
    """(run name: `name` and a suffix, image) of each forward pass: one per --image (named after the image where
    there are several), or one without an image (named after --audio's file where there is no prompt)."""
    images = args.image or []
    if getattr(args, "audio", None) is not None and not prompt:
        return [(name + f"_{options.slug(Path(args.audio).stem, 24)}", None)]
    if not images:
        return [(name, None)]
    pictures = [options.read_image(path) for path in images]
    if len(images) == 1:
        return [(name + ("" if prompt else f"_{options.slug(Path(images[0]).stem, 24)}"), pictures[0])]
    return [(f"{name}_{options.slug(Path(path).stem, 24)}", picture) for path, picture in zip(images, pictures)]


def one_picture(args, command: str):
    """The one --image of a command that reads one image per forward pass (None without --image)."""
    if args.image and len(args.image) > 1:
        raise InputError(f"--image is given {len(args.image)} times, and {command} reads one image; give one.")
    return options.read_image(args.image[0]) if args.image else None


def capture_cubes(args, model, tokenizer, specs: dict, sites: list[str], prompt: str | None, image, **capture_options):
    """The `SiteCubes` of one forward pass over `prompt`, `image` and --target (`capture_options`: `capture`'s)."""
    import torch

    from llm_heatmap.models.audio import load_feature_extractor, read_wav, reads_audio
    from llm_heatmap.models.inputs import site_inputs
    from llm_heatmap.models.loading import load_processor
    from llm_heatmap.probes import capture_sites

    audio = read_wav(args.audio) if getattr(args, "audio", None) is not None else None
    processor = load_processor(args.model, trust_remote_code=args.trust_remote_code) if image is not None else \
        load_feature_extractor(args.model, trust_remote_code=args.trust_remote_code) if reads_audio(model) else None
    inputs = site_inputs(model, tokenizer, processor, specs, prompt=prompt, image=image, target=args.target,
                         audio=audio)
    inputs = {key: value.to(model.device) if hasattr(value, "to") else value for key, value in inputs.items()}
    with torch.no_grad(), capture_sites(model, sites=sites, **capture_options) as probe:
        model(**inputs)
    return probe.cubes(inputs.get("input_ids"), decoder_input_ids=inputs.get("decoder_input_ids"),
                       attention_mask=inputs.get("attention_mask"), tokenizer=tokenizer, prompt=prompt,
                       source=str(args.model))


def processed(args, image) -> list:
    """The pictures the model's processor makes of `image`, as the model sees them (resized, cropped)."""
    from llm_heatmap.models.loading import load_processor
    from llm_heatmap.models.processed_images import processed_pictures

    return processed_pictures(load_processor(args.model, trust_remote_code=args.trust_remote_code), image)


def multiple_images_check(args, specs: dict) -> None:
    """A VLM's capture holds one sequence, so one image; a vision model or a dual encoder runs once per image."""
    if args.image and len(args.image) > 1 and "vision" in specs and len(set(specs) - {"vision", "text"}):
        raise InputError(f"--image is given {len(args.image)} times, but {args.model} reads its image inside one "
                         "sequence of text, and a capture holds one sequence; give one --image per run.")


def check_single_site_flags(args) -> None:
    """--stream, --qk and --chat keep to the one-site capture of a text model."""
    if getattr(args, "stream", None) or getattr(args, "qk", False) or getattr(args, "chat", False):
        raise InputError("--stream, --qk and --chat work on the one site of a text model; drop them with --site, "
                         "--image, --target or a model with several sites.")
