"""Writing result tables: CSV, Parquet, JSON or Markdown, chosen by extension or format name.

Every write goes to a temporary file in the destination folder and is renamed into place, so a
table on disk is either complete or absent; an existing file is kept unless `force=True`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from llm_heatmap.errors import InputError

from llm_heatmap.models.files import atomic_output

FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".json": "json",
    ".md": "md",
    ".markdown": "md",
}
FORMAT_NAMES = ("csv", "parquet", "json", "md")


def table_format(path: str | Path, format: str | None = None) -> str:
    """The format name for `path`: `format` when given, else the file extension's."""
    if format is not None:
        name = {"markdown": "md", "pq": "parquet"}.get(format.lower(), format.lower())
        if name not in FORMAT_NAMES:
            raise InputError(f"table format '{format}' is not known; use one of {', '.join(FORMAT_NAMES)}.")
        return name
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(
            f"output file {path} has no table extension; end it with .csv, .parquet, .json or .md."
        )
    return FORMATS[suffix]


def _markdown_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned, floats to 4 significant digits)."""
    columns = [str(c) for c in table.columns]
    numeric = [pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c]) for c in table.columns]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    for row in table.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(_markdown_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, path: str | Path, *, format: str | None = None, force: bool = False) -> Path:
    """Write `table` to `path` atomically and return the path.

    The format comes from `format` ("csv", "parquet", "json", "md") or the extension. JSON is a
    list of records, one object per row. Raises `InputError` when the file exists and `force` is
    False, or when the folder cannot be written.
    """
    path = Path(path)
    kind = table_format(path, format)
    table = table.reset_index(drop=True)
    with atomic_output(path, force=force) as temp:
        if kind == "csv":
            table.to_csv(temp, index=False)
        elif kind == "parquet":
            table.to_parquet(temp, index=False)
        elif kind == "json":
            temp.write_text(table.to_json(orient="records", indent=2, double_precision=10) + "\n")
        else:
            temp.write_text(to_markdown(table))
    return path


def read_table(path: str | Path, *, format: str | None = None) -> pd.DataFrame:
    """Read a table written by `write_table` (Markdown is write-only)."""
    path = Path(path)
    kind = table_format(path, format)
    if not path.is_file():
        raise InputError(f"table file {path} does not exist; pass a table written by llm-heatmap.")
    try:
        if kind == "csv":
            return pd.read_csv(path)
        if kind == "parquet":
            return pd.read_parquet(path)
        if kind == "json":
            return pd.read_json(path, orient="records")
    except (OSError, ValueError) as error:
        raise InputError(f"table file {path} cannot be read as {kind} ({error}); write it again.") from None
    raise InputError(f"table file {path} is Markdown, which llm-heatmap writes but does not read; pass a .csv, .parquet or .json.")
