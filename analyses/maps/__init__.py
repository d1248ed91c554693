"""Maps of one head or layer: query-key maps and attention rollout."""
