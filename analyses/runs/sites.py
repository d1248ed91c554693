"""One attention site of a model read over a prompt set: the atlas, the KV report and the set comparison share it.

    model, tokenizer, spec, processor = loaded_with_processor(source, loader, prompts)
    site = resolve_site(model, spec, "cross", name)           # which stack, its spec, how its inputs are built
    check_site_run(model, processor, site, prompts, chat=False, name=name)
    cube = site_cube(model, tokenizer, prompt, site, processor)

A model with one stack (a decoder-only LM, BERT) is read from the prompt's tokens as every command reads it;
a model with several sites (encoder-decoder, CLIP, a VLM) or a vision model is read through its sites: each
record's text, image and target make one forward pass (`models.inputs.site_inputs`), and the chosen site's
cube is kept. A model with several sites needs `site`: which one is not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_heatmap.errors import InputError
from llm_heatmap.models.sites import CROSS, DECODER, SELF, SITE_ORDER, TEXT, VISION


@dataclass(frozen=True)
class ResolvedSite:
    """The site read on one model: its name (a ViT's one stack is its vision site), its key among the model's
    sites (the ViT's stack is captured as "self"), its spec, and whether it is captured through the sites
    (images, targets, towers) rather than from the prompt's tokens alone."""

    name: str
    key: str
    spec: object
    through_sites: bool


def resolve_site(model, spec, site: str | None, name: str, reads: str = "a run reads one") -> ResolvedSite:
    """The site read on `model` (`spec` where that is its one stack); a model with several sites needs `site`.
    `reads` ends the sentence that asks for it ("an atlas covers one")."""
    from llm_heatmap.models import spec_from_model
    from llm_heatmap.models.loading import reads_images
    from llm_heatmap.models.sites import find_sites

    if site is not None and site not in SITE_ORDER:
        raise InputError(f"site={site!r} is not an attention site; the sites are {', '.join(SITE_ORDER)}.")
    images = reads_images(getattr(model, "config", None))
    specs = find_sites(model) or {SELF: None}  # a model without *Attention modules (a TransformerLens model): one stack
    if set(specs) == {SELF} and images:
        specs = {VISION: None}  # a vision model alone (ViT): its one stack is its vision tower
    if site is None and len(specs) > 1:
        raise InputError(f"{name} has several attention sites ({', '.join(specs)}) and {reads}; pass "
                         f"site={next(iter(specs))}.")
    site = site or next(iter(specs))
    if site not in specs:
        raise InputError(f"site={site!r} is not a site of {name}; its sites are {', '.join(specs)}.")
    if VISION in specs and set(find_sites(model)) <= {SELF}:
        return ResolvedSite(VISION, SELF, spec, True)
    site_spec = spec if site == SELF else spec_from_model(model, site)
    return ResolvedSite(site, site, site_spec, images or site in (DECODER, CROSS, TEXT))


def loaded_with_processor(source, loader, prompts, *, trust_remote_code: bool = False) -> tuple:
    """(model, tokenizer, spec, processor) of a loaded entry or a source; an entry or a loader gives
    (model, tokenizer, spec) or those and the processor; a source's own processor is loaded when a prompt names
    an image (running code shipped with it only with `trust_remote_code`)."""
    if isinstance(source, tuple):
        loaded = source
    elif loader is not None:
        loaded = loader(source)
    else:
        from llm_heatmap.models import load_model

        loaded = load_model(source)
    if len(loaded) == 4:
        return tuple(loaded)
    processor = None
    if not isinstance(source, tuple) and any(p.image is not None for p in prompts):
        from llm_heatmap.models.loading import load_processor

        processor = load_processor(source, trust_remote_code=trust_remote_code)
    return (*loaded, processor)


def check_site_run(model, processor, site: ResolvedSite, prompts, *, chat: bool, name: str) -> None:
    """Every record checked against what the model reads before any is measured; chat refused where the site
    reads its inputs through the model's sites (no chat template applies there)."""
    if site.through_sites and chat:
        raise InputError(f"chat applies a chat template to a text model's prompt, and the {site.name} site of "
                         f"{name} reads its inputs through the model's sites; drop chat.")
    if site.through_sites or any(p.image is not None or p.target is not None for p in prompts):
        from llm_heatmap.analyses.runs.batch import check_site_prompts

        check_site_prompts(model, processor, prompts)


def record_lengths(tokenizer, spec, prompts, *, chat: bool = False, name: str | None = None) -> dict:
    """Each record's token count (`runs.prompts.check_length`: refused when too long or too short), None for an
    image without text (a vision model's record, whose length is its picture's)."""
    from llm_heatmap.analyses.runs.prompts import check_length

    return {p.id: check_length(tokenizer, spec, p.text, chat=chat, where=p.where if name is None else f"{name}: {p.where}")
            if p.text or p.image is None else None for p in prompts}


def site_cube(model, tokenizer, prompt, site: ResolvedSite, processor=None, *, chat: bool = False):
    """The cube of `site` for one record (`runs.prompts.Prompt`: its text, image and target)."""
    if not site.through_sites:
        from llm_heatmap.probes import capture_prompt

        return capture_prompt(model, tokenizer, prompt.text, spec=site.spec, chat=chat)
    from llm_heatmap.analyses.heads.measure import capture_site_cubes

    return capture_site_cubes(model, tokenizer, prompt.text or None, image=prompt.image, processor=processor,
                              sites=[site.key], target=prompt.target)[site.key]
