"""Data-parallel runs under a launcher: which prompts this process takes, on which device, and a barrier.

`torchrun --nproc_per_node N` and `accelerate launch` start one process per device and tell each
its place through the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). When
WORLD_SIZE > 1, `launcher_ranks` hands that to accelerate's `PartialState`, which opens the
torch.distributed process group (gloo on CPUs, nccl on GPUs). The runs here need the group for
one thing only, `barrier()`: every rank writes its own per-prompt files, and rank 0 merges them
once all ranks have passed the barrier. Without a launcher everything is one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

from llm_heatmap.errors import InputError

# ranks finish their shares at different times and wait for each other at the barrier
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a launched run (`rank` of `world_size`, `local_rank` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    state: object | None = field(default=None, repr=False, compare=False)  # accelerate's PartialState

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items) -> list:
        """Item k goes to rank k % world_size (strided, so ranks get similar mixes of long and short prompts)."""
        return list(items)[self.rank::self.world_size]

    def barrier(self) -> None:
        """Wait until every rank arrives here (nothing to wait for in a one-process run)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def device(self) -> str | None:
        """The GPU of this process in a launched run on a machine with GPUs, else None: `cuda:LOCAL_RANK`,
        wrapped around the machine's GPUs when more processes than GPUs share it."""
        import torch

        if self.distributed and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return None

    def close(self) -> None:
        """Close the process group (torch warns about groups left open at exit)."""
        if self.state is not None:
            self.state.destroy_process_group()


def _environment_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"the environment variable {name}='{text}' is not a whole number; start the run with torchrun "
                         "or accelerate launch, which set it, or unset it for a one-process run.") from None


def launcher_world_size() -> int:
    """WORLD_SIZE as a launcher set it (1 without a launcher), checked against RANK."""
    world_size = _environment_int("WORLD_SIZE", 1)
    rank = _environment_int("RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"the environment says RANK={rank} of WORLD_SIZE={world_size}, which is out of range; "
                         "start the run with torchrun or accelerate launch, which set both.")
    return world_size


def launcher_ranks() -> Ranks:
    """The ranks a launcher set in the environment (module docstring); `Ranks()` when there is none."""
    if launcher_world_size() == 1:
        return Ranks()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
    return Ranks(rank=state.process_index, world_size=state.num_processes, local_rank=state.local_process_index,
                 state=state)
