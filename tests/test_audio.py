"""Audio for a speech encoder-decoder (Whisper): WAV files read with the standard library, the model's own
feature extractor, a Whisper directory loaded with its speech head, and the CLI's `--audio` checked against
eager `output_attentions` of the same features."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from llm_heatmap.cli import main
from llm_heatmap.errors import InputError
from llm_heatmap.models.audio import audio_features, read_wav
from test_cli_sites import WORDS, word_tokenizer

RATE = 16000


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE, width: int = 2, channels: int = 1) -> Path:
    """`samples` (int, "n" or "n c") written as PCM."""
    kind = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    with wave.open(str(path), "wb") as file:
        file.setnchannels(channels)
        file.setsampwidth(width)
        file.setframerate(rate)
        file.writeframes(np.ascontiguousarray(samples, dtype=kind).tobytes())
    return path


def write_wav_bytes(path: Path, frames: bytes, width: int) -> Path:
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(width)
        file.setframerate(RATE)
        file.writeframes(frames)
    return path


def tone(seconds: float = 0.5, rate: int = RATE) -> np.ndarray:
    """A 440 Hz tone with a seeded hiss, 16-bit."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(0).standard_normal(len(t))
    return (8000 * np.sin(2 * np.pi * 440 * t) + 300 * noise).astype(np.int16)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    """A tiny random Whisper (2 + 2 layers, 4 heads, 8 mel bins, a 1 s window of 100 frames) with its feature
    extractor and a word tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("whisper")
    config = transformers.WhisperConfig(
        vocab_size=len(WORDS), d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=50,
        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    transformers.WhisperForConditionalGeneration(config).save_pretrained(folder)
    word_tokenizer(WORDS, eos="</s>").save_pretrained(folder)
    transformers.WhisperFeatureExtractor(feature_size=8, sampling_rate=RATE, hop_length=160, chunk_length=1,
                                         n_fft=400).save_pretrained(folder)
    return folder


def test_wav_files_read_as_mono_floats(tmp_path):
    samples = tone()
    mono, rate = read_wav(write_wav(tmp_path / "mono.wav", samples))
    assert rate == RATE and mono.dtype == np.float32
    np.testing.assert_array_equal(mono, samples / 32768.0)
    stereo = np.stack([samples, np.zeros_like(samples)], -1)
    mixed, _ = read_wav(write_wav(tmp_path / "stereo.wav", stereo, channels=2))
    np.testing.assert_allclose(mixed, samples / 65536.0, atol=1e-7)
    eight = (samples // 256 + 128).astype(np.uint8)
    unsigned, _ = read_wav(write_wav(tmp_path / "eight.wav", eight, width=1))
    np.testing.assert_array_equal(unsigned, (eight.astype(np.float64) - 128) / 128)


def test_audio_that_is_not_what_the_extractor_reads_is_refused(tmp_path, whisper_dir):
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(whisper_dir)
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(InputError, match="is not a PCM WAV file"):
        read_wav(tmp_path / "notes.wav")
    with pytest.raises(InputError, match="does not exist"):
        read_wav(tmp_path / "missing.wav")
    with pytest.raises(InputError, match="is a folder"):
        read_wav(tmp_path)
    with pytest.raises(InputError, match="holds 24-bit samples; convert it to 16-bit PCM"):
        read_wav(write_wav_bytes(tmp_path / "deep.wav", b"\0" * 30, width=3))
    with pytest.raises(InputError, match="holds no samples"):
        read_wav(write_wav_bytes(tmp_path / "empty.wav", b"", width=2))
    samples, rate = read_wav(write_wav(tmp_path / "slow.wav", tone(rate=8000), rate=8000))
    with pytest.raises(InputError, match="sampled at 8000 Hz, and the model's feature extractor reads 16000 Hz"):
        audio_features(extractor, samples, rate)
    samples, rate = read_wav(write_wav(tmp_path / "long.wav", tone(seconds=1.5)))
    with pytest.raises(InputError, match=r"lasts 1.5 s, and the model's encoder reads 1 s at a time"):
        audio_features(extractor, samples, rate)
    features = audio_features(extractor, *read_wav(write_wav(tmp_path / "ok.wav", tone())))
    assert features.shape == (1, 8, 100)


def test_a_whisper_directory_loads_with_its_speech_head(whisper_dir):
    from llm_heatmap.models import load_model, site_specs

    model, _, _ = load_model(whisper_dir)
    assert type(model).__name__ == "WhisperForConditionalGeneration"
    assert list(site_specs(model)) == ["encoder", "decoder", "cross"]


def test_grid_of_a_whisper_recording_equals_eager_attention_of_its_features(whisper_dir, tmp_path, capsys):
    """`grid --audio` draws the encoder over the recording's frames, the decoder over --target and the
    cross-attention between them; each saved cube equals eager `output_attentions` of the same features."""
    from llm_heatmap.probes import AttentionCube

    recording = write_wav(tmp_path / "hello.wav", tone())
    assert main(["grid", "--audio", str(recording), "--target", "the cat", "--model", str(whisper_dir),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    name = f"{whisper_dir.name}_to_the-cat_hello"
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {f"{name}.{site}.png" for site in ("encoder", "decoder", "cross")} <= files, files
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(whisper_dir)
    features = extractor(tone() / 32768.0, sampling_rate=RATE, return_tensors="pt")["input_features"]
    model = transformers.WhisperForConditionalGeneration.from_pretrained(whisper_dir, attn_implementation="eager")
    target = torch.tensor([[1, WORDS.index("the"), WORDS.index("cat")]])
    with torch.no_grad():
        out = model.eval()(input_features=features, decoder_input_ids=target, output_attentions=True)
    for site, eager in (("encoder", out.encoder_attentions), ("decoder", out.decoder_attentions),
                        ("cross", out.cross_attentions)):
        cube = AttentionCube.load(tmp_path / "out" / f"{name}.{site}.cube.safetensors")
        torch.testing.assert_close(cube.pattern, torch.stack(eager, 1)[0], atol=1e-5, rtol=0)
    cube = AttentionCube.load(tmp_path / "out" / f"{name}.cross.cube.safetensors")
    assert cube.key_axis.kind == "frames" and cube.num_keys == 50 and cube.query_tokens[1:] == ["the", "cat"]
    from llm_heatmap.viz.labels import prompt_text

    assert prompt_text(cube) == "50 audio frames"  # the title says what the source is, not f0 f1 f2 ...


def test_audio_goes_only_to_a_model_that_reads_it(whisper_dir, tmp_path, capsys):
    recording = write_wav(tmp_path / "hello.wav", tone())
    out = tmp_path / "out"
    assert main(["grid", "the cat", "--model", str(whisper_dir), "--out", str(out), "--quiet"]) == 2
    assert "reads audio (its encoder's input_features), not text; give a recording with --audio" in \
        capsys.readouterr().err
    assert main(["grid", "the cat", "--audio", str(recording), "--model", str(whisper_dir), "--out", str(out),
                 "--quiet"]) == 2
    assert "reads a recording as its source, and PROMPT was given as well; drop PROMPT" in capsys.readouterr().err
    slow = write_wav(tmp_path / "slow.wav", tone(rate=8000), rate=8000)
    assert main(["grid", "--audio", str(slow), "--model", str(whisper_dir), "--out", str(out), "--quiet"]) == 2
    assert "is sampled at 8000 Hz, and the model's feature extractor reads 16000 Hz" in capsys.readouterr().err
    (tmp_path / "notes.wav").write_text("not audio")
    assert main(["grid", "--audio", str(tmp_path / "notes.wav"), "--model", str(whisper_dir), "--out", str(out),
                 "--quiet"]) == 2
    assert "is not a PCM WAV file" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())


def test_audio_for_a_text_model_is_refused(tmp_path, capsys):
    from test_cli_sites import REVERSER

    recording = write_wav(tmp_path / "hello.wav", tone())
    assert main(["grid", "--audio", str(recording), "--model", str(REVERSER), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 2
    assert "audio was given, but BartForConditionalGeneration reads no audio; drop --audio." in capsys.readouterr().err


def test_without_a_target_the_decoder_reads_what_the_model_generates_within_its_positions(whisper_dir, tmp_path):
    """Greedy generation stops where the decoder's positions end (32 here, fewer than the 64 tokens allowed)."""
    from llm_heatmap.probes import AttentionCube

    recording = write_wav(tmp_path / "hello.wav", tone())
    assert main(["grid", "--audio", str(recording), "--model", str(whisper_dir), "--out", str(tmp_path / "out"),
                 "--site", "cross", "--quiet"]) == 0
    cube = AttentionCube.load(tmp_path / "out" / f"{whisper_dir.name}_hello.cross.cube.safetensors")
    assert 1 < len(cube.query_tokens) <= 32 and cube.num_keys == 50


def test_generate_follows_a_recordings_decode_steps(whisper_dir, tmp_path, capsys):
    from llm_heatmap.probes import AttentionCube

    recording = write_wav(tmp_path / "hello.wav", tone())
    out = tmp_path / "out"
    assert main(["generate", "--audio", str(recording), "--model", str(whisper_dir), "--out", str(out),
                 "--max-new-tokens", "4", "--quiet"]) == 0
    cross = AttentionCube.load(out / f"{whisper_dir.name}_hello.cross.decode.cube.safetensors")
    assert cross.num_keys == 50 and len(cross.query_tokens) == 4 and cross.key_axis.kind == "frames"
    torch.testing.assert_close(cross.pattern.sum(-1), torch.ones(2, 4, 4), atol=1e-5, rtol=0)
    assert main(["generate", "the cat", "--model", str(whisper_dir), "--out", str(tmp_path / "text"), "--quiet"]) == 2
    assert "reads audio (its encoder's input_features), not text" in capsys.readouterr().err
    assert not (tmp_path / "text").exists()


def test_qk_map_of_a_recordings_encoder_layer(whisper_dir, tmp_path):
    recording = write_wav(tmp_path / "hello.wav", tone())
    assert main(["qk-map", "--audio", str(recording), "--model", str(whisper_dir), "--site", "encoder", "--layer", "0",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{whisper_dir.name}_hello.encoder.qk-L0.pca.png"]
