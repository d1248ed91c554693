"""Which attention site of a model the atlas characterises, and which measures apply to each site.

`ATLAS_SITES` is the one table of what the atlas does per site: what each prompt record gives, which
per-prompt metrics make the rows (`heads.measure.site_metrics` computes them from the site's cube), which
scores rank a head's top prompts, and whether the induction and retrieval probes run (None) or why not.
The head divergence, the head map, the clustering and the pooled pictures apply to every site (a
cross-attention head's rows are distributions over the source as much as a self-attention head's are over
its own tokens). A model with several sites is characterised one site at a time (`site`).
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_heatmap.errors import InputError

from llm_heatmap.models.sites import CROSS, DECODER, ENCODER, SELF, TEXT, VISION
TEXT_RANKING = ("sink_score", "previous_token_score", "duplicate_token_score", "induction_score", "diagonal_score",
                "vertical_score", "block_score")
CROSS_RANKING = ("alignment", "monotonicity", "coverage", "source_entropy")
VISION_RANKING = ("attention_distance", "spatial_entropy", "cls_mass", "register_mass", "sink_score", "diagonal_score",
                  "vertical_score", "block_score")

NOT_TOKENS = "its queries and keys are image patches, not text tokens"
TWO_SEQUENCES = ("its rows are target tokens and its keys source tokens, and the probe scores attention within one "
                 "token sequence")
NO_GENERATION = "the needle test scores the heads a model generates with, which is a decoder-only model's self-attention"


@dataclass(frozen=True)
class AtlasSite:
    """What the atlas does on one site (module docstring); a probe is None where it runs, else why not."""

    reads: str
    metrics: str
    rank_by: tuple[str, ...]
    induction_probe: str | None = None
    retrieval_probe: str | None = None


ATLAS_SITES = {
    SELF: AtlasSite("the prompt's text (a VLM's language model: text and the record's image)",
                    "head metrics; on a VLM's language model also image_share", (*TEXT_RANKING, "image_share")),
    ENCODER: AtlasSite("the prompt as the source (the decoder gets one start token)", "head metrics", TEXT_RANKING,
                       retrieval_probe=NO_GENERATION),
    DECODER: AtlasSite("the prompt as the source and the record's target as the decoder's input (teacher forced)",
                       "head metrics over the target (causal)", TEXT_RANKING, retrieval_probe=NO_GENERATION),
    CROSS: AtlasSite("the prompt as the source and the record's target as the decoder's input (teacher forced)",
                     "cross metrics: alignment, monotonicity, coverage, source_entropy", CROSS_RANKING,
                     induction_probe=TWO_SEQUENCES, retrieval_probe=TWO_SEQUENCES),
    VISION: AtlasSite("the record's image (a CLIP or a VLM: with the prompt's text)",
                      "head metrics and vision metrics: attention_distance(_px), spatial_entropy, cls_mass, "
                      "register_mass, patch_share", VISION_RANKING, induction_probe=NOT_TOKENS, retrieval_probe=NOT_TOKENS),
    TEXT: AtlasSite("the prompt's text and the record's image (a dual encoder's forward reads both)", "head metrics",
                    TEXT_RANKING, induction_probe="a dual encoder runs its text tower only beside an image, and the probe "
                    "is tokens alone", retrieval_probe=NO_GENERATION),
}
RANKABLE = tuple(dict.fromkeys(name for site in ATLAS_SITES.values() for name in site.rank_by))


def atlas_site(site: str | None) -> AtlasSite:
    """The table's row of `site` (None: self), or one sentence naming the sites."""
    if site is None:
        return ATLAS_SITES[SELF]
    if site not in ATLAS_SITES:
        raise InputError(f"site={site!r} is not an attention site; the atlas covers {', '.join(ATLAS_SITES)}.")
    return ATLAS_SITES[site]


def skipped_probes(site: str | None, *, induction: bool, retrieval: bool) -> str:
    """The atlas's note on the probes asked for (`induction`, `retrieval`) that do not run on `site` ("" if none)."""
    row = atlas_site(site)
    notes = [f"{name} probe skipped on the {site} site: {why}" for name, asked, why in (
        ("induction", induction, row.induction_probe), ("retrieval", retrieval, row.retrieval_probe)) if asked and why]
    return "; ".join(notes)


def check_site_records(site: str | None, prompts) -> None:
    """What a record must give for `site`, checked before any model loads: a target for the decoder and
    cross-attention sites, an image for a vision site."""
    needs = {DECODER: ("target", "the decoder's text, read teacher forced"), CROSS: ("target", "the decoder's text, read "
             "teacher forced"), VISION: ("image", "the picture the vision site reads")}.get(site)
    if needs is None:
        return
    field, what = needs
    for prompt in prompts:
        if getattr(prompt, field) is None:
            raise InputError(f'{prompt.where} has no "{field}", and the atlas of the {site} site reads each record\'s '
                             f'{field} ({what}); add a "{field}" to every record of the prompt file.')
