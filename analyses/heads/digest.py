"""A five-line reading of a per-head metrics table, for the CLI's summary."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _top(metrics: pd.DataFrame, column: str, count: int = 3) -> str:
    best = metrics.nlargest(count, column)
    return ", ".join(f"L{int(r.layer)}H{int(r.head)} ({getattr(r, column):.2f})" for r in best.itertuples())


def digest_lines(metrics: pd.DataFrame, spec) -> list[str]:
    """Five lines: strongest sinks, most previous-token-like heads, sink-head count (and how many are
    no-op sinks, with value norms), entropy by layer third, and pattern classes."""
    thirds = np.array_split(np.sort(metrics["layer"].unique()), 3)
    entropy = " | ".join(
        f"{name} {metrics.loc[metrics['layer'].isin(layers), 'norm_entropy'].mean():.2f}"
        for name, layers in zip(("early", "middle", "late"), thirds) if len(layers))
    classes = metrics["pattern_class"].value_counts()
    sinks = f"sink heads (sink score >= 0.3 without query 0): {int(metrics['sink_head'].sum())} of {len(metrics)}"
    if "noop_sink" in metrics.columns:
        sinks += f", {int(metrics['noop_sink'].sum())} of them no-op (little written from the first token)"
    return [
        f"strongest sink heads (attention to the first token): {_top(metrics, 'sink_score_no_q0')}",
        f"most previous-token heads (mass on the token before): {_top(metrics, 'prev_token_mass')}",
        sinks,
        f"mean normalised entropy by layer third: {entropy}",
        "pattern classes: " + ", ".join(f"{count} {name}" for name, count in classes.items()),
    ]
