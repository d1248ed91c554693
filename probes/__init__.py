"""Capturing attention patterns from a running model into an `AttentionCube`.

Names load on first use, so reading a cube file (`AttentionCube`) does not import transformers."""

from llm_heatmap.lazy import lazy_exports

_MODULES = {
    ".capture": ("CaptureOptions", "Probe", "capture", "capture_prompt", "estimate_cube_bytes"),
    ".cube": ("AttentionCube", "Pooling", "StreamPart"),
    ".decode": ("DecodeSteps", "capture_decode"),
    ".geometry": ("attendable_mask",),
    ".generate": ("capture_generate",),
    ".lens": ("capture_lens", "lens_spec"),
    ".sites": ("SiteCubes", "SiteProbe", "capture_sites"),
    ".stream": ("CubeConsumer", "Downsampler", "downsample", "replay"),
}

__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
__all__ = [name for names in _MODULES.values() for name in names]
