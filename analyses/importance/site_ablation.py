"""Head ablation on one attention site of an encoder-decoder or an image classifier.

A decoder-only language model is scored by its next token (`ablation.head_ablation_rows`). These models are
scored by their own output instead:

- an encoder-decoder with an LM head (any of its sites: encoder, decoder, cross): the teacher-forced
  log-probability of the record's target (the decoder input is the start token and the target's tokens,
  `models.inputs.site_inputs`; without a target, the sequence the model generates greedily from the source),
  summed over the target's tokens (`log_prob`), and the mean loss per target token (`loss`);
- an image classifier (ViT, DeiT, ... with a classification head): log p of the class the unablated model
  predicts (`target_id`); its record names no label, so it has no loss (NaN).

Each head of the site is ablated alone, a batch of copies of the record per forward (copy b ablates head b),
by the same pre-hook on the site's output projections as every ablation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from torch import nn

from llm_heatmap.errors import InputError

from .ablation import LOGITS_BUDGET, check_ablatable, mean_outputs_of_forwards, one_head_per_copy

TARGET, CLASS = "target", "class"


def site_output(model: nn.Module) -> str:
    """What an ablation on a site of `model` scores: TARGET (an encoder-decoder's target) or CLASS (an image
    classifier's predicted class); one sentence naming what the model lacks otherwise."""
    from llm_heatmap.models.loading import reads_images

    from .outputs import image_classifier

    name = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(model.config, "is_encoder_decoder", False):
        if head is None:
            raise InputError(f"{name} is an encoder-decoder without an LM head, so an ablation has no target "
                             "log-probability to change; pass the model with its LM head (a "
                             "...ForConditionalGeneration class).")
        return TARGET
    if image_classifier(model):
        return CLASS
    if reads_images(model.config) and head is not None:
        raise InputError(f"{name} is a vision-language model, and an ablation on its sites scores only an "
                         "encoder-decoder's target or an image classifier's class; a VLM's next token is not "
                         "scored yet.")
    if reads_images(model.config):
        raise InputError(f"{name} has no classification head and no LM head, so an ablation has no class or token "
                         "probability to change; pass an image classifier (e.g. ViTForImageClassification).")
    raise InputError(f"{name} is neither an encoder-decoder nor an image classifier, so its sites have no output an "
                     "ablation can score; a decoder-only language model is ablated through its one stack.")


def _on_device(model: nn.Module, inputs: dict) -> dict:
    device = next(model.parameters()).device
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in inputs.items()}


def _forward(model: nn.Module, inputs: dict, copies: int = 1) -> torch.Tensor:
    """The logits of `copies` copies of one record's `inputs` (each tensor `"1 ..."`) in one forward."""
    batch = {key: value.expand(copies, *value.shape[1:]) if torch.is_tensor(value) else value
             for key, value in inputs.items()}
    if "decoder_input_ids" in batch:
        batch["use_cache"] = False
    return model(**batch).logits


def _scores(logits: torch.Tensor, inputs: dict, output: str, target: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of the scored output, in float64; the loss, NaN for a class) of each copy's logits."""
    if output == CLASS:
        log_prob = torch.log_softmax(logits.double(), -1)[:, target]
        return log_prob, torch.full_like(log_prob, float("nan"))
    following = inputs["decoder_input_ids"][0, 1:].to(logits.device)  # position t predicts token t + 1
    log_probs = torch.log_softmax(logits[:, :-1].double(), -1)
    picked = log_probs.gather(-1, rearrange(following, "t -> 1 t 1").expand(len(logits), -1, 1))[..., 0]
    return picked.sum(1), -picked.mean(1)


@torch.no_grad()
def site_head_ablation_rows(model: nn.Module, inputs: dict, *, spec, output: str | None = None,
                            means: torch.Tensor | None = None, batch_size: int | None = None) -> pd.DataFrame:
    """Every head of the site `spec` describes ablated alone (zero, or `means` `"l h d"`) on one record's
    `inputs` (`models.inputs.site_inputs`), one row per (layer, head): `target_id` (the predicted class; -1 for
    a target sequence), `n_target_tokens`, `log_prob` and `ablated_log_prob` of the scored output,
    `delta_log_prob` (ablated - clean), `loss`, `ablated_loss` and `delta_loss` (module docstring)."""
    output = output or site_output(model)
    check_ablatable(spec, means)
    inputs = _on_device(model, inputs)
    clean_logits = _forward(model, inputs)
    target = int(clean_logits[0].argmax()) if output == CLASS else None
    if output == TARGET and inputs["decoder_input_ids"].shape[-1] < 2:
        raise InputError("the decoder input holds no target token after the start token, so there is nothing to "
                         "score; give a target of at least one token.")
    clean_log_prob, clean_loss = (float(v[0]) for v in _scores(clean_logits, inputs, output, target))
    units = [(layer, head) for layer in range(spec.num_layers) for head in range(spec.num_heads)]
    size = batch_size or max(1, LOGITS_BUDGET // (4 * clean_logits[0].numel()))
    log_probs, losses = [], []
    for start in range(0, len(units), size):
        chunk = units[start:start + size]
        with one_head_per_copy(model, spec, chunk, means):
            logits = _forward(model, inputs, len(chunk))
        log_prob, loss = _scores(logits, inputs, output, target)
        log_probs.append(log_prob.cpu())
        losses.append(loss.cpu())
    layers, heads = (np.array(v) for v in zip(*units))
    ablated_log_prob, ablated_loss = torch.cat(log_probs).numpy(), torch.cat(losses).numpy()
    n_target = 1 if output == CLASS else inputs["decoder_input_ids"].shape[-1] - 1
    return pd.DataFrame({"layer": layers, "head": heads, "kv_group": heads // (spec.num_heads // spec.num_kv_heads),
                         "target_id": -1 if target is None else target, "n_target_tokens": n_target,
                         "log_prob": clean_log_prob, "ablated_log_prob": ablated_log_prob,
                         "delta_log_prob": ablated_log_prob - clean_log_prob, "loss": clean_loss,
                         "ablated_loss": ablated_loss, "delta_loss": ablated_loss - clean_loss})



def record_inputs(model: nn.Module, tokenizer, processor, prompt) -> dict:
    """The inputs of one record (`runs.prompts.Prompt`: its text, image path and target) through the model's
    sites (`models.inputs.site_inputs`)."""
    from llm_heatmap.models import site_specs
    from llm_heatmap.models.inputs import site_inputs

    image = None
    if prompt.image is not None:
        from PIL import Image

        with Image.open(prompt.image) as opened:
            image = opened.convert("RGB")
    return site_inputs(model, tokenizer, processor, site_specs(model), prompt=prompt.text or None, image=image,
                       target=prompt.target)


@torch.no_grad()
def site_mean_head_outputs(model: nn.Module, records: list[dict], spec) -> torch.Tensor:
    """float32 `"l h d"`: every head of the site `spec` describes, its output row averaged over all positions of
    every record's forward (`records`: `record_inputs` of each)."""
    if not records:
        raise InputError("mean ablation needs at least one prompt to average head outputs over.")
    forwards = []
    for inputs in records:
        inputs = _on_device(model, inputs)
        forwards.append({**inputs, "use_cache": False} if "decoder_input_ids" in inputs else inputs)
    return mean_outputs_of_forwards(model, forwards, spec)
