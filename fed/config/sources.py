"""Where a run configuration comes from: shipped TOML presets, ``--set key=value`` overrides, and
Flower's run-config, all flattened to dotted keys and handed to ``RunConfig.from_flat``, the one door
through which a config is typed and validated (``fed.config``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from fed.config import ConfigError, RunConfig

APP_KEYS: dict[str, str] = {"preset": "quickstart", "out": "runs", "name": "", "resume": ""}
"""Flower run-config keys that say which run to start rather than how it trains, with their declared defaults."""


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as TOML when it parses, else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. adapter.rank=16)")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> dotted keys, the shape Flower's run-config already has."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def preset_names() -> list[str]:
    """Names of the presets that ship in ``fed/config/presets``."""
    return sorted(
        p.name.removesuffix(".toml")
        for p in resources.files("fed.config.presets").iterdir()
        if p.name.endswith(".toml")
    )


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset's dotted keys, by shipped name or by path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        text = path.read_text()
    elif name_or_path in preset_names():
        text = resources.files("fed.config.presets").joinpath(f"{name_or_path}.toml").read_text()
    else:
        raise ConfigError(
            f"unknown preset {name_or_path!r}; shipped presets: {', '.join(preset_names())} "
            "(or give a path to a .toml file)"
        )
    return flatten(tomllib.loads(text))


def resolve(preset: str = "quickstart", overrides: Mapping[str, Any] | Sequence[str] = ()) -> RunConfig:
    """Preset, then overrides (``key=value`` strings or a mapping): the one way every entry point builds a config."""
    pairs = dict(overrides) if isinstance(overrides, Mapping) else dict(parse_override(t) for t in overrides)
    return RunConfig.from_flat({**load_preset(preset), **pairs})


def from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Flower's run-config (``preset`` plus any dotted key) -> RunConfig; unrelated keys are refused by name.

    Flower only accepts run-config keys declared in ``[tool.flwr.app.config]``, so pyproject.toml
    declares every key with ``""``, meaning "keep the preset's value".
    """
    values = {k: v for k, v in run_config.items() if v != ""}
    preset = str(values.get("preset", APP_KEYS["preset"]))
    return resolve(preset, {k: v for k, v in values.items() if k not in APP_KEYS})
