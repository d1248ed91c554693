"""Maps of one head or layer: query-key maps, attention rollout, one query's attention over an image's patches."""
