"""The names of the step's points and tensors, which the output quotes ("peak at backward:
block 3 ..."): each says its block once."""

from __future__ import annotations

import re

import pytest

from vramfit.config import ModelSpec, Workload
from vramfit.estimate.profiles import reference
from vramfit.estimate.schedule import hf_inference, hf_training_steps

TWICE = re.compile(r"block (\d+) block \1 ")
LLAMA = ModelSpec(arch="llama", layers=2, hidden=256, heads=4, kv_heads=2, vocab=100)


@pytest.mark.parametrize(
    "build, workload",
    [
        # autocast's casts of activations (a decode step's fp32 cache, the rotated queries)
        (hf_inference, {"mode": "infer", "seq": 64, "gen_tokens": 3, "precision": "amp-fp16"}),
        (hf_training_steps, {"seq": 64, "precision": "amp-bf16", "attention": "eager"}),
        # the reference program's 16-bit probabilities under AMP
        (reference.inference, {"mode": "infer", "seq": 64, "impl": "reference",
                               "precision": "amp-fp16", "attention": "eager"}),
        # its repeat_kv of grouped keys and values, forward and backward
        (reference.training_steps, {"seq": 64, "impl": "reference", "precision": "amp-bf16"}),
    ],
)
def test_no_name_says_its_block_twice(build, workload) -> None:  # noqa: ANN001
    w = Workload(batch=1, **workload)
    built = build(LLAMA.resolved(), w, 0)
    timelines = built[:2] if isinstance(built, tuple) else (built,)
    for timeline in timelines:
        names = [p for _, p in timeline.points] + [a.name for a in timeline.allocations]
        assert any(" to " in n and n.startswith("block ") for n in names)  # casts are there
        assert [n for n in names if TWICE.search(n)] == []
