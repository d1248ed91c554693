"""symbiotic_manifest.json: the seed asks every derived work to carry one; it must parse and be complete."""

from __future__ import annotations

import json
import re
import tomllib
from datetime import date
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((ROOT / "symbiotic_manifest.json").read_text(encoding="utf-8"))


def test_manifest_declares_identity(manifest):
    for key in ("identifier", "version", "description", "maintainer", "date", "license", "purpose"):
        assert isinstance(manifest.get(key), str) and manifest[key].strip(), f"manifest lacks {key}"
    assert manifest["identifier"] == "llm-heatmap"
    assert manifest["purpose"] == "research"
    assert manifest["license"] == "MIT"
    assert "llm-heatmap developers" in manifest["maintainer"]
    assert date.fromisoformat(manifest["date"]) == date(2026, 11, 26)
    assert len(manifest["description"].split()) >= 10


def test_manifest_version_matches_the_package(manifest):
    import llm_heatmap

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "llm_heatmap.__version__"}
    assert manifest["version"] == llm_heatmap.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", manifest["version"])


def test_manifest_names_the_seed_it_derives_from(manifest):
    seed = manifest["derived_from"]
    assert seed["name"] == "LLM Heatmap Visualizer"
    assert seed["author"] == "ronniross"
    assert seed["license"] == "MIT"


def test_manifest_declares_adherence(manifest):
    adherence = manifest["adherence"]
    assert adherence["principles"] is True
    assert "principles" in adherence["statement"]
