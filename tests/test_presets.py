"""Every shipped preset validates and its parameter count matches the published figure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from vramfit.config import Preset, load_yaml, parse_packaged_yaml
from vramfit.errors import VramfitError
from vramfit.estimate.params import count_params
from vramfit.presets import (
    ALIASES,
    count_disagreement,
    get_preset,
    list_presets,
    preset_names,
    preset_params,
    preset_rows,
)

ROOT = Path(__file__).resolve().parents[1]
PRESET_FILES = sorted((ROOT / "presets").glob("*.yaml"))


def test_enough_presets_ship() -> None:
    assert len(PRESET_FILES) >= 25
    assert [p.name for p in list_presets()] == sorted(f.stem for f in PRESET_FILES)


@pytest.mark.parametrize("file", PRESET_FILES, ids=lambda f: f.stem)
def test_preset_validates_and_count_matches_published(file: Path) -> None:
    preset = load_yaml(file, Preset)
    assert preset.name == file.stem  # the lookup key is the file name
    assert preset.name == preset.name.lower()
    assert preset.source.startswith("https://")
    assert count_disagreement(preset) is None, count_disagreement(preset)


@pytest.mark.parametrize(
    ("name", "published"),
    [
        # exact counts published outside vramfit (see each preset's comment for the source)
        ("gpt2", 124_439_808),
        ("llama-2-7b", 6_738_415_616),
        ("llama-3.1-8b", 8_030_261_248),
        ("mistral-7b-v0.1", 7_241_732_096),
        ("mixtral-8x7b", 46_702_792_704),
        ("pythia-160m", 162_322_944),
        ("pythia-1b", 1_011_781_632),
    ],
)
def test_golden_exact_counts(name: str, published: int) -> None:
    preset = get_preset(name)
    assert preset.params_exact
    assert count_params(preset.model).total == published


def test_moe_active_params_match_model_cards() -> None:
    # Mixtral paper: 13B active (12.9B); Qwen1.5-MoE-A2.7B: 2.7B activated
    assert round(count_params(get_preset("mixtral-8x7b").model).active / 1e9, 1) == 12.9
    assert round(count_params(get_preset("qwen1.5-moe-a2.7b").model).active / 1e9, 1) == 2.7


@pytest.mark.parametrize(
    ("name", "params", "hidden"),
    [
        ("seed-500m", 500_000_000, 1024),
        ("seed-1b", 1_000_000_000, 1024),
        ("seed-2b", 2_000_000_000, 2048),
    ],
)
def test_seed_presets_are_the_notebook_examples(name: str, params: int, hidden: int) -> None:
    preset = get_preset(name)
    assert preset.model.params == params == preset.published_params == preset_params(preset)
    assert (preset.model.layers, preset.model.hidden) == (24, hidden)
    assert preset.workload is not None
    workload = preset.workload
    assert (workload.seq, workload.batch) == (128, 4)
    assert (workload.precision.value, workload.optimizer.value) == ("fp16", "adamw")


def test_required_presets_exist() -> None:
    names = {p.name for p in list_presets()}
    required = {
        "seed-500m", "seed-1b", "seed-2b", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
        "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.1-8b", "llama-3.1-70b",
        "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b-v0.1", "mixtral-8x7b",
        "mixtral-8x22b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b", "gemma-2-2b", "gemma-2-9b",
        "gemma-2-27b", "phi-3-mini-4k", "qwen1.5-moe-a2.7b",
    }  # fmt: skip
    assert required <= names


def test_aliases_resolve_to_presets_and_shadow_none() -> None:
    names = {p.name for p in list_presets()}
    assert not set(ALIASES) & names
    assert set(ALIASES.values()) <= names
    assert get_preset("llama-3-8b").name == "llama-3.1-8b"
    assert get_preset("llama-3-70b").name == "llama-3.1-70b"


@pytest.mark.parametrize("name", ["GPT2", "Llama-3-8B", " mistral-7b "])
def test_lookup_is_case_insensitive(name: str) -> None:
    assert get_preset(name).name == ALIASES.get(name.strip().lower(), name.strip().lower())


@pytest.mark.parametrize("file", PRESET_FILES, ids=lambda f: f.stem)
def test_shipped_files_read_the_same_with_libyaml(file: Path) -> None:
    # vramfit reads its own files with libyaml where PyYAML has it, users' files without
    text = file.read_text(encoding="utf-8")
    assert parse_packaged_yaml(text) == yaml.safe_load(text)


def test_lookup_by_file_finds_what_the_full_list_holds() -> None:
    # get_preset reads only the file named after the preset; list_presets reads them all
    for preset in list_presets():
        assert get_preset(preset.name.upper()) == preset


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "lama-2-7b",
            "unknown preset 'lama-2-7b'; did you mean: llama-2-7b, llama-2-70b, llama-3-70b?",
        ),
        (
            "gemma2-9b",
            "unknown preset 'gemma2-9b'; did you mean: gemma-2-9b, gemma-2-2b, gemma-7b?",
        ),
        ("zzz", "unknown preset 'zzz'; run 'vramfit presets' to list them"),
    ],
)
def test_unknown_preset_suggests(name: str, message: str) -> None:
    with pytest.raises(VramfitError) as info:
        get_preset(name)
    assert info.value.message == message
    assert info.value.field == "--preset"
    assert str(info.value) == f"--preset: {message}"


def test_preset_names_lists_names_and_aliases() -> None:
    names = preset_names()
    assert names == sorted(names)
    assert "gpt2" in names and "llama-3-8b" in names


def test_a_path_loads_a_preset_file(tmp_path: Path) -> None:
    file = tmp_path / "mine.yml"
    file.write_text((ROOT / "presets" / "gpt2.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    assert get_preset(str(file)) == get_preset("gpt2")


def test_a_missing_yaml_path_is_one_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(VramfitError) as info:
        get_preset(str(missing))
    assert str(info.value) == f"{missing}: no such file"


def test_preset_rows_are_json_ready() -> None:
    rows = preset_rows()
    assert [row["name"] for row in rows] == [p.name for p in list_presets()]
    assert all(
        set(row) == {"name", "title", "params", "published_params", "source"} for row in rows
    )
    gpt2 = next(row for row in rows if row["name"] == "gpt2")
    assert gpt2["params"] == gpt2["published_params"] == 124_439_808
    json.dumps(rows)


def test_every_subpackage_ships() -> None:
    """The package list in pyproject.toml is explicit (presets/ is mapped from outside src/):
    every package under src/vramfit must be listed, and presets/ must map to one."""
    tomllib = (
        pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.skip("3.11+")
    )
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]
    src = ROOT / "src"
    found = {".".join(init.parent.relative_to(src).parts) for init in src.rglob("__init__.py")}
    assert found <= set(config["packages"]), "add the new package to [tool.setuptools] packages"
    assert config["package-dir"]["vramfit.preset_files"] == "presets"
    assert "vramfit.preset_files" in config["packages"]
    assert config["package-data"]["vramfit.preset_files"] == ["*.yaml"]


def test_a_directory_is_not_a_preset(tmp_path) -> None:
    with pytest.raises(VramfitError) as info:
        get_preset(str(tmp_path))
    assert (
        str(info.value)
        == f"--preset: {str(tmp_path)!r} is a directory; give a preset name or a .yaml file"
    )
