"""config.json import: each fixture is a published config.json, each count a published figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vramfit.check import check_paths
from vramfit.config import Preset, load_yaml
from vramfit.errors import VramfitError
from vramfit.estimate.params import count_params
from vramfit.hf import SUPPORTED_MODEL_TYPES, preset_yaml_from_hf, spec_from_hf_config
from vramfit.presets import get_preset

HF = Path(__file__).resolve().parent / "fixtures" / "hf"
FOLDERS = sorted(p.name for p in HF.iterdir() if (p / "config.json").is_file())

# (folder, published total, exact?, preset with the same architecture)
PUBLISHED = [
    ("Llama-2-7b-hf", 6_738_415_616, True, "llama-2-7b"),
    ("Meta-Llama-3-8B", 8_030_261_248, True, "llama-3-8b"),
    ("Mistral-7B-v0.1", 7_241_732_096, True, "mistral-7b-v0.1"),
    ("Mixtral-8x7B-v0.1", 46_702_792_704, True, "mixtral-8x7b"),
    ("Qwen2.5-7B", 7_610_000_000, False, "qwen2.5-7b"),  # model card: 7.61B
    ("Qwen1.5-MoE-A2.7B", 14_300_000_000, False, "qwen1.5-moe-a2.7b"),  # card: 14.3B
    # Gemma papers, Table 1: non-embedding parameters + 256,000 x hidden embedding
    ("gemma-2b", 1_981_884_416 + 256_000 * 2048, True, "gemma-2b"),
    ("gemma-2-9b", 8_324_201_984 + 256_000 * 3584, True, "gemma-2-9b"),
    ("Phi-3-mini-4k-instruct", 3_820_000_000, False, "phi-3-mini-4k"),  # hub page: 3.82B
    ("gpt2", 124_439_808, True, "gpt2"),
    ("pythia-160m", 162_322_944, True, "pythia-160m"),  # Pythia README model table
    # Falcon-7B: the hub lists 7.22B, which counts the checkpoint's lm_head copy of the tied
    # 65,024 x 4,544 embedding a second time; the model holds 7,217,189,760 - 295,469,056.
    ("falcon-7b", 7_217_189_760 - 65_024 * 4_544, True, None),
]


def test_every_fixture_has_a_published_count() -> None:
    assert sorted(folder for folder, *_ in PUBLISHED) == FOLDERS


@pytest.mark.parametrize(("folder", "published", "exact", "preset"), PUBLISHED)
def test_count_matches_published(
    folder: str, published: int, exact: bool, preset: str | None
) -> None:
    total = count_params(spec_from_hf_config(HF / folder / "config.json")).total
    if exact:
        assert total == published
    else:
        assert abs(total - published) / published <= 0.005
    if preset is not None:
        assert total == count_params(get_preset(preset).model).total


def test_moe_active_counts() -> None:
    # Mixtral paper: 12.9B active; Qwen1.5-MoE-A2.7B: 2.7B activated
    mixtral = count_params(spec_from_hf_config(HF / "Mixtral-8x7B-v0.1"))
    assert round(mixtral.active / 1e9, 1) == 12.9
    qwen = count_params(spec_from_hf_config(HF / "Qwen1.5-MoE-A2.7B"))
    assert round(qwen.active / 1e9, 1) == 2.7


def test_mechanism_fields() -> None:
    mistral = spec_from_hf_config(HF / "Mistral-7B-v0.1")
    assert (mistral.kv_heads, mistral.sliding_window) == (8, 4096)
    gemma2 = spec_from_hf_config(HF / "gemma-2-9b")
    assert (gemma2.head_dim, gemma2.norms_per_layer, gemma2.sliding_window_every) == (256, 4, 2)
    assert gemma2.tied
    falcon = spec_from_hf_config(HF / "falcon-7b")
    assert (falcon.kv_heads, falcon.norms_per_layer, falcon.tied) == (1, 1, True)
    qwen_moe = spec_from_hf_config(HF / "Qwen1.5-MoE-A2.7B")
    assert (qwen_moe.experts, qwen_moe.shared_experts, qwen_moe.shared_expert_gate) == (60, 1, True)
    assert (
        spec_from_hf_config(HF / "Qwen2.5-7B").sliding_window is None
    )  # use_sliding_window: false


def _write(tmp_path: Path, data: object) -> Path:
    file = tmp_path / "config.json"
    file.write_text(json.dumps(data), encoding="utf-8")
    return file


def test_unsupported_model_type(tmp_path: Path) -> None:
    file = _write(tmp_path, {"model_type": "bert"})
    with pytest.raises(VramfitError) as info:
        spec_from_hf_config(file)
    supported = (
        "falcon, gemma, gemma2, gpt2, gpt_neox, llama, mistral, mixtral, phi3, qwen2, qwen2_moe"
    )
    assert info.value.message == f"unsupported model_type 'bert'; supported: {supported}"
    assert info.value.field == str(file)
    assert ", ".join(SUPPORTED_MODEL_TYPES) == supported


@pytest.mark.parametrize(
    ("edit", "field", "message"),
    [
        ({"hidden_size": None}, "hidden_size", "missing key"),
        ({"model_type": None}, "model_type", "missing key"),
        ({"num_hidden_layers": "32"}, "num_hidden_layers", "expected a positive integer, got '32'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers", "expected a positive integer, got 0"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings", "expected true or false, got 'no'"),
    ],
)
def test_bad_keys_name_the_key(tmp_path: Path, edit: dict, field: str, message: str) -> None:
    data = json.loads((HF / "Llama-2-7b-hf" / "config.json").read_text(encoding="utf-8"))
    for key, value in edit.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    file = _write(tmp_path, data)
    with pytest.raises(VramfitError) as info:
        spec_from_hf_config(file)
    assert str(info.value) == f"{file}: {field}: {message}"


def test_shape_error_names_the_file(tmp_path: Path) -> None:
    data = json.loads((HF / "Llama-2-7b-hf" / "config.json").read_text(encoding="utf-8"))
    file = _write(tmp_path, {**data, "num_key_value_heads": 5})
    with pytest.raises(VramfitError) as info:
        spec_from_hf_config(file)
    assert str(info.value) == f"{file}: (document): heads (32) is not a multiple of kv_heads (5)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "invalid JSON: Expecting property name enclosed in double quotes (line 1)"),
        ("[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_bad_json(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "config.json"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(VramfitError) as info:
        spec_from_hf_config(file)
    assert (info.value.field, info.value.message) == (str(file), message)


def test_missing_file_and_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(VramfitError) as info:
        spec_from_hf_config(tmp_path)
    assert str(info.value) == f"{tmp_path / 'config.json'}: no such file"
    with pytest.raises(VramfitError) as info:
        spec_from_hf_config(tmp_path / "nope.json")
    assert str(info.value) == f"{tmp_path / 'nope.json'}: no such file"


def test_mixed_dense_and_moe_layers_are_refused(tmp_path: Path) -> None:
    data = json.loads((HF / "Qwen1.5-MoE-A2.7B" / "config.json").read_text(encoding="utf-8"))
    file = _write(tmp_path, {**data, "decoder_sparse_step": 2})
    with pytest.raises(VramfitError, match="cannot be represented"):
        spec_from_hf_config(file)


def test_falcon_new_decoder_architecture(tmp_path: Path) -> None:
    # Falcon-40B's layout: 8 KV groups, ln_attn + ln_mlp per block
    file = _write(
        tmp_path,
        {
            "model_type": "falcon", "hidden_size": 8192, "num_attention_heads": 128,
            "num_hidden_layers": 60, "num_kv_heads": 8, "new_decoder_architecture": True,
            "parallel_attn": True, "bias": False, "vocab_size": 65024,
        },
    )  # fmt: skip
    spec = spec_from_hf_config(file)
    assert (spec.kv_heads, spec.norms_per_layer, spec.head_dim) == (8, 2, None)


@pytest.mark.parametrize("folder", FOLDERS)
def test_preset_yaml_round_trips(tmp_path: Path, folder: str) -> None:
    text = preset_yaml_from_hf(HF / folder)
    file = tmp_path / "imported.yaml"
    file.write_text(text, encoding="utf-8")
    preset = load_yaml(file, Preset)
    spec = spec_from_hf_config(HF / folder)
    assert count_params(preset.model) == count_params(spec)
    assert preset.model.resolved() == spec.resolved()
    assert preset.published_params == count_params(spec).total
    assert not preset.params_exact
    assert preset.source == str(HF / folder)
    assert check_paths([file]) == []


@pytest.mark.parametrize(
    ("folder", "name"),
    [("Llama-2-7b-hf", "llama-2-7b-hf"), ("Meta-Llama-3-8B", "meta-llama-3-8b")],
)
def test_imported_name(folder: str, name: str) -> None:
    text = preset_yaml_from_hf(HF / folder / "config.json")
    assert f"\nname: {name}\n" in text


def test_imported_name_falls_back(tmp_path: Path) -> None:
    data = json.loads((HF / "gpt2" / "config.json").read_text(encoding="utf-8"))
    folder = tmp_path / "My Model"
    folder.mkdir()
    _write(folder, {**data, "_name_or_path": ""})
    assert "\nname: my-model\n" in preset_yaml_from_hf(folder)
