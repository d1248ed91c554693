"""Convert a `.gguf` file once into a Hugging Face directory, so later loads skip dequantizing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import struct
from pathlib import Path

from llm_heatmap.cache import cache_root
from llm_heatmap.errors import InputError

from .files import atomic_output

MARKER = "llm_heatmap_gguf.json"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _header_file_type(path: Path) -> int | None:
    """`general.file_type` from the key/value header (see `header_values`)."""
    value = header_values(path, {"general.file_type"}).get("general.file_type")
    return None if value is None else int(value)


def header_values(path: Path, keys: set[str]) -> dict:
    """The scalar `keys` found in the key/value header, each matched whole or as the end of a key after a dot
    (`block_count` finds `llama.block_count`), read without parsing the whole file; it stops once all are found.

    gguf.GGUFReader builds every field (a tokenizer's ~100k strings) and every tensor view,
    seconds per call; the conversion reads the file through transformers anyway.
    """
    found = {}
    with open(path, "rb") as file:
        def read(fmt):
            size = struct.calcsize(fmt)
            data = file.read(size)
            if len(data) != size:
                raise ValueError("the header ends early")
            return struct.unpack(fmt, data)

        def skip(kind):
            if kind == _STRING:
                file.seek(read("<Q")[0], 1)
            elif kind == _ARRAY:
                item, count = read("<IQ")
                if item in _SCALARS:
                    file.seek(struct.calcsize(_SCALARS[item]) * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            elif kind in _SCALARS:
                read("<" + _SCALARS[kind])
            else:
                raise ValueError(f"unknown value type {kind}")

        if file.read(4) != b"GGUF":
            raise ValueError("GGUF magic invalid")
        version, _, count = read("<IQQ")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        for _ in range(count):
            length = read("<Q")[0]
            if length > 1 << 16:
                raise ValueError("a header key is implausibly long")
            key = file.read(length).decode("utf-8", "replace")
            kind = read("<I")[0]
            wanted = next((k for k in keys if key == k or key.endswith("." + k)), None)
            if wanted is not None and kind in _SCALARS:
                found.setdefault(wanted, read("<" + _SCALARS[kind])[0])
            else:
                skip(kind)
            if keys <= found.keys():
                break
    return found


def _file_type_name(value: int) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"type {value}"


def gguf_file_type(path: Path) -> str:
    """The GGUF quantization name (e.g. `Q4_1`), read from the file's header."""
    import gguf

    try:
        value = _header_file_type(path)
    except (OSError, ValueError, struct.error) as error:
        raise InputError(
            f"GGUF file {path} cannot be read ({_first_line(error)}); check the file is complete and a GGUF model."
        ) from None
    if value is not None:
        return _file_type_name(value)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # the gguf reader raises many kinds on a corrupt file
        raise InputError(
            f"GGUF file {path} cannot be read ({_first_line(error)}); check the file is complete and a GGUF model."
        ) from None
    kinds = {t.tensor_type.name for t in reader.tensors}
    return "/".join(sorted(kinds))


def content_digest(path: Path) -> str:
    """The sha256 of the file's bytes, hashed once per (path, inode, size, mtime, ctime) and remembered in the cache
    (ctime, which no program sets, changes whenever the file is rewritten, even under a restored mtime).

    The conversion is keyed by content, not by where the file lies: the same GGUF installed in a second
    environment (a fresh virtual environment, a clean clone) reuses the first conversion instead of adding
    another copy of the dequantized weights.
    """
    stat = path.stat()
    seen = f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    record = cache_root() / "gguf" / "digests" / hashlib.sha256(seen.encode()).hexdigest()[:32]
    try:
        digest = record.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    with contextlib.suppress(OSError, InputError):  # a read-only or full cache only means hashing again next time
        record.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(record, force=True) as staging:
            staging.write_text(digest)
    return digest


def cache_dir_for(path: Path) -> Path:
    """The entry for `path`'s content as converted by this transformers (its GGUF reader makes the weights)."""
    import transformers

    key = f"{content_digest(path)}|transformers {transformers.__version__}"
    return cache_root() / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def converted_dir(path: Path, *, progress=None) -> Path:
    """The safetensors directory for `path`, converting on first use.

    The conversion is written through `files.atomic_output` (a temporary sibling directory renamed into
    place), so an interrupted conversion never leaves a half-written cache entry. Processes that need the
    same file at once (the ranks of a torchrun job, parallel test workers) convert it once: the others
    wait for the first and read its entry.
    """
    target = cache_dir_for(path)
    if (target / MARKER).exists():
        return target
    with _one_converter(path):
        if (target / MARKER).exists():  # converted by the process this one waited for
            return target
        return _convert(path, target, progress)


@contextlib.contextmanager
def _one_converter(path: Path):
    """An exclusive advisory lock on the GGUF file itself (no lock file to leave behind), where the system has
    one; released when the process ends, however it ends."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: concurrent conversions stay possible, each still atomic
        yield
        return
    with open(path, "rb") as source:
        try:
            fcntl.flock(source, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: as above
            pass
        yield


def _convert(path: Path, target: Path, progress) -> Path:
    file_type = gguf_file_type(path)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"converting {path.name} ({file_type}) to safetensors once, into {target}")
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as error:
        raise InputError(
            f"GGUF file {path} is not a model transformers can read ({_first_line(error)}); "
            "check the file is complete and use a GGUF of a supported architecture (Llama, Mistral, Qwen2/3, Gemma, ...)."
        ) from None
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    auto = AutoModelForCausalLM if causal or not config.architectures else AutoModel
    # transformers draws its own tqdm bar while dequantizing; without a progress callback it stays quiet
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            dequantized = auto.from_pretrained(str(path.parent), gguf_file=path.name, config=config)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except MemoryError:
        raise
    except Exception as error:  # truncated tensors, missing tokenizer fields, unknown tensor types ...
        raise InputError(
            f"GGUF file {path} could not be dequantized ({_first_line(error)}); check the file is complete "
            "and of an architecture transformers reads from GGUF."
        ) from None
    # A model loaded from GGUF refuses save_pretrained; a fresh one built from its config
    # and given its (already dequantized) weights saves as plain safetensors.
    config.quantization_config = None
    model = auto.from_config(config)
    model.load_state_dict(dequantized.state_dict())
    del dequantized
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not (target / MARKER).exists():
        shutil.rmtree(target)  # left by an older, non-atomic writer: never trust it
    try:
        with atomic_output(target, force=True) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / MARKER).write_text(json.dumps({"source": str(path.resolve()), "gguf_type": file_type}))
    except OSError:  # another process finished first: its directory stays
        if not (target / MARKER).exists():
            raise
    return target


def _marker(directory) -> dict:
    try:
        record = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def gguf_type_of(directory: Path) -> str | None:
    """The GGUF type a cache directory was converted from, or None for any other directory."""
    return _marker(directory).get("gguf_type")


def gguf_source_of(directory: Path) -> str | None:
    """The .gguf file a cache directory was converted from, or None for any other directory."""
    return _marker(directory).get("source")
