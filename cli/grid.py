"""`llm-heatmap grid`: prompt -> all-heads grid PNG, per-head metrics table and cube file."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from llm_heatmap.errors import InputError

from . import options, overlays, sites
from .run import Steps, emit, load

AUTO_STREAM_GIB = 1  # analyses.measure.AUTO_STREAM_BYTES, without importing torch to build the parser
CUBE_FILE_MB = 256  # a cube file above this is written only with --cube
EXAMPLE = 'example: llm-heatmap grid "the sky is blue" --model minilm-l6 --out heatmaps/ --html'


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "grid", run, summary="draw every attention head for a prompt, with its metrics table and cube",
        description="Capture every attention head of a model for PROMPT and write NAME.png (all-heads grid), "
        "NAME.metrics.csv (one row per head) and NAME.cube.safetensors (re-render with `render`).", example=EXAMPLE)
    options.add_prompt_options(parser)
    options.add_site_options(parser)
    options.add_model_options(parser)
    options.add_output_options(parser)
    options.add_drawing_options(parser)
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="keep one layer at a time; the grid and the saved cube are area-downsampled to "
                        "--max-tokens (default: streams by itself when the full cube would not fit in memory or is "
                        f"above {AUTO_STREAM_GIB} GiB; --no-stream keeps the full cube)")
    parser.add_argument("--cube", action=argparse.BooleanOptionalAction, default=None,
                        help=f"write NAME.cube.safetensors (default: only when it is at most {CUBE_FILE_MB} MiB; the "
                        "summary prints its size either way)")
    parser.add_argument("--cube-dtype", choices=options.DTYPES, default="float32",
                        help="dtype of the captured cube (default float32)")
    parser.add_argument("--qk", action="store_true",
                        help="also keep the queries and keys (in the cube file) and, with --html, show each head's "
                        "query-key map in the interactive view")
    options.add_attention_output_option(parser)
    overlays.add_overlay_options(parser)
    parser.add_argument("--max-cube-mb", type=float,
                        help="refuse a full cube that, with what drawing and measuring it takes, needs more than this "
                        "many MiB (default: 80%% of the memory available)")
    options.add_json_option(parser)


def output_paths(args, name: str) -> dict:
    paths = {"grid": args.out / f"{name}.{args.format}", "metrics": args.out / f"{name}.metrics.csv",
             "cube": args.out / f"{name}.cube.safetensors"}
    if args.html:
        paths["html"] = args.out / f"{name}.html"
    return paths


def cube_file_note(wanted: bool | None, size: int) -> str | None:
    """None when the cube file is to be written (--cube, or by default up to CUBE_FILE_MB), else the line
    saying why it was not, with its size."""
    from llm_heatmap.probes.memory import size_text

    if wanted is False:
        return f"cube file not written (--no-cube; it would be {size_text(size)})"
    if wanted is None and size > CUBE_FILE_MB * 2**20:
        return (f"cube file not written: it would be {size_text(size)}, above {CUBE_FILE_MB} MiB; pass --cube to "
                "write it (or --stream for a downsampled one)")
    return None


def run(args) -> int:
    from llm_heatmap.models.files import claim_outputs

    options.check_site_options(args)
    overlays.check_overlay_flags(args)
    prompt = options.read_prompt(args, optional=bool(args.image or args.audio))
    _, layers, heads = options.grid_style(args)  # the drawing options checked before anything loads
    options.check_model_indices(args.model, layers, heads)
    if args.qk and args.stream:
        raise InputError("--qk keeps every query and key, which --stream does not; drop one of them.")
    if args.qk:
        args.stream = False  # queries and keys need the full cube
    name = options.plain_name(args.name) or options.base_name(args, prompt) + options.drawing_suffix(args)
    if args.site or args.image or args.audio or args.target is not None:  # the files are named per site
        sites.check_single_site_flags(args)
        if args.site and sites.planned_before_loading(args):  # one site named: its files claimed before the load
            outputs = site_outputs(args, prompt, name, [args.site])
            with claim_outputs(outputs.files(), force=args.force):
                return _run(args, prompt, None, name, outputs)
        return _run(args, prompt, None, name)
    paths = output_paths(args, name)
    with claim_outputs(paths.values(), force=args.force):
        return _run(args, prompt, paths, name)


@dataclass
class SiteOutputs:
    """The files of a run over sites: per forward pass (its name and image), per site a grid, table and cube,
    and one page per forward pass with --html."""

    planned: list  # (run name, image or None)
    paths: dict  # (run name, site) -> output_paths
    pages: dict  # run name -> NAME.html

    def files(self) -> list:
        return [p for group in self.paths.values() for p in group.values()] + list(self.pages.values())


def site_outputs(args, prompt: str | None, name: str, chosen: list[str], *, one_pass: bool = False) -> SiteOutputs:
    planned = sites.runs(args, prompt, name, one_pass=one_pass)
    paths = {(run_name, site): output_paths(args, f"{run_name}.{site}") for run_name, _ in planned for site in chosen}
    for site_paths in paths.values():
        site_paths.pop("html", None)  # one page per run, with a site switch
    pages = {run_name: args.out / f"{run_name}.html" for run_name, _ in planned} if args.html else {}
    return SiteOutputs(planned, paths, pages)


def _run(args, prompt: str | None, paths: dict | None, name: str, outputs: SiteOutputs | None = None) -> int:
    # imported after the checks above, so that a bad prompt or output path can fail before torch loads
    import torch

    from llm_heatmap.analyses.heads.digest import digest_lines
    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.analyses.heads.measure import measure_prompt
    from llm_heatmap.probes import CaptureOptions
    from llm_heatmap.analyses.runs.table_files import write_table
    from llm_heatmap.models import parse_dtype
    from llm_heatmap.probes.memory import size_text
    from llm_heatmap.viz import save_grid, write_html
    from llm_heatmap.viz.grid import grid_needs

    style, layers, heads = options.grid_style(args)
    max_bytes = options.max_bytes(args.max_cube_mb)
    step = Steps(args, ["loading model", "capturing", "drawing grid", "writing metrics and cube"]
                 + (["writing HTML"] if args.html else []))
    step("loading model")
    model, tokenizer, spec = load(args)
    from llm_heatmap.models import site_specs

    specs = site_specs(model)
    if paths is None or sites.wants_sites(args, specs):
        return _run_sites(args, model, tokenizer, specs, prompt, name, step, outputs)
    drawn_layers, drawn_heads = len(layers or range(spec.num_layers)), len(heads or range(spec.num_heads))
    step("capturing")
    with torch.no_grad():
        cube, metrics = measure_prompt(
            model, tokenizer, spec, prompt, stream=args.stream, max_tokens=args.max_tokens, chat=args.chat,
            source=str(args.model), weighting=style.weighting,
            also_needs=lambda tokens: grid_needs(drawn_layers, drawn_heads, tokens, style),
            capture=CaptureOptions(layers=layers, heads=heads, dtype=parse_dtype(args.cube_dtype), max_bytes=max_bytes,
                                   queries_and_keys=args.qk, compute_output=options.compute_output(args)))
    step("drawing grid")
    with atomic_output(paths["grid"], force=args.force) as temp:
        save_grid(cube, temp, style, layers=layers, heads=heads)
    step("writing metrics and cube")
    write_table(metrics, paths["metrics"], force=args.force)
    cube_size = cube.pattern.numel() * cube.pattern.element_size()
    cube_note = cube_file_note(args.cube, cube_size)
    if cube_note is None:
        with atomic_output(paths["cube"], force=args.force) as temp:
            cube.save(temp)
        cube_note = f"cube file {size_text(paths['cube'].stat().st_size)}"
    else:
        del paths["cube"]
    if "html" in paths:
        step("writing HTML")
        from llm_heatmap.analyses.maps.qk_maps import layer_maps

        maps = layer_maps(cube) if args.qk else None
        with atomic_output(paths["html"], force=args.force) as temp:
            write_html(cube, temp, metrics=metrics, style=style, qk_maps=maps)
    step.close()
    digest = (digest_lines(metrics, spec) if len(metrics) else
              [f"no metrics: they need a query that attends to at least 2 tokens, and the prompt has {cube.num_tokens}; "
               f"{paths['metrics'].name} holds the columns only"])
    num_tokens = cube.num_tokens
    drawn = f" (drawn downsampled to {cube.num_keys} x {cube.num_keys} per head)" if cube.pooling else ""
    lines = [f"{args.model}: {spec.summary}",
             f"{num_tokens} tokens{drawn}; wrote " + ", ".join(str(p) for p in paths.values()), cube_note, *digest]
    payload = {"spec": spec.summary, "tokens": num_tokens, "files": {k: str(v) for k, v in paths.items()},
               "cube": cube_note, "digest": digest}
    emit(args, lines, payload)
    return 0


def _run_sites(args, model, tokenizer, specs: dict, prompt: str | None, name: str, step,
               outputs: SiteOutputs | None) -> int:
    """One grid, table, cube (and HTML) per site and per image: NAME.SITE.png, NAME.SITE.metrics.csv, ...
    (`outputs`: already claimed for the one site of --site)."""
    from contextlib import ExitStack

    from llm_heatmap.analyses.heads.measure import site_metrics
    from llm_heatmap.analyses.runs.table_files import write_table
    from llm_heatmap.models.files import atomic_output, claim_outputs
    from llm_heatmap.viz import save_grid, sites_view

    chosen = sites.chosen_sites(args, model, specs)
    style, layers, heads = options.grid_style(args)
    claimed = outputs is not None
    outputs = outputs or site_outputs(args, prompt, name, chosen, one_pass=sites.one_pass(model))
    planned, paths, pages = outputs.planned, outputs.paths, outputs.pages
    image_sites = overlays.image_sites(args, model, chosen) if args.overlay is not None else []
    # the overlays of each pass: per image (and tile) of the pictures its processor makes, named before the capture
    overlay_plans = {run_name: overlays.plan(args, model, specs, prompt, run_name, image, image_sites)
                     for run_name, image in planned if image_sites}
    sites.check_single_site_flags(args)
    lines, files = [f"{args.model}: " + "; ".join(f"{site} {specs[site].summary}" for site in chosen)], {}
    # the site files may be claimed before the load (--site); the overlays' names need the model's sites
    unclaimed = [p for _, drawn in overlay_plans.values() for pairs in drawn.values() for _, group in pairs
                 for p in group.values()] + ([] if claimed else outputs.files())
    with ExitStack() as held:
        held.enter_context(claim_outputs(unclaimed, force=args.force))
        for run_name, image in planned:
            step("capturing")
            cubes = sites.capture_cubes(args, model, tokenizer, specs, chosen, prompt, image)
            pictures, drawings = overlay_plans.get(run_name, (None, {}))
            drawn = overlays.drawn_sites(args, cubes, image_sites, {site: [drawing for drawing, _ in pairs]
                                                                    for site, pairs in drawings.items()}) if image_sites else []
            step("drawing grid")
            tables = {}
            for site, cube in cubes.items():
                site_paths = paths[(run_name, site)]
                if cube.batched and len(cube) > 1:  # a tower that ran the pass's pictures as a batch: a grid each
                    site_paths = paths[(run_name, site)] = {
                        **sequence_grids(args, model, specs, prompt, run_name, site, image, cube, held),
                        **{k: v for k, v in site_paths.items() if k != "grid"}}
                for key, drawn_cube in _grids(cube, site_paths):
                    with atomic_output(site_paths[key], force=args.force) as temp:
                        save_grid(drawn_cube, temp, style, layers=layers, heads=heads)
                metrics = site_metrics(cube)
                write_table(metrics, site_paths["metrics"], force=args.force)
                with atomic_output(site_paths["cube"], force=args.force) as temp:
                    cube.save(temp)
                tables[site] = metrics
                shape = "x".join(str(n) for n in cube.pattern.shape[-2:])
                lines.append(f"{site}: {shape} per head; wrote " + ", ".join(str(p) for p in site_paths.values()))
                files[f"{run_name}.{site}"] = {k: str(v) for k, v in site_paths.items()}
                for drawing, drawing_paths in drawings.get(site, []) if site in drawn else []:
                    lines += overlays.write_overlays(args, cubes, site, pictures, drawing, drawing_paths)
                    part = f".{drawing.part}" if drawing.part else ""
                    files[f"{run_name}.{site}"].update({k + part: str(v) for k, v in drawing_paths.items()})
            if run_name in pages:
                step("writing HTML")
                with atomic_output(pages[run_name], force=args.force) as temp:
                    views, view_tables = _page_views(cubes, tables, {site: paths[(run_name, site)] for site in cubes})
                    sites_view(views, image=image, metrics=view_tables, style=style).save(temp)
                lines.append(f"wrote {pages[run_name]} (the sites' views, one page with a site switch)")
                files[f"{run_name}.html"] = str(pages[run_name])
    step.close()
    emit(args, lines, {"sites": {site: specs[site].summary for site in chosen}, "files": files})
    return 0


def sequence_grids(args, model, specs: dict, prompt, run_name: str, site: str, image, cube, held) -> dict:
    """grid.PART -> RUN.SITE.PART.png for each sequence of a tower that ran the pictures of the pass as a batch
    (LLaVA's images, Idefics3's tiles: PART names its picture as the overlays do), claimed in `held`."""
    from llm_heatmap.models.files import claim_outputs

    pictures = sites.processed(args, model, specs, prompt, image)
    files = [Path(path).name for path in args.image] if isinstance(image, list) else [""]
    parts = [drawing.part for drawing in overlays.drawings(site, pictures, files)]
    if len(parts) != len(cube):
        raise InputError(f"site {site} ran {len(cube)} sequences, but the processor made {len(parts)} pictures, so "
                         "they cannot be named; draw another site with --site.")
    paths = {f"grid.{part}": args.out / f"{run_name}.{site}.{part}.{args.format}" for part in parts}
    held.enter_context(claim_outputs(paths.values(), force=args.force))
    return paths


def _grids(cube, site_paths: dict):
    """(path key, cube) of each grid of a site: its one sequence, or each sequence of a batch (`sequence_grids`)."""
    keys = [key for key in site_paths if key.startswith("grid")]
    return [(key, cube.item(index) if cube.batched else cube) for index, key in enumerate(keys)]


def _page_views(cubes, tables: dict, site_paths: dict) -> tuple[dict, dict]:
    """(view name -> cube, view name -> table) of a pass's page: each site, a tower that ran the pictures as a batch
    one view per sequence ("vision image0", named as its grid)."""
    views, view_tables = {}, {}
    for site, cube in cubes.items():
        if not (cube.batched and len(cube) > 1):
            views[site], view_tables[site] = cube, tables[site]
            continue
        parts = [key.removeprefix("grid.") for key in site_paths[site] if key.startswith("grid.")]
        for index, part in enumerate(parts):
            table = tables[site]
            views[f"{site} {part}"] = cube.item(index)
            view_tables[f"{site} {part}"] = table[table["sequence"] == index].drop(columns="sequence")
    return views, view_tables
