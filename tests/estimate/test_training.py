"""Structure of the reference profile's training step: what it runs and what a block keeps."""

from __future__ import annotations

import pytest

from vramfit.config import ModelSpec, Workload
from vramfit.estimate.profiles.reference import training_steps

# Pythia: GPT-2's fused q/k/v projection with rotary positions (the pythia presets)
PYTHIA = ModelSpec(
    arch="gpt2", layers=2, hidden=256, heads=4, vocab=1000, max_positions=2048, positions="rope"
)
GPT2 = ModelSpec(arch="gpt2", layers=2, hidden=256, heads=4, vocab=1000)


@pytest.mark.parametrize("attention", ["flash", "eager"])
def test_rotary_positions_are_applied_to_a_fused_projection(attention: str) -> None:
    _, steady, _ = training_steps(
        PYTHIA, Workload(impl="reference", batch=2, seq=512, attention=attention), 0
    )
    names = {record.name for record in steady.allocations}
    assert {"block 0 q rotated", "block 0 k rotated"} <= names  # forward
    # backward: the rotated halves' gradients concatenated (SplitBackward0)
    assert {f"block 0 {x} chunk grad of block 0 {x} heads" for x in "qk"} <= names


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
        kept[checkpointing] = sum(training_steps(GPT2, workload, 0)[2].values())
    assert kept["full"] < kept["selective"] <= kept["none"]
    # under full checkpointing a block keeps its input: the fp32 residual stream
    assert kept["full"] == 2 * 512 * 256 * 4
