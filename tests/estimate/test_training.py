"""Structure of the training step program: what it runs and what a block keeps."""

from __future__ import annotations

import pytest

from vramfit.config import ModelSpec, Workload
from vramfit.estimate.training import _Step, build_training_steps

# Pythia: GPT-2's fused q/k/v projection with rotary positions (the pythia presets)
PYTHIA = ModelSpec(
    arch="gpt2", layers=2, hidden=256, heads=4, vocab=1000, max_positions=2048, positions="rope"
)
GPT2 = ModelSpec(arch="gpt2", layers=2, hidden=256, heads=4, vocab=1000)


@pytest.mark.parametrize("attention", ["flash", "eager"])
def test_rotary_positions_are_applied_to_a_fused_projection(attention: str) -> None:
    step = _Step(
        PYTHIA, Workload(impl="reference", batch=2, seq=512, attention=attention), 0, False
    )
    step.build()
    names = {record.name for record in step.tape.records}
    assert {"block 0 q rotated", "block 0 k rotated"} <= names  # forward
    assert {"block 0 q unrotated gradient", "block 0 k unrotated gradient"} <= names  # backward
    assert all(
        record.end is not None or record.persistent or record.component == "gradients"
        for record in step.tape.records
    )


@pytest.mark.parametrize("attention", ["flash", "eager"])
def test_a_block_keeps_less_the_more_it_recomputes(attention: str) -> None:
    kept = {}
    for checkpointing in ("none", "selective", "full"):
        workload = Workload(
            impl="reference",
            batch=2,
            seq=512,
            precision="amp-bf16",
            attention=attention,
            checkpointing=checkpointing,
        )
        kept[checkpointing] = sum(build_training_steps(GPT2, workload, 0)[2].values())
    assert kept["full"] < kept["selective"] <= kept["none"]
    # under full checkpointing a block keeps its input: the fp32 residual stream
    assert kept["full"] == 2 * 512 * 256 * 4
