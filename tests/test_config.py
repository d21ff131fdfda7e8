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
