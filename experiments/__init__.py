"""Analysis scripts that reproduce and extend the seed README's experiments; run them with `python -m`."""
