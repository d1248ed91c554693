"""`load_model`: one entry point for hub ids, local directories, GGUF files and offline models."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

from llm_heatmap.choices import QUANTIZE
from llm_heatmap.errors import InputError
from .gguf_cache import converted_dir
from .offline import OFFLINE_MODELS
from .spec import spec_from_model

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InputError(f"dtype '{dtype}' is not known; use one of {', '.join(sorted(_DTYPES))}.")
    return _DTYPES[dtype]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")


def _offline_names() -> str:
    return ", ".join(OFFLINE_MODELS)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within `timeout` seconds.

    One socket probe instead of huggingface_hub's HTTP retries, so a machine without a hub
    fails in seconds. HF_HUB_OFFLINE and HF_ENDPOINT are read from the environment now,
    not from huggingface_hub's constants frozen at import time.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no", "off"):
        return False
    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    if not url.hostname:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _quantization_config(quantize: str | None):
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise InputError(f"quantize='{quantize}' is not supported; use '4bit' or '8bit'.")
    # bitsandbytes asks the `kernels` package for a hub CPU kernel when it is imported, and both log warnings when
    # that is off (the CLI keeps the hub and hub kernels off); bitsandbytes' own CPU kernel runs instead
    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as error:  # ImportError, or a RuntimeError from a build without this platform's backend
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise InputError(
            f"quantize='{quantize}' needs bitsandbytes, which cannot run here ({reason}); "
            "install a bitsandbytes build for this machine (pip install bitsandbytes) or load the model without quantize."
        ) from None
    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_ACCELERATORS = {"cuda": lambda: torch.cuda, "xpu": lambda: getattr(torch, "xpu", None),
                 "mps": lambda: getattr(torch, "mps", None)}


def _device_count(kind: str) -> int:
    """How many devices of an accelerator `kind` this machine has (mps: one where available)."""
    module = _ACCELERATORS[kind]()
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    return module.device_count() if module is not None and module.is_available() else 0


def check_device(device_map) -> None:
    """Refuse a `device_map` that names no device of this machine, before anything is loaded: None, a
    strategy of accelerate (`DEVICE_MAP_STRATEGIES`) or a dict pass; a device ("cpu", "cuda", "cuda:1",
    "mps", "xpu", or a GPU index) must exist here."""
    if device_map is None or isinstance(device_map, dict) or device_map in DEVICE_MAP_STRATEGIES:
        return
    text = str(device_map)
    try:
        device = torch.device(int(text) if text.isdigit() else text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or (device.type != "cpu" and device.type not in _ACCELERATORS):
        raise InputError(f"device_map={text!r} is not a device; use cpu, cuda, cuda:N, mps, xpu, or a strategy "
                         f"({', '.join(DEVICE_MAP_STRATEGIES)}).")
    if device.type == "cpu":
        return
    count = _device_count(device.type)
    if count == 0:
        raise InputError(f"device_map={text!r} names a {device.type} device, but this machine has none; use cpu, or "
                         "leave it out.")
    if device.index is not None and device.index >= count:
        raise InputError(f"device_map={text!r} names {device.type} device {device.index}, but this machine has "
                         f"{count} ({device.type}:0..{count - 1}).")


def resolve_source(source: str | os.PathLike, *, progress=None) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is local)."""
    text = str(source)
    if text in OFFLINE_MODELS:
        path = OFFLINE_MODELS[text].require_path()
        return resolve_source(path, progress=progress)
    path = Path(text).expanduser()
    if path.suffix == ".gguf" and not path.exists():
        raise InputError(f"GGUF file {text} does not exist; check the path, or use one of: {_offline_names()}.")
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model source {text} is a file but not a .gguf; pass a model directory, a .gguf file or a hub id.")
        return str(converted_dir(path, progress=progress)), True
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InputError(
                f"directory {text} is not a Hugging Face model (it has no config.json); "
                "pass a directory written by save_pretrained, a .gguf file, or one of: " + _offline_names() + "."
            )
        return str(path), True
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise InputError(f"model source {text} does not exist; check the path, or use one of: {_offline_names()}.")
    return text, False


def _load_from_hub_or_cache(loader, source: str, **kwargs):
    try:
        return loader(source, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not _hub_reachable():
        raise InputError(
            f"model '{source}' is neither a local path nor in the Hugging Face cache, and the hub cannot be reached "
            "(the llm-heatmap command stays offline unless HF_HUB_OFFLINE=0 is set); "
            f"use an offline model ({_offline_names()}), a local directory or a .gguf file."
        ) from None
    try:
        return loader(source, **kwargs)
    except OSError as error:
        raise InputError(
            f"model '{source}' could not be loaded from the hub ({_first_line(error)}); "
            f"check the model id, or use an offline model ({_offline_names()}), a local directory or a .gguf file."
        ) from None


def load_model(
    source: str | os.PathLike = "smollm2-135m",
    *,
    dtype=None,
    device_map=None,
    quantize: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    progress=None,
):
    """Load a model in eval mode with its tokenizer and `ModelSpec`.

    `source`: an offline model name (`smollm2-135m`, `minilm-l6`), a local Hugging Face
    directory, a `.gguf` file (converted once into a safetensors cache), or a hub id.
    `quantize`: '4bit' (bitsandbytes NF4) or '8bit'. `device_map` goes to accelerate, so a
    model larger than one device is sharded. `trust_remote_code` stays off unless asked.
    `attn_implementation` is passed through (None keeps transformers' default, usually sdpa).
    `progress(message)` receives progress lines; without it loading is silent (transformers' own
    progress bars included).
    """
    check_device(device_map)
    with contextlib.nullcontext() if progress else _transformers_bars_off():
        return _load_model(source, dtype=dtype, device_map=device_map, quantize=quantize,
                           trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                           progress=progress)


@contextlib.contextmanager
def _transformers_bars_off():
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def check_config(config, source) -> None:
    """Refuse a config whose attention heads cannot be built: query heads that do not divide the hidden size
    (where the config gives no head size of its own), or that are not a multiple of the KV heads."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, hidden = getattr(text, "num_attention_heads", None), getattr(text, "hidden_size", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if not all(isinstance(v, int) and v > 0 for v in (heads, kv_heads)):
        return
    if heads % kv_heads:
        raise InputError(f"model '{source}' has {heads} query heads, not a multiple of its {kv_heads} key-value heads "
                         "(num_key_value_heads in config.json); fix the config.")
    if isinstance(hidden, int) and getattr(text, "head_dim", None) is None and hidden % heads:
        raise InputError(f"model '{source}' has {heads} attention heads, which do not divide its hidden size "
                         f"{hidden} (num_attention_heads and hidden_size in config.json); fix the config.")


def reads_images(config) -> bool:
    """Whether a config describes a model that reads pixels: a vision tower (ViT, CLIP, a VLM)."""
    return any(getattr(c, "image_size", None) and getattr(c, "patch_size", None)
               for c in (config, getattr(config, "vision_config", None)) if c is not None)


def _load_tokenizer(load, config):
    """The model's tokenizer; None for a vision model saved without one (a ViT reads pixels only)."""
    from transformers import AutoTokenizer

    try:
        return load(AutoTokenizer.from_pretrained)
    except Exception:  # noqa: BLE001 - a tokenizer's absence reads differently per model type
        if reads_images(config) and getattr(config, "vision_config", None) is None:
            return None
        raise


def load_processor(source: str | os.PathLike, *, trust_remote_code: bool = False):
    """The processor a local model directory ships for images (AutoProcessor, else AutoImageProcessor),
    or None when it has none."""
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.image_processing_utils import BaseImageProcessor

    for loader in (AutoProcessor, AutoImageProcessor):
        try:
            processor = loader.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        except Exception:  # noqa: BLE001 - a folder without the files: the next kind, then None
            continue
        if isinstance(getattr(processor, "image_processor", processor), BaseImageProcessor):
            return processor
    return None


def _load_model(source, *, dtype, device_map, quantize, trust_remote_code, attn_implementation, progress):
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification,
                              AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq)
    from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES

    name, local = resolve_source(source, progress=progress)
    common = {"trust_remote_code": trust_remote_code}
    load = (lambda loader, **kw: loader(name, **common, **kw)) if local else (
        lambda loader, **kw: _load_from_hub_or_cache(loader, name, **common, **kw))
    try:
        config = load(AutoConfig.from_pretrained)
    except InputError:
        raise
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error) and not trust_remote_code:
            raise InputError(
                f"model '{source}' needs code shipped with it (its config's auto_map), which runs only with "
                "trust_remote_code=True; read that code before you allow it."
            ) from None
        raise InputError(
            f"model '{source}' has a config transformers cannot use ({_first_line(error)}); "
            "pass a directory written by save_pretrained, a .gguf file, or one of: " + _offline_names() + "."
        ) from None
    check_config(config, source)
    architectures = config.architectures or []
    causal = any(a.endswith("ForCausalLM") for a in architectures)
    # an encoder-decoder keeps its LM head, so that the CLI can generate its decoder input greedily
    seq2seq = getattr(config, "is_encoder_decoder", False) and any(a.endswith("ForConditionalGeneration")
                                                                   for a in architectures)
    speech = seq2seq and config.model_type in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES  # Whisper: audio in, text out
    # an image classifier keeps its head, so that an ablation can score its predicted class
    classifier = any(a.endswith("ForImageClassification") for a in architectures)
    auto = (AutoModelForCausalLM if causal else AutoModelForSpeechSeq2Seq if speech else AutoModelForSeq2SeqLM if seq2seq
            else AutoModelForImageClassification if classifier else AutoModel)
    kwargs = {"dtype": parse_dtype(dtype) or (None if quantize else torch.float32)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    quantization_config = _quantization_config(quantize)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs.setdefault("device_map", "cpu" if not torch.cuda.is_available() else "auto")
    if progress:
        progress(f"loading {source}")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a refused file
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            model = load(auto.from_pretrained, **kwargs)
        tokenizer = _load_tokenizer(load, config)
    except InputError:
        raise
    except pickle.UnpicklingError:  # torch loads pickled weights with its weights-only unpickler, which refused
        raise InputError(
            f"model '{source}' holds pickled weights that hold more than tensors, which torch refuses to load (nothing "
            "in them ran); use a model saved as safetensors."
        ) from None
    except ImportError as error:  # a quantization_config (GPTQ, AWQ, ...) whose package is not installed
        raise InputError(
            f"model '{source}' needs a package that is not installed ({_first_line(error)}); install it, or use a "
            "model saved without that quantization."
        ) from None
    except Exception as error:  # noqa: BLE001 - a folder's files are input: truncated weights, shapes that disagree
        if "trust_remote_code" in str(error) and not trust_remote_code:  # e.g. the tokenizer's auto_map
            raise InputError(
                f"model '{source}' needs code shipped with it (an auto_map in its tokenizer or model files), which "
                "runs only with trust_remote_code=True; read that code before you allow it."
            ) from None
        reason = "its weights' shapes disagree with its config.json (vocab_size, hidden_size or another size)" \
            if "ignore_mismatched_sizes" in str(error) else _first_line(error)
        raise InputError(
            f"model '{source}' could not be loaded ({reason}); check that the directory holds the "
            "weights and tokenizer files save_pretrained writes, complete and written for this config."
        ) from None
    model.eval()
    spec = spec_from_model(model)
    return model, tokenizer, spec
