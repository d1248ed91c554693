"""Capturing attention patterns from a running model into an `AttentionCube`.

Names load on first use, and nothing here imports transformers before a capture starts, so reading a cube
file (`AttentionCube`) stays light. `.capture` is imported at once: it defines `capture`, which would
otherwise be shadowed by its own module once that is imported."""

from llm_heatmap.lazy import lazy_exports

from .capture import CaptureOptions, Probe, capture, capture_prompt, estimate_cube_bytes

_MODULES = {
    ".cube": ("AttentionCube", "Pooling", "StreamPart"),
    ".decode": ("DecodeSteps", "capture_decode"),
    ".decode_sites": ("SiteDecodeSteps", "capture_decode_sites"),
    ".geometry": ("attendable_mask",),
    ".generate": ("capture_generate",),
    ".lens": ("capture_lens", "lens_spec"),
    ".sites": ("SiteCubes", "SiteProbe", "capture_sites"),
    ".stream": ("CubeConsumer", "Downsampler", "downsample", "replay"),
}

__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
__all__ = ["CaptureOptions", "Probe", "capture", "capture_prompt", "estimate_cube_bytes",
           *(name for names in _MODULES.values() for name in names)]
