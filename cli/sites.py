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


def runs(args, prompt: str | None, name: str = "", *, one_pass: bool = False) -> list[tuple[str, object]]:
    """(run name: `name` and a suffix, image) of each forward pass: without --image one (named after --audio's file
    where there is no prompt); with one --image one; with several, one pass over all of them (`one_pass`: a VLM
    reads them in one sequence; the image is then the list) or one per --image, named after the image."""
    images = args.image or []
    if getattr(args, "audio", None) is not None and not prompt:
        return [(name + f"_{options.slug(Path(args.audio).stem, 24)}", None)]
    if not images:
        return [(name, None)]
    pictures = [options.read_image(path) for path in images]
    if len(images) == 1:
        return [(name + ("" if prompt else f"_{options.slug(Path(images[0]).stem, 24)}"), pictures[0])]
    if one_pass:
        return [(name, pictures)]
    return [(f"{name}_{options.slug(Path(path).stem, 24)}", picture) for path, picture in zip(images, pictures)]


def planned_before_loading(args) -> bool:
    """Whether the forward passes are known before the model loads: at most one --image (several are one pass of
    a VLM but one pass each of a vision model or a dual encoder, `one_pass`)."""
    return len(args.image or []) <= 1


def one_pass(model) -> bool:
    """Whether several --image go into one forward pass: a VLM reads its images as tokens of one sequence."""
    from llm_heatmap.models.inputs import reads_images_in_text

    return reads_images_in_text(model)


def one_picture(args, command: str):
    """The one --image of a command that reads one image per forward pass (None without --image)."""
    if args.image and len(args.image) > 1:
        raise InputError(f"--image is given {len(args.image)} times, and {command} reads one image; give one.")
    return options.read_image(args.image[0]) if args.image else None


def capture_cubes(args, model, tokenizer, specs: dict, sites: list[str], prompt: str | None, image, **capture_options):
    """The `SiteCubes` of one forward pass over `prompt`, `image` (a picture, or a VLM's list of them) and --target
    (`capture_options`: `capture`'s)."""
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
    cubes = probe.cubes(inputs.get("input_ids"), decoder_input_ids=inputs.get("decoder_input_ids"),
                        attention_mask=inputs.get("attention_mask"), tokenizer=tokenizer,
                        prompt=prompt, source=str(args.model))
    if isinstance(image, list):
        check_images_apart(cubes, len(image), getattr(processor, "image_token", None))
    return cubes


def check_images_apart(cubes, count: int, image_token: str | None) -> None:
    """Each of `count` images is one image on the language model's axis, or one sentence: images whose tokens
    follow each other with nothing between them run together."""
    for site, cube in cubes.items():
        axis = cube.key_axis
        if axis is not None and axis.kind == "mixed" and len(axis.grids) != count:
            between = f" (e.g. \"{image_token} a cat {image_token} a dog\")" if image_token else ""
            raise InputError(f"{count} images were given, but the image tokens on site {site}'s axis form "
                             f"{len(axis.grids)} runs, so its images cannot be told apart; put text between the "
                             f"images' tokens in the prompt{between}.")


def processed(args, model, specs: dict, prompt: str | None, image) -> list[list]:
    """The pictures the model's processor makes of `image` (a picture or a list), as the model sees them (resized,
    cropped), per image: `[image][tile]` (`models.processed_images.pictures_per_image`); the inputs are checked
    first, as `capture_cubes` checks them."""
    from llm_heatmap.models.inputs import check_site_inputs
    from llm_heatmap.models.loading import load_processor
    from llm_heatmap.models.processed_images import pictures_per_image

    processor = load_processor(args.model, trust_remote_code=args.trust_remote_code)
    check_site_inputs(model, processor, specs, prompt=prompt, image=image, target=args.target)
    return pictures_per_image(processor, image if isinstance(image, list) else [image])


def check_single_site_flags(args) -> None:
    """--stream, --qk and --chat keep to the one-site capture of a text model."""
    if getattr(args, "stream", None) or getattr(args, "qk", False) or getattr(args, "chat", False):
        raise InputError("--stream, --qk and --chat work on the one site of a text model; drop them with --site, "
                         "--image, --audio, --target or a model with several sites.")
