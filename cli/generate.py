"""`llm-heatmap generate`: what every head looked at while the model generated each token."""

from __future__ import annotations

from pathlib import Path

from llm_heatmap.errors import InputError

from . import options
from .run import Steps, emit, load

EXAMPLE = """examples:
  llm-heatmap generate "The capital of France is" --max-new-tokens 12 --html
  llm-heatmap generate "Once upon a time" --max-new-tokens 64 --do-sample --temperature 0.8 --seed 1"""


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "generate", run, summary="attention at every decode step while the model generates",
        description="Generate from PROMPT with the model's own KV cache while every attention kernel call is "
        "recorded: each decode step's row over every earlier position, straight from the kernel (no re-forward). "
        "Writes NAME.steps.csv (one row per step x head: most-attended position and token, its weight, the row's "
        "entropy), NAME.decode.cube.safetensors (the steps' rows over the final sequence; `render` draws it) "
        "and, with --html, NAME.decode.html (click a generated token: every head's row for it, and the text "
        "coloured by a chosen head). Causal language models only; beam search is refused.", example=EXAMPLE)
    options.add_prompt_options(parser)
    options.add_model_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (default 20)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="sampling temperature (with --do-sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    parser.add_argument("--layers", help="layers to record, e.g. 0,2,5-7 (default all)")
    parser.add_argument("--heads", help="heads to record, e.g. 0-3 (default all)")
    parser.add_argument("--html", action="store_true", help="also write the decode view NAME.decode.html")
    options.add_output_options(parser)
    options.add_json_option(parser)


def run(args) -> int:
    from llm_heatmap.models.files import claim_outputs

    prompt = options.read_prompt(args)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} must be at least 1.")
    if args.temperature is not None and (not args.do_sample or args.temperature <= 0):
        raise InputError("--temperature sets the sampling temperature: give a positive value together with --do-sample.")
    layers, heads = options.parse_indices(args.layers, "--layers"), options.parse_indices(args.heads, "--heads")
    options.check_model_indices(args.model, layers, heads)
    name = options.base_name(args, prompt)
    paths = {"table": args.out / f"{name}.steps.csv", "cube": args.out / f"{name}.decode.cube.safetensors"}
    if args.html:
        paths["html"] = args.out / f"{name}.decode.html"
    with claim_outputs(paths.values(), force=args.force):
        return _run(args, prompt, layers, heads, paths)


def _run(args, prompt: str, layers, heads, paths: dict[str, Path]) -> int:
    import torch

    from llm_heatmap.analyses.heads.decode_table import decode_step_table
    from llm_heatmap.analyses.runs.table_files import write_table
    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.probes.decode import capture_decode
    from llm_heatmap.viz.decode import decode_view

    step = Steps(args, ["loading", "generating", "writing"])
    step("loading")
    model, tokenizer, spec = load(args)
    step("generating")
    sampling = {"do_sample": True, **({"temperature": args.temperature} if args.temperature else {})} \
        if args.do_sample else {"do_sample": False}
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
