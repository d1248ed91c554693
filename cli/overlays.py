"""`grid --image PATH --overlay QUERY`: beside each image site's grid, every head's attention from QUERY drawn over
the picture (NAME.SITE.overlay.png) and the layer mean with the rollout after each layer (NAME.SITE.rollout.png).

A site draws overlays when its keys are image patches: a vision tower (a ViT's one stack) or a VLM's language
model. QUERY is `cls` (the first special position: a vision tower's [CLS]), `last` (the last position) or a
position. Without --site, `cls` is drawn on the image sites that have a CLS (LLaVA: its tower, not its language
model); a position must be a row of every image site."""

from __future__ import annotations

from llm_heatmap.errors import InputError

from . import options

UPSAMPLING = ("bilinear", "nearest")  # viz.overlays.UPSAMPLING, without importing torch to build the parser
SCALES = ("panel", "shared")  # viz.overlays.SCALES


def add_overlay_options(parser) -> None:
    group = parser.add_argument_group("image overlays (with --image)")
    group.add_argument("--overlay", metavar="QUERY",
                       help="also draw every head's attention from QUERY over the image (NAME.SITE.overlay.png) and "
                       "the layer mean and rollout (NAME.SITE.rollout.png): cls (the [CLS] token), last (the last "
                       "position) or a position")
    group.add_argument("--overlay-upsample", choices=UPSAMPLING, default="bilinear",
                       help="how patch values fill the picture (default bilinear; nearest: one block per patch)")
    group.add_argument("--overlay-scale", choices=SCALES, default="panel",
                       help="panel: each panel scaled to its maximum (default); shared: one range and a colorbar")


def parse_query(text: str):
    """"cls", "last" or a non-negative position."""
    word = text.strip().lower()
    if word in ("cls", "last"):
        return word
    if word.isdigit():
        return int(word)
    raise InputError(f"--overlay {text} is not cls, last or a position; give one of those (a position is a whole "
                     "number from 0).")


def check_overlay_flags(args) -> None:
    """Before the model loads: QUERY read (`args.overlay` becomes "cls", "last" or an int); an overlay needs an image."""
    if args.overlay is None:
        return
    args.overlay = parse_query(args.overlay)
    if not args.image:
        raise InputError("--overlay draws attention over an image, but no --image was given; give --image PATH.")


def image_sites(args, model, chosen: list[str]) -> list[str]:
    """The chosen sites whose keys can be image patches (a vision tower; the one stack or the language model of
    a model that reads images); --site naming another is refused."""
    from llm_heatmap.models.loading import reads_images
    from llm_heatmap.models.sites import SELF, VISION

    found = [site for site in chosen if site == VISION or (site == SELF and reads_images(model.config))]
    if not found:
        raise InputError(f"--overlay needs a site whose keys are image patches, and {', '.join(chosen)} of "
                         f"{args.model} has none; choose a vision site or a VLM's language model with --site.")
    return found


def output_paths(args, run_name: str, site: str) -> dict:
    return {"overlay": args.out / f"{run_name}.{site}.overlay.{args.format}",
            "rollout": args.out / f"{run_name}.{site}.rollout.{args.format}"}


def drawn_sites(args, cubes, sites: list[str]) -> list[str]:
    """The image sites this QUERY is drawn on (module docstring), or one sentence saying why none or not all."""
    from llm_heatmap.analyses.maps.image_maps import resolve_query

    def has_patches(site):
        axis = cubes[site].key_axis
        return axis is not None and bool(axis.is_image.any())

    sites = [site for site in sites if has_patches(site)]
    if not sites:
        raise InputError(f"--overlay needs a site whose keys are image patches, and no captured site of {args.model} "
                         "has them; give a vision model or a VLM with its image.")
    if args.overlay == "cls" and args.site is None:
        with_cls = [site for site in sites if cubes[site].query_axis.special]
        if not with_cls:
            raise InputError(f"--overlay cls needs a [CLS] token, and no image site of {args.model} has one "
                             f"({', '.join(sites)}); give a position or last.")
        sites = with_cls
    for site in sites:
        try:
            resolve_query(cubes[site], args.overlay)
        except InputError as error:
            other = "" if args.site else " (or draw another site alone with --site)"
            raise InputError(f"--overlay {args.overlay} on site {site}: {str(error).rstrip('.')}{other}.") from None
    return sites


def write_overlays(args, cubes, site: str, processed, paths: dict) -> list[str]:
    """Draw the two overlay figures of `site` on the processed picture; returns the summary line."""
    from llm_heatmap.analyses.maps.image_maps import head_image_maps, layer_image_maps
    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.viz.labels import model_name
    from llm_heatmap.viz.overlays import plot_layer_overlays, plot_overlays
    from llm_heatmap.viz.saving import save_deterministic

    cube = cubes[site]
    _, layers, heads = options.grid_style(args)
    picture = processed[0]  # one image per capture: image 0 of the site's axis
    drawing = dict(upsample=args.overlay_upsample, scale=args.overlay_scale, context=f"{model_name(args.model)} {site}: ")
    maps = head_image_maps(cube.select(layers=layers, heads=heads) if layers or heads else cube, args.overlay)
    mean, rolled = layer_image_maps(cube, args.overlay)
    for key, figure in (("overlay", plot_overlays(maps, picture, **drawing)),
                        ("rollout", plot_layer_overlays(mean, rolled, picture, **drawing))):
        with atomic_output(paths[key], force=args.force) as temp:
            save_deterministic(figure, temp, figure.dpi)
    return [f"{site}: overlays of query {maps.query} ({maps.query_label}); wrote {paths['overlay']}, {paths['rollout']}"]
