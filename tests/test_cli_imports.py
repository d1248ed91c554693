"""The CLI stays light until a command runs, and speaks in flags where the library speaks in parameters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llm_heatmap.cli import command_modules, main
from llm_heatmap.cli.errors import cli_message

HEAVY = ("torch", "transformers", "matplotlib")
COMMAND_NAMES = ["grid", "render", "metrics", "attribute", "ablate", "generate", "compare", "kv-similarity", "qk-map",
                 "batch", "atlas", "models"]

# main(argv) in a fresh interpreter; prints the exit status and which heavy modules got imported.
PROBE = """
import json, sys
from llm_heatmap.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exit_:
    code = exit_.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)

LIGHT_CASES = {
    "--help": (["--help"], 0),
    "no command": ([], 2),
    **{f"{name} --help": ([name, "--help"], 0) for name in COMMAND_NAMES},
    "unknown flag": (["grid", "the sky", "--no-such-flag"], 2),
    "bad choice": (["grid", "the sky", "--scale", "cubic"], 2),
    "missing required option": (["batch", "prompts.txt"], 2),
    "atlas without --out": (["atlas", "prompts.txt"], 2),
}


def test_every_command_is_covered():
    assert sorted(c.__name__.rsplit(".", 1)[1].replace("_", "-") for c in command_modules()) == sorted(COMMAND_NAMES)


@pytest.mark.parametrize("case", LIGHT_CASES, ids=list(LIGHT_CASES))
def test_help_and_argument_errors_do_not_import_torch(case):
    argv, code = LIGHT_CASES[case]
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True, timeout=60)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report == {"code": code, "heavy": []}, result.stderr


@pytest.mark.parametrize("message, expected", [
    ("x.csv already exists; pass force=True to overwrite it.", "x.csv already exists; pass --force to overwrite it."),
    ("max_tokens=1 must be a whole number of at least 2.", "--max-tokens 1 must be a whole number of at least 2."),
    ("stream it instead (consumers=[Downsampler(512)], keep=False), or", "stream it instead (--stream), or"),
    ("give cell_px or size, not both", "give --cell-px or --size, not both"),
    ("cmap 'nope' is not a matplotlib colormap", "--cmap 'nope' is not a matplotlib colormap"),
    ("pseudo_group_size=0 must be at least 2", "--pseudo-group-size 0 must be at least 2"),
    ("group_size=2 and max_size=3 and keep=False", "group_size=2 and max_size=3 and keep=False"),
])
def test_api_parameters_become_flags(message, expected):
    assert cli_message(message) == expected


def test_library_says_force_true_and_the_cli_says_force(tmp_path, capsys):
    from llm_heatmap.models.files import check_writable
    from llm_heatmap.errors import InputError

    existing = tmp_path / "x.png"
    existing.write_text("keep me")
    with pytest.raises(InputError, match="pass force=True") as error:
        check_writable(existing, force=False)
    assert "--force" not in str(error.value)
    assert main(["render", str(tmp_path / "some.cube.safetensors"), "--out", str(tmp_path), "--name", "x"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and existing.read_text() == "keep me"


def test_library_says_max_tokens_and_the_cli_says_max_tokens_flag(tmp_path, capsys):
    from llm_heatmap.errors import InputError
    from llm_heatmap.viz import GridStyle

    with pytest.raises(InputError, match=r"^max_tokens=1 must be"):
        GridStyle(max_tokens=1)
    assert main(["render", str(tmp_path / "some.cube.safetensors"), "--out", str(tmp_path), "--max-tokens", "1"]) == 2
    assert capsys.readouterr().err == "llm-heatmap render: --max-tokens 1 must be a whole number of at least 2.\n"


def test_offered_dtypes_load():
    from llm_heatmap.cli import options
    from llm_heatmap.models import parse_dtype

    assert all(parse_dtype(name) is not None for name in options.DTYPES)
