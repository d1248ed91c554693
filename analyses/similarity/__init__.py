"""How alike heads attend: divergences between head patterns, KV-group similarity and its report, head maps."""
