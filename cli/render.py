"""`llm-heatmap render`: re-draw a saved cube with other options; no model needed."""

from __future__ import annotations

from pathlib import Path

from . import options
from .run import Steps

EXAMPLE = "example: llm-heatmap render heatmaps/run.cube.safetensors --scale log --sink mask --name run-log"


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "render", run, summary="re-draw a saved cube with other drawing options (no model needed)",
        description="Draw the all-heads grid of a cube file written by `grid` (or AttentionCube.save).", example=EXAMPLE)
    parser.add_argument("cube", type=Path, help="a .cube.safetensors file")
    options.add_output_options(parser)
    options.add_drawing_options(parser)


def run(args) -> int:
    from llm_heatmap.models.files import check_cube_path, claim_outputs

    options.grid_style(args)  # the drawing options checked before the cube is read
    name = (options.plain_name(args.name) or args.cube.name.removesuffix(".safetensors").removesuffix(".cube")
            + ".render" + options.drawing_suffix(args))
    paths = [args.out / f"{name}.{args.format}"] + ([args.out / f"{name}.html"] if args.html else [])
    with claim_outputs(paths, force=args.force):
        check_cube_path(args.cube)  # a missing file is refused before torch loads
        return _run(args, paths)


def _run(args, paths: list[Path]) -> int:
    # imported after the checks above, so that a bad output path can fail before torch loads
    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.probes import AttentionCube
    from llm_heatmap.probes.cube_schema import inspect_cube_file
    from llm_heatmap.probes.memory import check_fits
    from llm_heatmap.viz import save_grid, write_html
    from llm_heatmap.viz.grid import grid_needs

    style, layers, heads = options.grid_style(args)
    step = Steps(args, ["reading cube", "drawing grid"] + (["writing HTML"] if args.html else []))
    step("reading cube")
    cube_file = inspect_cube_file(args.cube)  # the header and shapes: what drawing it will take
    num_layers, num_heads, _, _ = cube_file.pattern_shape
    needs = {"cube": cube_file.nbytes, **grid_needs(len(layers or range(num_layers)), len(heads or range(num_heads)),
                                                     cube_file.pattern_shape[-1], style)}
    check_fits(needs, f"drawing cube file {args.cube}", advice="draw fewer layers (layers=[...]) or a smaller size")
    cube = AttentionCube.load(args.cube)
    step("drawing grid")
    with atomic_output(paths[0], force=args.force) as temp:
        save_grid(cube, temp, style, layers=layers, heads=heads)
    if args.html:
        step("writing HTML")
        from llm_heatmap.analyses.maps.qk_maps import layer_maps

        maps = layer_maps(cube) if cube.queries is not None else None
        with atomic_output(paths[1], force=args.force) as temp:
            write_html(cube, temp, style=style, qk_maps=maps)
    step.close()
    print(f"{cube.spec.summary}\nwrote " + ", ".join(str(p) for p in paths))
    return 0
