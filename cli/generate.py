"""`llm-heatmap generate`: what every head looked at while the model generated each token."""

from __future__ import annotations

from pathlib import Path

from llm_heatmap.choices import STEP_SITES
from llm_heatmap.errors import InputError

from . import options
from .run import Steps, emit, load

EXAMPLE = """examples:
  llm-heatmap generate "The capital of France is" --max-new-tokens 12 --html
  llm-heatmap generate "Once upon a time" --max-new-tokens 64 --do-sample --temperature 0.8 --seed 1
  llm-heatmap generate 31415 --model examples/toy_models/digit-reverser --site cross"""


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "generate", run, summary="attention at every decode step while the model generates",
        description="Generate from PROMPT with the model's own KV cache while every attention kernel call is "
        "recorded: each decode step's row over every earlier position, straight from the kernel (no re-forward). "
        "Writes NAME.steps.csv (one row per step x head: most-attended position and token, its weight, the row's "
        "entropy), NAME.decode.cube.safetensors (the steps' rows over the final sequence; `render` draws it) "
        "and, with --html, NAME.decode.html (click a generated token: every head's row for it, and the text "
        "coloured by a chosen head). An encoder-decoder model generates from the source PROMPT and writes, per site "
        "(decoder self-attention over the target, cross-attention over the source), NAME.SITE.decode.png (every "
        "head's step rows) and NAME.SITE.decode.cube.safetensors. Beam search is refused.", example=EXAMPLE)
    options.add_prompt_options(parser)
    options.add_model_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (default 20)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="sampling temperature (with --do-sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    parser.add_argument("--layers", help="layers to record, e.g. 0,2,5-7 (default all)")
    parser.add_argument("--heads", help="heads to record, e.g. 0-3 (default all)")
    parser.add_argument("--html", action="store_true", help="also write the decode view NAME.decode.html")
    options.add_site_option(parser, "an encoder-decoder's decoder and cross; the encoder does not step")
    parser.add_argument("--audio", type=Path, metavar="WAV", help="a speech encoder-decoder's recording (Whisper) as "
                        "the source, instead of PROMPT: a PCM WAV file at its feature extractor's sample rate")
    options.add_output_options(parser)
    options.add_json_option(parser)


def run(args) -> int:
    from llm_heatmap.models.files import claim_outputs

    prompt = options.read_prompt(args, optional=args.audio is not None)
    options.check_site_options(args)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} must be at least 1.")
    if args.temperature is not None and (not args.do_sample or args.temperature <= 0):
        raise InputError("--temperature sets the sampling temperature: give a positive value together with --do-sample.")
    layers, heads = options.parse_indices(args.layers, "--layers"), options.parse_indices(args.heads, "--heads")
    options.check_model_indices(args.model, layers, heads)
    name = options.base_name(args, prompt) + (f"_{options.slug(args.audio.stem, 24)}" if prompt is None else "")
    if args.site is not None:  # an encoder-decoder's one site: its files are known, and claimed, before the load
        check_step_site(args.site)
        paths = site_paths(args, name, [args.site])
        with claim_outputs([p for group in paths.values() for p in group.values()], force=args.force):
            return _run(args, prompt, layers, heads, None, name, paths)
    paths = {"table": args.out / f"{name}.steps.csv", "cube": args.out / f"{name}.decode.cube.safetensors"}
    if args.html:
        paths["html"] = args.out / f"{name}.decode.html"
    with claim_outputs(paths.values(), force=args.force):
        return _run(args, prompt, layers, heads, paths, name)


def check_step_site(site: str) -> None:
    """--site (an attention site, `options.check_site_options`) names a site the decode steps run through: an
    encoder-decoder's decoder or cross."""
    if site not in STEP_SITES:
        raise InputError(f"--site {site} does not step while the model generates (an encoder reads the source once, "
                         "before the first step); generate follows an encoder-decoder's --site decoder or --site cross.")


def site_paths(args, name: str, sites: list[str]) -> dict[str, dict[str, Path]]:
    """Per site its step grid and cube file, NAME.SITE.decode.png and NAME.SITE.decode.cube.safetensors."""
    return {site: {"grid": args.out / f"{name}.{site}.decode.png",
                   "cube": args.out / f"{name}.{site}.decode.cube.safetensors"} for site in sites}


def _run(args, prompt: str, layers, heads, paths: dict[str, Path] | None, name: str,
         claimed_sites: dict | None = None) -> int:
    import torch

    from llm_heatmap.analyses.heads.decode_table import decode_step_table
    from llm_heatmap.analyses.runs.table_files import write_table
    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.probes.decode import capture_decode
    from llm_heatmap.viz.decode import decode_view

    step = Steps(args, ["loading", "generating", "writing"])
    step("loading")
    model, tokenizer, spec = load(args)
    if getattr(model.config, "is_encoder_decoder", False):
        return _run_sites(args, model, tokenizer, prompt, layers, heads, name, step, claimed_sites)
    if args.audio is not None:
        raise InputError(f"audio was given, but {type(model).__name__} reads no audio; drop --audio.")
    if args.site is not None:
        raise InputError(f"--site picks the decoder or cross site of an encoder-decoder, and {args.model} "
                         f"({type(model).__name__}) is a decoder-only model with one site; drop --site.")
    step("generating")
    sampling = _sampling(args)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        steps = capture_decode(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
                               spec=spec, layers=layers, heads=heads, source=str(args.model), **sampling)
    step("writing")
    table = decode_step_table(steps)
    if "html" in paths:
        view = decode_view(steps)  # refused (too large) before any file is written
    write_table(table, paths["table"], force=args.force)
    with atomic_output(paths["cube"], force=args.force) as temp:
        steps.cube().save(temp)
    if "html" in paths:
        view.save(paths["html"])
    step.close()
    text = tokenizer.decode(steps.generated)
    top = table.groupby("step").first()
    lines = [f"{args.model}: {spec.summary}", f"generated {steps.num_steps} tokens: {text!r}",
             f"{len(table)} rows (step x head); L{steps.layers[0]}H{steps.heads[0]}'s most-attended token per step: "
             + ", ".join(f"{row.token!r}<-{row.top_key_token!r}" for row in top.head(6).itertuples()),
             "wrote " + ", ".join(str(p) for p in paths.values())]
    emit(args, lines, {"model": str(args.model), "spec": spec.summary, "generated": text, "steps": steps.num_steps,
                       "files": {k: str(v) for k, v in paths.items()}})
    return 0


def _run_sites(args, model, tokenizer, prompt: str | None, layers, heads, name: str, step, claimed: dict | None) -> int:
    """An encoder-decoder: the decode steps of the decoder and cross sites (or --site's), one grid and cube each
    (`claimed`: the files of --site, claimed before the load)."""
    import torch

    from llm_heatmap.analyses.heads.cross_metrics import cross_metrics
    from llm_heatmap.models.audio import reads_audio
    from llm_heatmap.models.files import atomic_output, claim_outputs
    from llm_heatmap.probes.decode_sites import capture_decode_sites
    from llm_heatmap.viz import save_grid

    if args.html or args.chat:
        raise InputError(f"--html and --chat follow a decoder-only model, and {args.model} ({type(model).__name__}) "
                         "is an encoder-decoder (its steps are drawn in NAME.decoder.decode.png and "
                         "NAME.cross.decode.png); drop them.")
    source = {"input_features": _audio_features(args, model, prompt)} if args.audio is not None or reads_audio(model) \
        else prompt
    paths = claimed or site_paths(args, name, list(STEP_SITES))
    sampling = _sampling(args)
    with claim_outputs([] if claimed else [p for group in paths.values() for p in group.values()], force=args.force):
        step("generating")
        torch.manual_seed(args.seed)
        steps = capture_decode_sites(model, tokenizer, source, max_new_tokens=args.max_new_tokens, sites=list(paths),
                                     layers=layers, heads=heads, source=str(args.model), **sampling)
        step("writing")
        text = tokenizer.decode(steps.generated)
        lines = [f"{args.model}: generated {steps.num_steps} tokens from {len(steps.source_tokens)} source tokens: "
                 f"{text!r}"]
        for site, site_paths_ in paths.items():
            cube = steps.cube(site)
            with atomic_output(site_paths_["grid"], force=args.force) as temp:
                save_grid(cube, temp)
            with atomic_output(site_paths_["cube"], force=args.force) as temp:
                cube.save(temp)
            shape = " x ".join(str(n) for n in cube.pattern.shape[-2:])
            lines.append(f"{site}: {shape} (steps x {'source' if site == 'cross' else 'target'} positions) per head; "
                         "wrote " + ", ".join(str(p) for p in site_paths_.values()))
            if site == "cross" and steps.num_steps > 1:
                table = cross_metrics(cube)
                sharp = table.loc[table["source_entropy"].idxmin()]
                layer, head = cube.layers.index(int(sharp["layer"])), cube.heads.index(int(sharp["head"]))
                read = cube.pattern[layer, head].argmax(-1).tolist()
                lines.append(f"cross: the sharpest head L{int(sharp['layer'])}H{int(sharp['head'])}'s most-attended "
                             "source token per step: " + ", ".join(
                                 f"{written!r}<-{cube.tokens[key]!r}" for written, key in zip(cube.query_tokens, read)))
    step.close()
    emit(args, lines, {"model": str(args.model), "generated": text, "steps": steps.num_steps,
                       "files": {site: {k: str(v) for k, v in group.items()} for site, group in paths.items()}})
    return 0


def _sampling(args) -> dict:
    """generate()'s sampling options from --do-sample and --temperature."""
    if not args.do_sample:
        return {"do_sample": False}
    return {"do_sample": True, **({"temperature": args.temperature} if args.temperature else {})}


def _audio_features(args, model, prompt: str | None):
    """--audio as the encoder's `input_features`, through the model's feature extractor (checked as `grid` checks
    it: a model that reads audio, a recording and no prompt)."""
    from llm_heatmap.models import site_specs
    from llm_heatmap.models.audio import audio_features, load_feature_extractor, read_wav
    from llm_heatmap.models.inputs import check_site_inputs

    extractor = load_feature_extractor(args.model, trust_remote_code=args.trust_remote_code)
    audio = None if args.audio is None else read_wav(args.audio)
    check_site_inputs(model, extractor, site_specs(model), prompt=prompt, audio=audio)
    return audio_features(extractor, *audio, where=f"--audio {args.audio}")
