"""Resumable prompt-set runs: the engine (claim, settings, shards and ranks, parts, barriers, progress, merge),
prompt files, atomic output files, and the batch run built on it."""
