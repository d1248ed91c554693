"""The inputs of one forward pass of a model with several attention sites: text, images through the model's
own processor, and an encoder-decoder's source and target.

    inputs = site_inputs(model, tokenizer, processor, sites, prompt="a cat", image=picture)
    model(**inputs)

What each kind of model gets:
- a vision model (only a vision site, ViT): the image's `pixel_values`; no text;
- a dual encoder (vision and text sites, CLIP): the image and the prompt, each to its tower;
- a VLM (a vision tower and a language model that reads image tokens: its config names an image token): the
  prompt, with one of the processor's image tokens put first for each image the prompt has no token for, and
  the image, or several images in one sequence (a list, in the order of their tokens);
- an encoder-decoder: the prompt is the source; the decoder input is the decoder start token followed by
  `target`'s tokens (teacher forcing, as in training), or, without `target`, the sequence the model
  generates greedily from the source.
"""

from __future__ import annotations

import torch

from llm_heatmap.errors import InputError

from .audio import reads_audio
from .loading import reads_images
from .sites import CROSS, DECODER, SELF, VISION

MAX_GENERATED = 64  # decoder tokens generated greedily when no target is given


def site_inputs(model, tokenizer, processor, sites, *, prompt: str | None = None, image=None,
                target: str | None = None, audio=None) -> dict:
    """The keyword arguments of `model(...)` for one sequence (module docstring); `sites` are the model's
    site names, `image` a PIL image, a list of them (a VLM's images in one sequence) or None, `audio` (samples,
    sample rate) for a speech model, whose `processor` is its feature extractor."""
    sites = check_site_inputs(model, processor, sites, prompt=prompt, image=image, target=target, audio=audio)
    if audio is not None:
        from .audio import audio_features

        inputs = {"input_features": audio_features(processor, *audio)}
        return {**inputs, "decoder_input_ids": _decoder_ids(model, tokenizer, inputs, target)}
    if VISION in sites:
        if reads_images_in_text(model):
            return _vlm_inputs(processor, prompt, image if isinstance(image, list) else [image])
        return _vision_inputs(processor, tokenizer, sites, prompt, image)
    inputs = dict(tokenizer(prompt, return_tensors="pt"))
    if DECODER in sites or CROSS in sites:
        inputs["decoder_input_ids"] = _decoder_ids(model, tokenizer, inputs, target)
    return inputs


def reads_images_in_text(model) -> bool:
    """Whether `model` is a VLM: a language model that reads its images as tokens of the text (its config names
    an image token), not a vision model alone or a dual encoder."""
    config = model.config
    return getattr(config, "vision_config", None) is not None and any(getattr(config, name, None) is not None
                                        for name in ("image_token_id", "image_token_index"))


def check_site_inputs(model, processor, sites, *, prompt: str | None = None, image=None,
                      target: str | None = None, where: str | None = None, audio=None) -> set[str]:
    """The model's sites (a vision model's one stack named `vision`) when `prompt`, `image` (anything but None
    counts as given) and `target` are what the model reads (module docstring), else one sentence saying what
    is wrong; nothing runs, so a prompt set can be checked before any of it is measured. `where` names a
    record of a prompt file (its fields "prompt", "image", "target"), and the sentence speaks of that record."""
    sites = set(sites)
    name = type(model).__name__
    listed = ", ".join(sorted(sites))

    def refuse(plain: str, record: str) -> InputError:
        return InputError(plain if where is None else f"{where} {record}")

    if sites == {SELF} and reads_images(model.config):
        sites = {VISION}  # a vision model alone (ViT, DeiT): its one stack is its vision tower
    if image is not None and VISION not in sites:
        raise refuse(f"an image was given, but {name} reads no images (its sites are {listed}); drop the image.",
                     f'names an "image", but {name} reads no images (its sites are {listed}); drop the images '
                     "from the prompt file.")
    if target is not None and DECODER not in sites:
        raise refuse(f"a target was given, but {name} has no decoder (its sites are {listed}); drop the target.",
                     f'names a "target", but {name} has no decoder (its sites are {listed}); drop the targets '
                     "from the prompt file.")
    if reads_audio(model) or audio is not None:
        _check_audio_inputs(model, processor, prompt, audio, refuse)
        return sites
    if VISION not in sites:
        if prompt is None:
            raise refuse(f"{name} reads text; give a prompt.", f'has no text, but {name} reads text; write its "prompt".')
        return sites
    if image is None:
        raise refuse(f"{name} reads images; give an image.", f'names no image, but {name} reads images; add its "image".')
    if processor is None:
        raise InputError(f"{name} has no image processor saved with it (preprocessor_config.json), so its images "
                         "cannot be prepared as it expects; save the model's processor beside it (save_pretrained).")
    several = isinstance(image, list) and len(image) > 1
    if several and not reads_images_in_text(model):
        raise InputError(f"{len(image)} images were given for one forward pass, but {name} reads one image per pass "
                         "(it has no text to hold several); run them one at a time.")
    if reads_images_in_text(model) and getattr(processor, "tokenizer", None) is None:
        raise InputError(_text_processor_missing(name))
    if sites == {VISION} and prompt is not None:
        raise refuse(f"{name} reads only images, but a prompt was given; drop the prompt.",
                     f'has text, but {name} reads only images; leave its "prompt" empty.')
    if sites != {VISION} and prompt is None:
        raise refuse(f"{name} reads an image with text; give a prompt as well.",
                     f'has no text, but {name} reads an image with text; write its "prompt".')
    return sites


def _check_audio_inputs(model, processor, prompt, audio, refuse) -> None:
    """A speech model (Whisper) reads a recording and no prompt; any other model reads no audio."""
    name = type(model).__name__
    if not reads_audio(model):
        raise InputError(f"audio was given, but {name} reads no audio; drop --audio.")
    if audio is None:
        raise refuse(f"{name} reads audio (its encoder's input_features), not text; give a recording with --audio "
                     "PATH.wav.",
                     f"is text, but {name} reads audio, which prompt files do not name yet; capture it with "
                     "`grid --audio PATH.wav`.")
    if prompt is not None:
        raise InputError(f"{name} reads a recording as its source, and a prompt was given as well; drop the prompt "
                         "(the decoder's text goes to --target).")
    if processor is None or not hasattr(processor, "sampling_rate"):
        raise InputError(f"{name} has no feature extractor saved with it (preprocessor_config.json), so its audio "
                         "cannot be prepared as it expects; save the model's feature extractor beside it.")


def _text_processor_missing(name: str) -> str:
    """Why a VLM's directory gave an image processor but no processor that puts image tokens into its text."""
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        return (f"{name}'s processor, which puts its image tokens into the text, cannot be loaded without torchvision "
                "(transformers builds it with a video processor that needs torchvision), and torchvision is not "
                "installed; install the torchvision build that matches your torch and run again.")
    return (f"{name} has an image processor but no processor that puts its image tokens into the text "
            "(processor_config.json with its tokenizer); save the model's processor beside it (save_pretrained).")


def _vlm_inputs(processor, prompt: str, images: list) -> dict:
    """The prompt with an image token for each image it lacks one for (put first), and the images, through the
    model's processor."""
    image_token = getattr(processor, "image_token", None)
    if image_token:
        given = prompt.count(image_token)
        if given > len(images):
            raise InputError(f"the prompt holds {given} image tokens ({image_token}) but {len(images)} image"
                             f"{'s were' if len(images) > 1 else ' was'} given; give one image per image token.")
        prompt = f"{image_token}\n" * (len(images) - given) + prompt
    return dict(processor(text=prompt, images=images if len(images) > 1 else images[0], return_tensors="pt"))


def _vision_inputs(processor, tokenizer, sites, prompt, image) -> dict:
    image_processor = getattr(processor, "image_processor", processor)
    if sites == {VISION}:
        return {"pixel_values": image_processor(images=image, return_tensors="pt")["pixel_values"]}
    text = dict(tokenizer(prompt, return_tensors="pt"))
    return {**text, "pixel_values": image_processor(images=image, return_tensors="pt")["pixel_values"]}


def _decoder_ids(model, tokenizer, inputs: dict, target: str | None) -> torch.Tensor:
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        raise InputError(f"{type(model).__name__} names no decoder_start_token_id in its config, so its decoder input "
                         "cannot be built; set it in config.json.")
    if target is not None:
        ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        return torch.tensor([[start, *ids]])
    if not hasattr(model, "generate") or model.get_output_embeddings() is None:
        raise InputError(f"{type(model).__name__} has no language-model head to generate the decoder's text; "
                         "give the target.")
    positions = getattr(model.config, "max_target_positions", None)  # Whisper's decoder holds fewer than 64 + 1
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=min(MAX_GENERATED, (positions or MAX_GENERATED + 1) - 1),
                              do_sample=False, num_beams=1)
