"""Audio for a speech model's encoder (Whisper): a WAV file read with the standard library, turned into the
model's `input_features` by the feature extractor saved with it.

    samples, rate = read_wav(path)                         # float32 in [-1, 1], mono; the file's sample rate
    features = audio_features(feature_extractor, samples, rate, where=str(path))   # "1 mel frames"

Nothing is resampled or cut silently: a file at another rate than the extractor's, or longer than the window
the encoder reads (Whisper: 30 s), is refused in one sentence that says what to do.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llm_heatmap.errors import InputError

if TYPE_CHECKING:
    import torch

SAMPLE_TYPES = {1: np.uint8, 2: np.int16, 4: np.int32}  # bytes per sample -> PCM type (8-bit PCM is unsigned)


def reads_audio(model) -> bool:
    """Whether `model`'s encoder reads audio features (its main input is `input_features`: Whisper and kin)."""
    return getattr(model, "main_input_name", None) == "input_features"


def read_wav(path) -> tuple[np.ndarray, int]:
    """(float32 samples in [-1, 1], mixed to mono; sample rate) of a PCM WAV file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"--audio {path} {what}; give the path of a WAV file.")
    try:
        with wave.open(str(path), "rb") as file:
            width, channels, rate = file.getsampwidth(), file.getnchannels(), file.getframerate()
            frames = file.readframes(file.getnframes())
    except (wave.Error, EOFError) as error:
        raise InputError(f"--audio {path} is not a PCM WAV file ({error}); convert it, e.g. "
                         f"ffmpeg -i {path.name} -ar 16000 -ac 1 {path.stem}.wav") from None
    if width not in SAMPLE_TYPES:
        raise InputError(f"--audio {path} holds {8 * width}-bit samples; convert it to 16-bit PCM, e.g. "
                         f"ffmpeg -i {path.name} -ar 16000 -ac 1 -sample_fmt s16 {path.stem}.16bit.wav")
    samples = np.frombuffer(frames, dtype=SAMPLE_TYPES[width]).astype(np.float64)
    if width == 1:
        samples -= 128
    samples = samples.reshape(-1, channels).mean(-1) / float(2 ** (8 * width - 1))
    if not len(samples):
        raise InputError(f"--audio {path} holds no samples; give a recording.")
    return samples.astype(np.float32), rate


def audio_features(feature_extractor, samples: np.ndarray, rate: int, where: str = "the audio") -> torch.Tensor:
    """`input_features` ("1 mel frames") of `samples` at `rate`, as the model's own feature extractor makes them."""
    expected = int(feature_extractor.sampling_rate)
    if rate != expected:
        raise InputError(f"{where} is sampled at {rate} Hz, and the model's feature extractor reads {expected} Hz; "
                         f"resample it, e.g. ffmpeg -i IN.wav -ar {expected} -ac 1 OUT.wav")
    window = getattr(feature_extractor, "n_samples", None)
    if window and len(samples) > window:
        raise InputError(f"{where} lasts {len(samples) / rate:.1f} s, and the model's encoder reads {window / rate:g} s "
                         "at a time; cut it into pieces of that length.")
    return feature_extractor(samples, sampling_rate=rate, return_tensors="pt")["input_features"]


def load_feature_extractor(source, *, trust_remote_code: bool = False):
    """The feature extractor a local model directory ships (preprocessor_config.json), or None."""
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a folder without one
        return None
