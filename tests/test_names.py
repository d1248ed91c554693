"""Default output names never collide (issue 21, item 8)."""

from __future__ import annotations

from llm_heatmap.cli import build_parser


def _name(*argv):
    """The default name a command would write under, found without running it."""
    import pytest

    from llm_heatmap.cli import options

    args = build_parser().parse_args(list(argv))
    if args.command == "grid":
        return options.base_name(args, options.read_prompt(args)) + options.drawing_suffix(args)
    assert args.command == "qk-map"
    import llm_heatmap.cli.qk_map as qk

    captured = {}

    def claim(paths, force):  # stop before any work: only the name is wanted
        captured["path"] = list(paths)[0]
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("llm_heatmap.models.files.claim_outputs", claim)
        patch.setattr("llm_heatmap.analyses.bounds.check_projection", lambda method: None)  # umap need not be here
        with pytest.raises(KeyboardInterrupt):
            qk.run(args)
    return captured["path"].name


def test_qk_map_names_hold_head_group_and_method():
    names = {_name("qk-map", "The cat sat.", "--layer", "5"), _name("qk-map", "The cat sat.", "--layer", "5", "--head", "3"),
             _name("qk-map", "The cat sat.", "--layer", "5", "--group", "1"),
             _name("qk-map", "The cat sat.", "--layer", "5", "--method", "umap")}
    assert len(names) == 4


def test_prompts_with_the_same_first_words_get_different_names():
    first = "Tell me a very simple short story about a cat who lived in a tall house near the sea."
    second = "Tell me a very simple short story about a cat who lived in a tall house near the lake."
    assert _name("grid", first) != _name("grid", second)
    assert _name("grid", "Hello!") != _name("grid", "Hello?")
    assert _name("grid", "the sky is blue") == "smollm2-135m_the-sky-is-blue"  # plain prompts keep plain names
    assert _name("grid", "the sky is blue", "--chat") != _name("grid", "the sky is blue")


def test_drawing_options_go_into_the_name():
    plain = _name("grid", "the sky is blue")
    variants = {_name("grid", "the sky is blue", *extra) for extra in (
        ["--layers", "0-3"], ["--heads", "1"], ["--scale", "log"], ["--scale", "power", "--gamma", "0.25"],
        ["--sink", "mask"], ["--weighting", "norms"], ["--cmap", "magma"], ["--per-head-range"], ["--max-tokens", "64"])}
    assert len(variants) == 9 and plain not in variants
    assert _name("grid", "the sky is blue", "--layers", "0-3", "--scale", "log") == plain + ".L0-3.log"
