"""`llm-heatmap qk-map`: queries and keys of a layer's heads as points in one map (AttentionViz)."""

from __future__ import annotations

from pathlib import Path

from llm_heatmap.errors import InputError

from . import options, sites
from .run import Steps, emit, load

EXAMPLE = """examples:
  llm-heatmap qk-map "The cat sat on the mat." --layer 5               # every KV group of layer 5
  llm-heatmap qk-map "The cat sat on the mat." --layer 5 --head 3
  llm-heatmap qk-map --cube heatmaps/run.cube.safetensors --layer 2 --group 1   # a cube saved by grid --qk
  llm-heatmap qk-map 3141 --target 1413 --site cross --layer 1 --model DIR      # target queries, source keys"""


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "qk-map", run, summary="queries and keys of a layer's heads as points in one map",
        description="Capture PROMPT (or read a cube saved by `grid --qk`) and draw the query-key map of LAYER: each "
        "KV group's queries and keys in one 2-D map where nearness tracks the dot product (keys moved to the "
        "queries' centroid and both scaled to one mean norm, which changes no attention pattern; then PCA, or "
        "t-SNE / UMAP where installed). Writes NAME.png.", example=EXAMPLE)
    options.add_prompt_options(parser)
    parser.add_argument("--cube", type=Path, help="a cube file holding queries and keys, instead of PROMPT")
    options.add_model_options(parser)
    parser.add_argument("--layer", "--layers", dest="layer", type=int, required=True,
                        help="the layer to map (one; --layers is the same flag, as spelled in other commands)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--head", "--heads", dest="head", type=int,
                       help="only this query head (default: every KV group, side by side; --heads is the same flag)")
    which.add_argument("--group", type=int, help="only this KV group (its query heads share one set of keys)")
    parser.add_argument("--method", choices=options.PROJECTIONS, default="pca",
                        help="projection (default pca; tsne and umap need pip install 'llm-heatmap[maps]')")
    options.add_site_options(parser)
    options.add_output_options(parser)
    options.add_json_option(parser)


def run(args) -> int:
    from llm_heatmap.models.files import claim_outputs

    if args.cube is None:
        prompt = options.read_prompt(args, optional=bool(args.image or args.audio))
    elif args.prompt is not None or args.prompt_file is not None:
        raise InputError("give either PROMPT (or --prompt-file) or --cube, not both.")
    else:
        prompt = args.cube.name.removesuffix(".safetensors").removesuffix(".cube")
    which = f"-H{args.head}" if args.head is not None else f"-G{args.group}" if args.group is not None else ""
    from llm_heatmap.analyses.bounds import check_projection

    check_projection(args.method)  # before anything loads
    options.check_site_options(args)
    if args.cube is not None and (args.site or args.image or args.audio or args.target is not None):
        raise InputError("--site, --image, --audio and --target choose what a capture reads; a --cube was captured "
                         "already, drop them.")
    if args.cube is None:
        options.check_model_indices(args.model, [args.layer], None if args.head is None else [args.head],
                                    flags=("--layer", "--head"))
    site = f".{args.site}" if args.site else ""
    run_name = options.base_name(args, prompt)  # and an image's or a recording's file name without a prompt
    run_name = run_name if args.cube is not None else sites.runs(args, prompt, run_name)[0][0]
    name = options.plain_name(args.name) or f"{run_name}{site}.qk-L{args.layer}{which}.{args.method}"
    path = args.out / f"{name}.png"
    with claim_outputs([path], force=args.force):
        return _run(args, prompt, path)


def _run(args, prompt: str, path: Path) -> int:
    import torch

    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.analyses.maps.qk_maps import layer_maps, qk_map
    from llm_heatmap.probes import AttentionCube, capture_prompt
    from llm_heatmap.viz import plot_qk_maps, save_figure

    step = Steps(args, ["loading", "mapping", "drawing"])
    step("loading")
    if args.cube is not None:
        cube = AttentionCube.load(args.cube)
    else:
        model, tokenizer, spec = load(args)
        from llm_heatmap.models import site_specs

        specs = site_specs(model)
        if sites.wants_sites(args, specs):  # one site's layer: a cross site's queries are the target's, its keys the source's
            sites.check_single_site_flags(args)
            site = sites.one_site(args, model, specs, "qk-map")
            picture = sites.one_picture(args, "qk-map")
            cube = sites.capture_cubes(args, model, tokenizer, specs, [site], prompt, picture, layers=[args.layer],
                                       queries_and_keys=True, value_norms=False)[site]
        else:
            with torch.no_grad():  # one layer (an index the model lacks is refused before the forward pass)
                cube = capture_prompt(model, tokenizer, prompt, spec=spec, chat=args.chat, source=str(args.model),
                                      layers=[args.layer], queries_and_keys=True, value_norms=False)
    step("mapping")
    if args.head is not None:
        maps = [qk_map(cube, args.layer, head=args.head, method=args.method)]
    elif args.group is not None:
        maps = [qk_map(cube, args.layer, group=args.group, method=args.method)]
    else:
        maps = layer_maps(cube, layers=[args.layer], method=args.method)
    step("drawing")
    with atomic_output(path, force=args.force) as temp:
        save_figure(plot_qk_maps(maps, columns=min(len(maps), 4)), temp)
    step.close()
    lines = [f"{cube.spec.summary}", f"layer {args.layer}: {len(maps)} map(s), {args.method}; wrote {path}"]
    emit(args, lines, {"spec": cube.spec.summary, "layer": args.layer, "maps": len(maps), "file": str(path)})
    return 0
