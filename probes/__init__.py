"""Capturing attention patterns from a running model into an `AttentionCube`."""

from .capture import CaptureOptions, Probe, capture, capture_prompt, estimate_cube_bytes
from .cube import AttentionCube, Pooling, StreamPart
from .decode import DecodeSteps, capture_decode
from .geometry import attendable_mask
from .generate import capture_generate
from .lens import capture_lens, lens_spec
from .sites import SiteCubes, SiteProbe, capture_sites
from .stream import CubeConsumer, Downsampler, downsample, replay

__all__ = ["AttentionCube", "CaptureOptions", "CubeConsumer", "Downsampler", "Pooling", "Probe", "StreamPart", "attendable_mask", "capture", "capture_decode", "capture_generate", "DecodeSteps",
           "capture_lens", "capture_sites", "SiteCubes", "SiteProbe",
           "capture_prompt", "downsample", "estimate_cube_bytes", "lens_spec", "replay"]
