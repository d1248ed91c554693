"""Prompt files: TXT (one prompt per line), JSONL (`{"prompt": ..., "id": ..., "group": ...}` per line),
CSV or Parquet (a table with a `prompt` column and optional `id` and `group` columns).

JSONL records and table rows may also name an `image` (a path, relative paths resolved against the prompt
file's folder; the prompt may then be empty or left out, for a model that reads only images) and a
`target` (an encoder-decoder model's decoder text).

`read_prompts` returns `Prompt` records in file order; `column` names the field or column that
holds the text in JSONL, CSV and Parquet files. A prompt without an id gets its zero-based
position in the file as id, so a resumed or sharded batch names prompts the same way every time
it reads the same file.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llm_heatmap.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
TEXT_COLUMN = "prompt"


MIN_TOKENS = 2  # the per-head metrics and similarities need a row that attends to two keys
MAX_FILE_BYTES = 256 * 2**20  # a prompt file is read whole; 100k prompts of a paragraph each take ~60 MiB


@dataclass(frozen=True)
class Prompt:
    """One prompt of a file: its id, text, group, and where it stands in the file (`origin`, e.g.
    "line 4 of prompts.txt"), so a bad prompt can be named by both."""

    id: str
    text: str
    group: str | None = None
    origin: str | None = field(default=None, compare=False)
    image: str | None = None  # an image file the prompt goes with (JSONL field or column `image`), for vision models
    target: str | None = None  # an encoder-decoder's decoder text (JSONL field or column `target`)

    @property
    def where(self) -> str:
        return f"prompt '{self.id}'" + (f" ({self.origin})" if self.origin else "")


def check_prompt(text, where: str = "the prompt") -> str:
    """`text` if it is a non-empty string of Unicode characters, else an `InputError` naming `where`."""
    if not isinstance(text, str):
        raise InputError(f"{where} is {type(text).__name__}, not text; give the prompt as a string.")
    if not text.strip():
        raise InputError(f"{where} is empty; give a prompt with at least one non-space character.")
    return check_text(text, where)


def check_text(text: str, where: str) -> str:
    """`text` unless it holds a lone surrogate (a JSON escape like \\ud800, which no encoding can write)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(f"{where} holds a lone surrogate ({text[error.start]!a} at character {error.start}), which "
                         "is not a Unicode character; remove it or pair it.") from None
    return text


@contextmanager
def _reading(path: Path):
    """Turn the ways a prompt file can fail to open into one sentence each."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(f"prompt file {path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise InputError(f"prompt file {path} is a directory; pass a .txt, .jsonl, .csv or .parquet file.") from None
    except UnicodeDecodeError:
        raise InputError(f"prompt file {path} is not UTF-8 text; save it as UTF-8.") from None


def _too_large(path: Path) -> InputError:
    return InputError(f"prompt file {path} is larger than {MAX_FILE_BYTES // 2**20} MiB; split it into smaller files.")


def _read_text(path: Path) -> str:
    """The file's text, read up to `MAX_FILE_BYTES` (a device such as /dev/zero never ends)."""
    with _reading(path):
        try:
            with path.open("rb") as file:
                data = file.read(MAX_FILE_BYTES + 1)
        except (FileNotFoundError, IsADirectoryError):
            raise
        except OSError as error:
            raise InputError(f"prompt file {path} cannot be read ({error.strerror}); check its permissions.") from None
        if len(data) > MAX_FILE_BYTES:
            raise _too_large(path)
        return data.decode("utf-8")


def read_prompt_text(path: str | Path) -> str:
    """The whole file as one prompt (trailing newlines dropped)."""
    path = Path(path)
    return check_prompt(_read_text(path).rstrip("\r\n"), f"prompt file {path}")


def _lines(text: str) -> list[str]:
    """Lines split at \\n or \\r\\n only (str.splitlines also splits at form feeds, U+2028 and others)."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _from_txt(path: Path, text: str) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(_lines(text), start=1):
        check_prompt(line, f"line {number} of {path}")
        prompts.append(Prompt(id=str(len(prompts)), text=line, origin=f"line {number} of {path}"))
    return prompts


def _from_jsonl(path: Path, text: str, column: str) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(_lines(text), start=1):
        where = f"line {number} of {path}"
        if not line.strip():
            raise InputError(f"{where} is empty; remove blank lines from the JSONL file.")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where} is not valid JSON ({error.msg}); write one JSON object per line.") from None
        except RecursionError:
            raise InputError(f"{where} nests JSON too deeply to read; write flat objects like "
                             f'{{"{column}": "...", "id": "..."}}.') from None
        image = record.get("image") if isinstance(record, dict) else None
        if image is not None and record.get(column, "") == "":
            record = {**record, column: ""}  # an image alone, for a model that reads only images
        if not isinstance(record, dict) or column not in record:
            hint = f'objects like {{"{column}": "...", "id": "..."}}'
            if column == TEXT_COLUMN:
                raise InputError(f'{where} has no "{column}" field; write {hint}.')
            raise InputError(f'{where} has no "{column}" field; write {hint}, or pass column=NAME, the field that holds the prompt.')
        if not (image is not None and record[column] == ""):
            check_prompt(record[column], f'the "{column}" on {where}')
        prompt_id = check_text(str(record.get("id", len(prompts))), f'the "id" on {where}')
        group, target = record.get("group"), record.get("target")
        prompts.append(Prompt(id=prompt_id, text=record[column],
                              group=None if group is None else check_text(str(group), f'the "group" on {where}'),
                              origin=where, image=_image_path(path, image, f'the "image" on {where}'),
                              target=None if target is None else check_prompt(target, f'the "target" on {where}')))
    return prompts


def _image_path(prompt_file: Path, image, where: str) -> str | None:
    """An image named by a prompt, relative to the prompt file's folder, as a path that exists."""
    if image is None:
        return None
    path = prompt_file.parent / check_text(str(image), where)
    if not path.is_file():
        raise InputError(f"{where} names {path}, which does not exist; give the image's path relative to the prompt file.")
    return str(path)


def _read_table(path: Path):
    import pandas as pd

    with _reading(path):
        if path.stat().st_size > MAX_FILE_BYTES or not path.is_file():
            raise _too_large(path) if path.is_file() else InputError(
                f"prompt file {path} is not a regular file; pass a .csv or .parquet file.")
        try:
            if path.suffix.lower() == ".csv":
                # every cell as text: ids like "007" and prompts like "NA" stay as written
                return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
            return pd.read_parquet(path)
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
            raise
        except (OSError, ValueError) as error:
            kind = "CSV" if path.suffix.lower() == ".csv" else "Parquet"
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise InputError(f"prompt file {path} cannot be read as {kind} ({reason}); write it again.") from None


def _blank(value) -> bool:
    """An empty cell: None, pandas' NA, NaN or the empty string."""
    import pandas as pd

    return value is None or value is pd.NA or (isinstance(value, float) and value != value) or value == ""


def _cell_text(value) -> str:
    """A cell as text; whole numbers stored as floats (an integer column with gaps) without ".0"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _from_table(path: Path, column: str) -> list[Prompt]:
    import pandas as pd

    table = _read_table(path)
    if column not in table.columns:
        present = ", ".join(map(str, table.columns)) or "none"
        raise InputError(f"prompt file {path} has no column '{column}' (its columns: {present}); "
                         "pass column=NAME, the column that holds the prompts.")
    prompts = []
    for number, record in enumerate(table.to_dict("records"), start=1):
        where = f"row {number} of {path}"
        text, image, target = record[column], record.get("image"), record.get("target")
        if _blank(image) or not _blank(text):  # an image alone may leave the prompt empty
            check_prompt(None if text is None or text is pd.NA else text, f"the '{column}' of {where}")
        prompt_id, group = record.get("id"), record.get("group")
        prompts.append(Prompt(id=str(len(prompts)) if _blank(prompt_id) else check_text(_cell_text(prompt_id), f"the id of {where}"),
                              text="" if _blank(text) else text,
                              group=None if _blank(group) else check_text(_cell_text(group), f"the group of {where}"),
                              origin=where, image=None if _blank(image) else _image_path(path, image, f"the image of {where}"),
                              target=None if _blank(target) else check_prompt(_cell_text(target), f"the target of {where}")))
    return prompts


def read_prompts(path: str | Path, *, column: str = TEXT_COLUMN) -> list[Prompt]:
    """Prompts of a `.jsonl`/`.ndjson` file (JSON object per line), a `.csv` or `.parquet` table, or
    any other text file (line per prompt). `column`: the field or column holding the prompt text."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        prompts = _from_table(path, column)
    elif suffix in JSONL_SUFFIXES:
        prompts = _from_jsonl(path, _read_text(path), column)
    else:
        if column != TEXT_COLUMN:
            raise InputError(f"prompt file {path} holds one prompt per line, so column='{column}' does not apply; "
                             "leave it out, or pass a .jsonl, .csv or .parquet file.")
        prompts = _from_txt(path, _read_text(path))
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts; write one prompt per line.")
    seen: dict[str, int] = {}
    for position, prompt in enumerate(prompts):
        if prompt.id in seen:
            raise InputError(
                f"prompt file {path} uses id '{prompt.id}' twice (prompts {seen[prompt.id] + 1} and {position + 1}); make ids unique."
            )
        seen[prompt.id] = position
    return prompts


def prompt_fields(path: str | Path, names: list[str]) -> list[dict[str, str | None]]:
    """The fields `names` of every prompt of a JSONL, CSV or Parquet prompt file (in `read_prompts` order), as
    text (None where a prompt lacks one); a field that no prompt has is an `InputError`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        records = _read_table(path).to_dict("records")
    elif suffix in JSONL_SUFFIXES:
        records = [json.loads(line) for line in _lines(_read_text(path)) if line.strip()]
    else:
        raise InputError(f"prompt file {path} holds one prompt per line, so it has no field {names[0]!r}; pass a "
                         ".jsonl, .csv or .parquet file whose prompts carry it.")
    for name in names:
        if not any(isinstance(r, dict) and name in r for r in records):
            raise InputError(f"prompt file {path} has no field or column '{name}'; name one that its prompts carry.")
    return [{name: None if _blank(r.get(name)) else _cell_text(r.get(name)) for name in names} for r in records]


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` -> `(i, n)` with `0 <= i < n`."""
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise InputError(f"shard '{text}' is not of the form i/n (e.g. 0/4); give the shard index and count.") from None
    if count < 1 or not 0 <= index < count:
        raise InputError(f"shard '{text}' is out of range; use i/n with 0 <= i < n.")
    return index, count


def shard_prompts(prompts: list[Prompt], shard: tuple[int, int] | None) -> list[Prompt]:
    """The prompts of shard `(i, n)`: prompt k (file order) goes to shard `k % n`."""
    if shard is None:
        return list(prompts)
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise InputError(f"shard ({index}, {count}) is out of range; use 0 <= i < n.")
    return [prompt for k, prompt in enumerate(prompts) if k % count == index]


def encode(tokenizer, prompt: str, *, chat: bool = False) -> list[int]:
    """Token ids of `prompt` exactly as `capture_prompt` feeds them (`chat`: through the chat template)."""
    from llm_heatmap.probes.capture import encode_prompt

    return encode_prompt(tokenizer, prompt, chat=chat)[0][0].tolist()


def check_length(tokenizer, spec, prompt: str, *, chat: bool = False, where: str = "the prompt",
                 min_tokens: int = MIN_TOKENS) -> int:
    """The prompt's token count; `InputError` when the model's context (`spec.max_positions`) cannot hold it,
    or it has fewer than `min_tokens` (metrics and similarities need a row that attends to two keys)."""
    count = len(encode(tokenizer, check_prompt(prompt, where), chat=chat))
    if spec.max_positions and count > spec.max_positions:
        raise InputError(
            f"{where} has {count} tokens but the model's context holds {spec.max_positions}; shorten the prompt."
        )
    if count < min_tokens:
        raise InputError(f"{where} has {count} token{'s' * (count != 1)} on this model, and metrics need at least {MIN_TOKENS}; "
                         "give a longer prompt.")
    return count
