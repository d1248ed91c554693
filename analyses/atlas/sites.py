"""Which attention site of a model the atlas characterises.

The atlas measures self-attention over a text prompt's own tokens, reached by one forward pass over those
tokens (its induction and retrieval probes are token sequences too): the one stack of a decoder LLM or a
BERT ("self"), and the encoder of an encoder-decoder model ("encoder", the prompt being the source). A model
with several sites is characterised one site at a time (`site`); the other sites are refused in one
sentence: the decoder's input is a target or a generated text, cross-attention is rectangular (target
rows over source keys), and vision towers and VLMs read images, none of which an atlas run builds yet.
"""

from __future__ import annotations

from llm_heatmap.errors import InputError

ATLAS_SITES = ("self", "encoder")
WHY_NOT = {
    "decoder": "its input is a target or a generated text, which the atlas does not build",
    "cross": "its heads read source keys from target rows, which the atlas's head measures do not cover",
    "vision": "it reads images, and the atlas reads text prompts",
    "text": "the text tower of a dual encoder runs beside an image, which the atlas does not give it",
}


def check_atlas_site(site: str | None) -> None:
    """`site` if the atlas can characterise it (module docstring), else one sentence saying why not."""
    if site is None or site in ATLAS_SITES:
        return
    why = WHY_NOT.get(site, "it is not self-attention over the prompt's own tokens")
    raise InputError(f"site={site!r} has no atlas yet: {why}; pick site='self' or site='encoder', or measure the {site} "
                     "site per prompt with a batch run.")


def atlas_spec(model, spec, site: str | None, name: str):
    """The spec of the site the atlas characterises on `model` (`spec` where that is its one stack); a model
    with several sites needs `site`, and a model that reads images has no site the atlas reads."""
    from llm_heatmap.models import spec_from_model
    from llm_heatmap.models.loading import reads_images
    from llm_heatmap.models.sites import find_sites

    check_atlas_site(site)
    specs = find_sites(model) or {"self": None}  # a model without *Attention modules (a TransformerLens model): one stack
    if site is None and set(specs) != {"self"}:
        atlas_sites = [s for s in specs if s in ATLAS_SITES]
        hint = f"pass site={atlas_sites[0]}" if atlas_sites else "it has none an atlas reads yet (self or encoder)"
        raise InputError(f"{name} has several attention sites ({', '.join(specs)}) and an atlas covers one; {hint}.")
    site = site or "self"
    if site not in specs:
        raise InputError(f"site={site!r} is not a site of {name}; its sites are {', '.join(specs)}.")
    if reads_images(getattr(model, "config", None)):
        raise InputError(f"{name} reads images, and the atlas reads text prompts; measure it per image with a batch run.")
    return spec if site == "self" else spec_from_model(model, site)
