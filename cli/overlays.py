"""`grid --image PATH --overlay QUERY`: beside each image site's grid, every head's attention from QUERY drawn over
the picture (NAME.SITE.overlay.png) and the layer mean with the rollout after each layer (NAME.SITE.rollout.png).

A site draws overlays when its keys are image patches: a vision tower (a ViT's one stack) or a VLM's language
model. QUERY is `cls` (the first special position: a vision tower's [CLS]), `last` (the last position) or a
position. Without --site, `cls` is drawn on the image sites that have a CLS (LLaVA: its tower, not its language
model); a position must be a row of every image site."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    a model that reads images, Idefics3's `text`); --site naming another is refused."""
    from llm_heatmap.models.inputs import reads_images_in_text
    from llm_heatmap.models.loading import reads_images
    from llm_heatmap.models.sites import SELF, TEXT, VISION

    found = [site for site in chosen if site == VISION or (site == SELF and reads_images(model.config))
             or (site == TEXT and reads_images_in_text(model))]
    if not found:
        raise InputError(f"--overlay needs a site whose keys are image patches, and {', '.join(chosen)} of "
                         f"{args.model} has none; choose a vision site or a VLM's language model with --site.")
    return found


@dataclass(frozen=True)
class Drawing:
    """One overlay pair (NAME.SITE[.PART].overlay.png and .rollout.png) of a site: over image `image` of the pass,
    its tiles side by side (`tile` None) or its picture `tile`; `picture` is where that picture is in the
    processor's pictures of the pass, in order (a tower that ran them as a batch: its sequence)."""

    part: str  # the file name's part: "" (the pass's one picture), "image1", "image0.global", "image0.tile3"
    words: str  # the title's: "image 1 (dog.png)", "tile 3"
    image: int
    tile: int | None
    picture: int


def drawings(site: str, pictures: list[list], files: list[str]) -> list[Drawing]:
    """The drawings of `site` over the pictures of one pass (`[image][tile]`, `sites.processed`; `files` the
    images' names): one per image; an image split into tiles is drawn on a language model with its tiles side by
    side, then its global view (its last picture), and on the tower (which runs each tile alone) tile by tile."""
    from llm_heatmap.models.sites import VISION

    several, found, flat = len(pictures) > 1, [], 0
    for image, tiles in enumerate(pictures):
        part, words = (f"image{image}", f"image {image} ({files[image]})") if several else ("", "")
        last = len(tiles) - 1
        if len(tiles) == 1:
            found.append(Drawing(part, words, image, None, flat))
        elif site == VISION:
            found += [Drawing(_part(part, f"tile{tile}"), _words(words, f"tile {tile}" + (" (global)" if tile == last else "")),
                              image, tile, flat + tile) for tile in range(len(tiles))]
        else:
            found += [Drawing(part, _words(words, "its tiles side by side"), image, None, flat),
                      Drawing(_part(part, "global"), _words(words, "its global view"), image, last, flat + last)]
        flat += len(tiles)
    return found


def _part(*names: str) -> str:
    return ".".join(name for name in names if name)


def _words(*words: str) -> str:
    return ", ".join(word for word in words if word)


def plan(args, model, specs: dict, prompt: str | None, run_name: str, image, sites: list[str]) -> tuple[list[list], dict]:
    """(the pictures of a pass over `prompt` and `image` (a picture or a VLM's list), site -> [(drawing, its two
    paths)])."""
    from pathlib import Path

    from . import sites as site_runs

    pictures = site_runs.processed(args, model, specs, prompt, image)
    files = [Path(path).name for path in args.image] if isinstance(image, list) else [""]
    return pictures, {site: [(drawing, output_paths(args, run_name, site, drawing))
                             for drawing in drawings(site, pictures, files)] for site in sites}


def output_paths(args, run_name: str, site: str, drawing: Drawing) -> dict:
    part = f".{drawing.part}" if drawing.part else ""
    return {"overlay": args.out / f"{run_name}.{site}{part}.overlay.{args.format}",
            "rollout": args.out / f"{run_name}.{site}{part}.rollout.{args.format}"}


def _drawn_cube(cube, drawing: Drawing):
    """(the cube of `drawing`'s sequence, the image and tile to draw on its axis): a tower that ran the pass's
    pictures as a batch holds each as its own sequence, image 0 of its axis."""
    if not cube.batched:
        return cube, drawing.image, drawing.tile
    return cube.item(drawing.picture), 0, None


def drawn_sites(args, cubes, sites: list[str], drawn: dict) -> list[str]:
    """The image sites this QUERY is drawn on (module docstring), or one sentence saying why none or not all;
    `drawn`: site -> its `drawings`."""
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
        cube = cubes[site]
        if cube.batched and len(cube) != max(d.picture for d in drawn[site]) + 1:
            raise InputError(f"--overlay on site {site}: its tower ran {len(cube)} sequences, but the processor made "
                             f"{max(d.picture for d in drawn[site]) + 1} pictures, so they cannot be matched; draw "
                             "another site with --site.")
        try:
            for drawing in drawn[site]:
                resolve_query(_drawn_cube(cube, drawing)[0], args.overlay)
        except InputError as error:
            other = "" if args.site else " (or draw another site alone with --site)"
            raise InputError(f"--overlay {args.overlay} on site {site}: {str(error).rstrip('.')}{other}.") from None
    return sites


def write_overlays(args, cubes, site: str, pictures: list[list], drawing: Drawing, paths: dict) -> list[str]:
    """Draw the two overlay figures of `drawing` on `site` over its processed picture; returns the summary line."""
    from llm_heatmap.analyses.maps.image_maps import head_image_maps, layer_image_maps
    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.viz.labels import model_name
    from llm_heatmap.viz.overlays import plot_layer_overlays, plot_overlays
    from llm_heatmap.viz.saving import save_deterministic

    cube, image, tile = _drawn_cube(cubes[site], drawing)
    picture = _picture(cube, pictures, drawing) if not cubes[site].batched else \
        [p for tiles in pictures for p in tiles][drawing.picture]
    _, layers, heads = options.grid_style(args)
    where = f", {drawing.words}" if drawing.words else ""
    drawing_options = dict(upsample=args.overlay_upsample, scale=args.overlay_scale,
                           context=f"{model_name(args.model)} {site}{where}: ")
    chosen = cube.select(layers=layers, heads=heads) if layers or heads else cube
    maps = head_image_maps(chosen, args.overlay, image=image, tile=tile)
    mean, rolled = layer_image_maps(cube, args.overlay, image=image, tile=tile)
    if cubes[site].batched:  # the sequence's one picture is image `drawing.image` of the pass
        maps, mean, rolled = (replace(one, image=drawing.image) for one in (maps, mean, rolled))
    for key, figure in (("overlay", plot_overlays(maps, picture, **drawing_options)),
                        ("rollout", plot_layer_overlays(mean, rolled, picture, **drawing_options))):
        with atomic_output(paths[key], force=args.force) as temp:
            save_deterministic(figure, temp, figure.dpi)
    return [f"{site}: overlays of query {maps.query} ({maps.query_label}){where}; wrote {paths['overlay']}, "
            f"{paths['rollout']}"]


def _picture(cube, pictures: list[list], drawing: Drawing):
    """The picture `drawing` is drawn over: the image's one picture, its tile, or its tiles side by side where
    the axis puts them (`Axis.tile_names`: "rI,cJ")."""
    from llm_heatmap.models.processed_images import side_by_side

    tiles = pictures[drawing.image]
    if drawing.tile is not None or len(tiles) == 1:
        return tiles[drawing.tile or 0]
    names = {tile: name for (image, tile), name in cube.key_axis.tile_names().items() if image == drawing.image}
    cells = [tuple(int(v) for v in names[tile][1:].split(",c")) for tile in range(len(tiles) - 1)]
    return side_by_side(tiles[:-1], cells)
