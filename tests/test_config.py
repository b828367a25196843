"""fxopt/config.py owns every knob: nothing else reads the environment, and the README lists them all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fxopt import config

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_config_module_reads_the_environment():
    readers = []
    for folder in ("fxopt", "passes", "codegen"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "config.py" and folder == "fxopt":
                continue
            source = path.read_text()
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and getattr(
                        node.value, "id", None) == "os":
                    readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if "os.environ" in source and "_PREAMBLE" in source:  # generated-module source held in strings
                readers += [f"{path.relative_to(ROOT)} (a generated module's source)"]
    assert not readers, readers


def test_the_readme_lists_every_knob():
    readme = (ROOT / "README.md").read_text()
    missing = [knob.env for knob in config.KNOBS.values() if f"`{knob.env}`" not in readme]
    assert not missing


def test_values_parse_override_and_fall_back(monkeypatch):
    monkeypatch.delenv("FXOPT_AUTOTUNE", raising=False)
    monkeypatch.delenv("FXOPT_ATTN_AUTOTUNE", raising=False)
    assert config.get("attn_autotune") is False  # unset: falls back to FXOPT_AUTOTUNE's default
    monkeypatch.setenv("FXOPT_AUTOTUNE", "yes")
    assert config.get("attn_autotune") is True  # the family follows the global switch
    monkeypatch.setenv("FXOPT_ATTN_AUTOTUNE", "0")
    assert config.get("attn_autotune") is False  # ... unless its own variable is set
    with config.override(attn_autotune=True):
        assert config.get("attn_autotune") is True and config.is_set("attn_autotune")
    assert config.get("attn_autotune") is False  # the override ends with its block
    monkeypatch.setenv("FXOPT_DECODE_PREFETCH", "64")
    assert config.get("decode_prefetch") == 64
    monkeypatch.setenv("FXOPT_PROGRESS", "")
    assert config.get("progress") is None  # empty: decided by the CLI


@pytest.mark.parametrize("variable, value", [("FXOPT_TMA", "maybe"), ("FXOPT_DECODE_PREFETCH", "lots")])
def test_a_malformed_value_names_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    knob = next(k for k in config.KNOBS.values() if k.env == variable)
    with pytest.raises(ValueError, match=variable):
        config.get(knob.name)


def test_unknown_overrides_are_refused():
    with pytest.raises(KeyError, match="unknown fxopt knob"):
        with config.override(autotunes=True):
            pass
