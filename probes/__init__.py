"""Capturing attention patterns from a running model into an `AttentionCube`."""

from .capture import Probe, capture, capture_prompt, estimate_cube_bytes
from .cube import AttentionCube, attendable_mask
from .generate import capture_generate
from .stream import CubeConsumer, Downsampler, downsample, replay

__all__ = ["AttentionCube", "CubeConsumer", "Downsampler", "Probe", "attendable_mask", "capture", "capture_generate",
           "capture_prompt", "downsample", "estimate_cube_bytes", "replay"]
