"""Library messages name API parameters (`pass force=True`); a CLI user reads the flags (`pass --force`).

`API_TO_FLAG` is the one place that knows which parameter each flag sets. An entry ending in "=True"
is a switch; one ending in "=" is followed by its value in the message ("max_tokens=1" -> "--max-tokens 1");
any other is a name or phrase that stands alone. Entries match only where no identifier character
precedes them (so "size=" leaves "max_size=" alone).
"""

from __future__ import annotations

import re

API_TO_FLAG = {
    "consumers=[Downsampler(512)], keep=False": "--stream",
    "stream=True": "--stream",
    "dtype=torch.float16": "--cube-dtype float16",
    "layers=[...]": "--layers 0-9",
    "max_pixels=": "--max-pixels ",
    "force=True": "--force",
    "resume=True": "--resume",
    "metrics_only=True": "--metrics-only",
    "chat=True": "--chat",
    "trust_remote_code=True": "--trust-remote-code",
    "value_norms=True": "--weighting norms",
    "value_norms=False": "--weighting weights",
    "queries_and_keys=True": "--qk",
    "out_dir": "--out",
    "column=": "--column ",
    "measure=": "--measure ",
    "method=": "--method ",
    "max_rows=": "--max-rows ",
    "top_k=": "--top-k ",
    "thumbnail_size=": "--thumbnail-size ",
    "n_resamples=": "--resamples ",
    "n_permutations=": "--permutations ",
    "seed=": "--seed ",
    "rank_by=": "--rank-by ",
    "probe_length=": "--probe-length ",
    "confidence=": "--confidence ",
    "max_bytes=": "--max-cube-mb ",
    "quantize=": "--quantize ",
    "device_map=": "--device ",
    "max_tokens=": "--max-tokens ",
    "gamma=": "--gamma ",
    "cmap": "--cmap",
    "cell_px=": "--cell-px ",
    "size=": "--size ",
    "pseudo_group_size=": "--pseudo-group-size ",
    "cell_px or size": "--cell-px or --size",
    "site=": "--site ",
    "an image was given": "--image was given",
    "drop the image": "drop --image",
    "give an image": "pass --image PATH",
    "a target was given": "--target was given",
    "drop the target": "drop --target",
    "give the target": "pass --target TEXT",
    "a prompt was given": "PROMPT was given",
    "drop the prompt": "drop PROMPT",
    "give a prompt": "give PROMPT",
}

_API_TEXT = re.compile("|".join(
    rf"(?<![\w.]){re.escape(api)}" + ("" if api.endswith("=") else r"(?!\w)")
    for api in sorted(API_TO_FLAG, key=len, reverse=True)))


def cli_message(message: str) -> str:
    """`message` with the API parameters it names written as the CLI's flags."""
    return _API_TEXT.sub(lambda match: API_TO_FLAG[match.group(0)], message)
