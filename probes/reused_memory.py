"""One allocation that a loop's blocks of different sizes are viewed from, instead of a tensor per block.

A fresh block-sized tensor per block (tens of MiB at long prompts) is handed back to the system when it
is freed (glibc maps allocations this large) and faulted in again at the next block; on the CPU that
costs a pass over the memory each time.
"""

from __future__ import annotations

import math

import torch


class ReusedMemory:
    """`view(shape, dtype, device)`: an uninitialised tensor over memory that later calls reuse; it grows
    (to at least `reserve` elements) only when a larger view, another dtype or another device is asked for.
    A view is valid until the next call."""

    def __init__(self):
        self._memory: torch.Tensor | None = None

    def view(self, shape, dtype: torch.dtype, device, reserve: int = 0) -> torch.Tensor:
        size = math.prod(shape)
        memory = self._memory
        if memory is None or memory.numel() < size or memory.dtype != dtype or memory.device != torch.device(device):
            memory = self._memory = torch.empty(max(size, reserve), dtype=dtype, device=device)
        return memory[:size].view(shape)
