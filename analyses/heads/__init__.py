"""Per-head metrics: the head-metrics table and its streaming reducer, TransformerLens head scores,
the induction and retrieval probes, pattern classes, and a prompt measured in one call."""
