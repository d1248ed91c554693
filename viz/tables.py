"""Per-head tables for notebooks: one metric as a layer x head table, coloured cell by cell."""

from __future__ import annotations

from llm_heatmap.errors import InputError


def metric_table(table, metric: str, *, cmap: str = "viridis", digits: int = 3):
    """A pandas `Styler`: `metric` of a per-head table (columns layer, head, metric) with layers as rows,
    heads as columns and every cell coloured by its value."""
    missing = [column for column in ("layer", "head", metric) if column not in table.columns]
    if missing:
        raise InputError(f"the table has no column {missing[0]!r}; pass a per-head table (e.g. head_metrics(cube)) "
                         f"and one of its metric columns.")
    grid = table.pivot_table(index="layer", columns="head", values=metric, aggfunc="mean")
    grid.index = [f"L{layer}" for layer in grid.index]
    grid.columns = [f"H{head}" for head in grid.columns]
    return (grid.style.background_gradient(cmap=cmap, axis=None).format(precision=digits)
            .set_caption(f"{metric} per head"))
