"""Config models: checks across fields, and defaults that depend on the mode."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vramfit.config import ModelSpec, Precision, RunSpec, Workload

GPT2 = ModelSpec(arch="gpt2", layers=2, hidden=128, vocab=100, max_positions=32)


@pytest.mark.parametrize(
    "workload",
    [Workload(seq=33), Workload(mode="infer", seq=30, gen_tokens=3)],
)
def test_a_context_longer_than_the_learned_positions_is_refused(workload: Workload) -> None:
    with pytest.raises(ValidationError) as info:
        RunSpec(model=GPT2, workload=workload)
    assert "seq + gen_tokens (33) exceeds the model's 32 learned positions" in str(info.value)


def test_rope_models_take_any_context() -> None:
    RunSpec(model=ModelSpec(layers=2, hidden=128), workload=Workload(seq=100_000))


def test_inference_defaults_to_bf16_training_to_amp() -> None:
    assert Workload(mode="infer").precision is Precision.bf16
    assert Workload().precision is Precision.amp_bf16
    assert Workload(mode="infer", precision="fp32").precision is Precision.fp32


@pytest.mark.parametrize("field", ["gen_tokens", "kv_dtype"])
def test_inference_options_are_refused_in_training(field: str) -> None:
    value = 8 if field == "gen_tokens" else "fp16"
    with pytest.raises(ValidationError) as info:
        Workload(**{field: value})
    assert f"{field} only applies with mode infer" in str(info.value)


@pytest.mark.parametrize("optimizer", ["adamw-forloop", "adafactor", "sgd-momentum"])
def test_the_trainer_takes_only_the_optimizers_it_builds(optimizer: str) -> None:
    with pytest.raises(ValidationError) as info:
        Workload(optimizer=optimizer)  # impl hf, loop trainer: the defaults
    assert f"optimizer {optimizer} is not one the Trainer builds" in str(info.value)
    assert ("adafactor-hf" in str(info.value)) is (optimizer == "adafactor")
    Workload(optimizer=optimizer, loop="drops")
    Workload(optimizer="adamw-fused")


def test_int8_outliers_name_block_linears_and_are_fractions() -> None:
    from vramfit.errors import VramfitError

    model = {"arch": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 176,
             "vocab": 128}

    def run(quant: dict) -> RunSpec:
        return RunSpec.model_validate(
            {"model": model, "workload": {"impl": "hf", "mode": "infer", "quant": quant}}
        )

    ok = run({"kind": "int8", "int8_outliers": {"down_proj": 0.5, "mlp.up_proj": 0.0}})
    assert ok.workload.quant.int8_outliers == {"down_proj": 0.5, "mlp.up_proj": 0.0}
    for quant, field in [
        ({"kind": "int8", "int8_outliers": {"c_fc": 0.5}}, "int8_outliers"),
        ({"kind": "int8", "int8_outliers": {"down_proj": 1.5}}, "int8_outliers"),
        ({"kind": "nf4", "int8_outliers": {"down_proj": 0.5}}, "int8_outliers"),
    ]:
        with pytest.raises((ValueError, VramfitError)) as err:
            run(quant)
        assert field in str(err.value)
