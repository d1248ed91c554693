"""Capturing attention patterns from a running model into an `AttentionCube`."""

from .cube import AttentionCube, attendable_mask

__all__ = ["AttentionCube", "attendable_mask"]
