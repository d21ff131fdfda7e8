"""Named model presets: the YAML files in the top-level ``presets/`` folder.

The folder ships inside the wheel as the data-only package ``vramfit.preset_files`` (see
``[tool.setuptools]`` in pyproject.toml) and is read with ``importlib.resources``. Each file is a
``Preset``; its ``name`` is the lookup key. A few other common names resolve through
``ALIASES``: Preset has no alias field, and an alias is a property of the lookup, not of the
architecture.
"""

from __future__ import annotations

import difflib
import functools
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vramfit.config import Preset, load_yaml
from vramfit.errors import VramfitError, shown
from vramfit.estimate.params import count_params

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PRESET_PACKAGE = "vramfit.preset_files"

# A rounded published figure ("7.61B") must agree with the derived count to 0.5%.
ROUNDED_TOLERANCE = 0.005

# alias -> preset name. Only for names that denote the same parameter count.
ALIASES: dict[str, str] = {
    # Llama 3 and 3.1 share the architecture; 3.1 changes RoPE scaling and context only.
    "llama-3-8b": "llama-3.1-8b",
    "llama-3-70b": "llama-3.1-70b",
    "gpt2-small": "gpt2",
    "mistral-7b": "mistral-7b-v0.1",
    "phi-3-mini": "phi-3-mini-4k",
}


def _preset_dir() -> Traversable:
    try:
        return resources.files(PRESET_PACKAGE)
    except ModuleNotFoundError:
        # Editable installs: setuptools' editable finder does not resolve a data-only package
        # (no __init__.py) mapped from outside src/, and installs made before the mapping do not
        # know it. Either way this is a checkout, whose presets/ sits two levels above
        # src/vramfit/.
        checkout = Path(__file__).resolve().parents[2] / "presets"
        if checkout.is_dir():
            return checkout
        raise VramfitError(
            "the preset files are missing from this installation; reinstall vramfit",
            field="--preset",
        ) from None


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[Preset, ...]:
    loaded = []
    for entry in _preset_dir().iterdir():
        if entry.is_file() and entry.name.endswith((".yaml", ".yml")):
            with resources.as_file(entry) as path:
                loaded.append(load_yaml(path, Preset, packaged=True))
    return tuple(sorted(loaded, key=lambda preset: preset.name))


@functools.cache
def _load_one(key: str) -> Preset | None:
    """The shipped preset called ``key`` read from its own file, or None when no file has that
    name. Each file is named after its preset (tests/test_presets.py holds that), so a lookup
    need not parse all ~30 files (~60 ms in PyYAML's pure-Python parser)."""
    entry = _preset_dir().joinpath(f"{key}.yaml")
    try:
        if not entry.is_file():
            return None
    except (OSError, ValueError):  # a name too long for the file system (in bytes), a NUL
        return None
    with resources.as_file(entry) as path:
        preset = load_yaml(path, Preset, packaged=True)
    return preset if preset.name.lower() == key else None


def list_presets() -> list[Preset]:
    """Every shipped preset, sorted by name."""
    return list(_load_all())


def preset_names() -> list[str]:
    """Every name ``get_preset`` accepts without a path: preset names and aliases, sorted."""
    return sorted([preset.name for preset in _load_all()] + list(ALIASES))


def _exists_as(name: str, kind: str) -> bool:
    try:
        return Path(name).is_file() if kind == "file" else Path(name).is_dir()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _is_path(name: str) -> bool:
    return name.lower().endswith((".yaml", ".yml")) or "/" in name or _exists_as(name, "file")


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive; aliases allowed), or the preset file at
    ``name`` when it ends in .yaml/.yml, contains a ``/`` or names an existing file (read with
    ``config.read_yaml``: regular files only, bounded).

    Raises VramfitError (field ``--preset``) with close matches for an unknown name.
    """
    if not name.isprintable():
        raise VramfitError(
            f"unknown preset {shown(name)}: a name has no control characters", field="--preset"
        )
    if _exists_as(name, "dir"):
        raise VramfitError(
            f"{shown(name)} is a directory; give a preset name or a .yaml file", field="--preset"
        )
    if _is_path(name):
        return load_yaml(Path(name), Preset)
    key = name.strip().lower()[:200]  # a preset name is short; difflib below is quadratic
    key = ALIASES.get(key, key)
    found = _load_one(key)
    if found is not None:
        return found
    by_name = {preset.name.lower(): preset for preset in _load_all()}
    if key in by_name:
        return by_name[key]
    matches = difflib.get_close_matches(key, preset_names(), n=3, cutoff=0.6)
    hint = (
        f"did you mean: {', '.join(matches)}?" if matches else "run 'vramfit presets' to list them"
    )
    raise VramfitError(f"unknown preset {shown(name)}; {hint}", field="--preset")


def preset_params(preset: Preset) -> int:
    """The preset's parameter count: ``model.params`` when declared (the seed examples),
    else the count derived from the architecture."""
    if preset.model.params is not None:
        return preset.model.params
    return count_params(preset.model).total


def count_disagreement(preset: Preset) -> str | None:
    """Why the preset's count disagrees with ``published_params``, or None when it agrees:
    exactly when ``params_exact``, else within ``ROUNDED_TOLERANCE``."""
    derived, published = preset_params(preset), preset.published_params
    if preset.params_exact:
        if derived == published:
            return None
        return f"model has {derived:,} parameters, published {published:,} (params_exact: true)"
    off = abs(derived - published) / published
    if off <= ROUNDED_TOLERANCE:
        return None
    return (
        f"model has {derived:,} parameters, published {published:,}: "
        f"{off:.2%} apart, more than {ROUNDED_TOLERANCE:.1%}"
    )


def preset_rows() -> list[dict[str, Any]]:
    """One JSON-ready dict per preset: name, title, params, published_params, source."""
    return [
        {
            "name": preset.name,
            "title": preset.title,
            "params": preset_params(preset),
            "published_params": preset.published_params,
            "source": preset.source,
        }
        for preset in _load_all()
    ]
