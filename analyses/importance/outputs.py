"""Which output a method over a decoder-only language model cannot score, in one sentence.

Direct logit attribution, knockout and the plain head ablation read a decoder-only language model's next
token from its one stack of layers. An encoder-decoder, an image classifier, a vision model without a head,
a dual encoder (CLIP) or a vision-language model is refused with what it is, before anything runs.
"""

from __future__ import annotations

from torch import nn

from llm_heatmap.errors import InputError


def image_classifier(model: nn.Module) -> bool:
    """Whether `model` is one of transformers' image classification classes (ViT, DeiT, ... with a class head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return type(model).__name__ in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values()


def check_one_stack_language_model(model: nn.Module, method: str, instead: str = "") -> None:
    """Refuse, naming what `model` is, an encoder-decoder or a model that reads images; `method` says what the
    method needs ("direct logit attribution splits"), `instead` ends the sentence where another way exists."""
    from llm_heatmap.models.loading import reads_images

    config = getattr(model, "config", None)
    name = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder" + ("" if head is not None else " without an LM head")
    elif not reads_images(config):
        return
    elif image_classifier(model):
        kind = "an image classifier"
    elif head is not None:
        kind = "a vision-language model"
    else:
        kind = "a vision model without an LM head or a classification head"
    raise InputError(f"{name} is {kind}, and {method} the next token of a decoder-only language model with an LM "
                     f"head, read from its one stack of layers{instead or '; pass such a model'}.")
