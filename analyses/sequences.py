"""Batched cubes in analyses: every table function runs once per sequence of the batch."""

from __future__ import annotations

import functools

import pandas as pd


def per_sequence(table_function):
    """`table_function(cube, ...)` for one-sequence cubes -> the same for batched cubes too: the tables
    of `cube.item(i)` (padding removed) stacked, with the batch index in a leading `sequence` column."""

    @functools.wraps(table_function)
    def run(cube, *args, **kwargs):
        if not cube.batched:
            return table_function(cube, *args, **kwargs)
        tables = []
        for index in range(len(cube)):
            table = table_function(cube.item(index), *args, **kwargs)
            table.insert(0, "sequence", index)
            tables.append(table)
        return pd.concat(tables, ignore_index=True)

    return run
