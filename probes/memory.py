"""How much memory this process may still take, and the one check that a run's working set fits it.

The headroom is the smallest of the limits that can be read here:

- MemAvailable of /proc/meminfo (what the kernel can hand out without swapping);
- the cgroup's limit minus its usage (v2: `memory.max - memory.current`; v1: `memory.limit_in_bytes -
  memory.usage_in_bytes`), which is what containers and job schedulers enforce;
- the address-space limit (`RLIMIT_AS`, `ulimit -v`, `prlimit --as`) minus the address space this
  process has already mapped (`VmSize`), where an allocation fails long before memory runs out.

A run is refused when what it needs (the cube, the drawing canvas, the metrics' working set: each
named, so the message says where the memory goes) exceeds `MEMORY_SHARE` of that headroom, or an
explicit `max_bytes`, before anything of that size is allocated.
"""

from __future__ import annotations

import math
import resource
from pathlib import Path

from llm_heatmap.errors import InputError

# Refuse a run whose working set is above this share of the headroom.
MEMORY_SHARE = 0.8
_UNLIMITED = 1 << 60  # cgroup files write "max" (v2) or a page-rounded 2**63 (v1) for "no limit"
STREAM_ADVICE = ("stream it instead (consumers=[Downsampler(512)], keep=False), capture in fp16 (dtype=torch.float16), "
                 "or capture fewer layers (layers=[...])")


def size_text(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _meminfo(field: str, path: str = "/proc/meminfo") -> int | None:
    """A `kB` field of a /proc status file, in bytes."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_paths(proc: str = "/proc/self/cgroup") -> dict[str, str]:
    """{controller: path} of this process ("" for the unified v2 hierarchy)."""
    paths = {}
    try:
        for line in Path(proc).read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    except (OSError, ValueError):
        pass
    return paths


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cgroup's limit minus its usage (v2 or v1), or None without a limit."""
    paths = _cgroup_paths()
    candidates = []
    if "" in paths:  # v2: the process's own cgroup, else the namespace's root
        candidates += [(root / paths[""].lstrip("/"), "memory.max", "memory.current"), (root, "memory.max", "memory.current")]
    if "memory" in paths:  # v1
        v1 = root / "memory"
        candidates += [(v1 / paths["memory"].lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"),
                       (v1, "memory.limit_in_bytes", "memory.usage_in_bytes")]
    for folder, limit_file, usage_file in candidates:
        limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
        if limit is not None and usage is not None:
            return None if limit >= _UNLIMITED else max(0, limit - usage)
    return None


def _address_space_headroom() -> int | None:
    """RLIMIT_AS minus the address space already mapped, or None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = _meminfo("VmSize", "/proc/self/status") or 0
    return max(0, soft - mapped)


def headroom() -> tuple[int, str] | None:
    """(bytes this process may still allocate, which limit says so), or None where no limit can be read."""
    limits = [(_meminfo("MemAvailable"), "memory available"),
              (_cgroup_headroom(), "memory its cgroup limit leaves"),
              (_address_space_headroom(), "address space its limit (ulimit -v) leaves")]
    known = [(size, where) for size, where in limits if size is not None]
    return min(known) if known else None


def check_max_bytes(max_bytes) -> None:
    """`max_bytes` is None (use the headroom) or a number of bytes above 0."""
    if max_bytes is None:
        return
    number = isinstance(max_bytes, (int, float)) and not isinstance(max_bytes, bool)
    if not number or not math.isfinite(max_bytes) or max_bytes < 1:
        shown = size_text(max_bytes) if number and math.isfinite(max_bytes) else repr(max_bytes)
        raise InputError(f"max_bytes={shown} must be a size above 0; leave it out for {MEMORY_SHARE:.0%} of the "
                         "memory available.")


def memory_limit(max_bytes: int | None = None) -> tuple[int | None, str]:
    """(largest working set in bytes, where that limit comes from); None when no limit can be known."""
    check_max_bytes(max_bytes)
    if max_bytes is not None:
        return int(max_bytes), f"max_bytes={size_text(int(max_bytes))}"
    room = headroom()
    if room is None:
        return None, ""
    size, where = room
    return int(size * MEMORY_SHARE), f"{MEMORY_SHARE:.0%} of the {size_text(size)} of {where}"


def fits(needs: dict[str, int], max_bytes: int | None = None) -> bool:
    """Whether a working set of `needs` (bytes by what needs them) fits `max_bytes` or the headroom."""
    limit, _ = memory_limit(max_bytes)
    return limit is None or sum(needs.values()) <= limit


def check_fits(needs: dict[str, int], what: str, max_bytes: int | None = None, advice: str = STREAM_ADVICE) -> None:
    """Raise InputError naming the numbers and `advice` when `needs` does not fit (`fits`)."""
    limit, where = memory_limit(max_bytes)
    total = sum(needs.values())
    if limit is None or total <= limit:
        return
    parts = [f"{name} {size_text(size)}" for name, size in needs.items() if size]
    detail = f" ({' + '.join(parts)})" if len(parts) > 1 else ""
    raise InputError(f"{what} needs {size_text(total)}{detail}, more than {where}; {advice}.")


def cube_fits(size: int, max_bytes: int | None = None) -> bool:
    """Whether a cube of `size` bytes fits `max_bytes` (default: a share of the headroom)."""
    return fits({"cube": size}, max_bytes)


def check_cube_fits(size: int, num_tokens: int, max_bytes: int | None = None) -> None:
    """Raise InputError when a cube of `size` bytes would not fit `max_bytes` or the headroom."""
    check_fits({"cube": size}, f"the attention cube for {num_tokens} tokens", max_bytes)
