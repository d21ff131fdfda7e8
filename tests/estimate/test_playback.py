"""A steady training step plays the first step's forward and backward back instead of
simulating them again (``Tape.play``): it must be the step a second simulation makes, record
for record. Without a span to play (``Tape.span`` made to return None) every schedule simulates
its steady step as it did before playback existed."""

from __future__ import annotations

import pytest

from vramfit.config import RunSpec
from vramfit.estimate import parallel
from vramfit.estimate.overhead import cublas_workspace_bytes
from vramfit.estimate.profiles import reference
from vramfit.estimate.schedule import hf_training_steps
from vramfit.estimate.timeline import Tape, Timeline

SMALL = {"layers": 3, "hidden": 128, "vocab": 1000}
RUNS = [
    ({}, {}),
    ({"checkpointing": "full"}, {}),
    ({"lora": {"r": 8}, "quant": {"kind": "nf4"}, "precision": "bf16"}, {}),
    ({"optimizer": "adamw-forloop", "loop": "keeps-logits"}, {}),
    ({"impl": "reference"}, {}),
    ({"impl": "reference", "checkpointing": "selective", "precision": "fp32"}, {}),
    ({"impl": "reference", "checkpointing": "full", "optimizer": "adafactor"}, {}),
    ({}, {"gpus": 4, "fsdp": "full"}),
    ({}, {"gpus": 4, "fsdp": "full", "reshard_after_forward": 2}),
    ({}, {"gpus": 4, "fsdp": "full", "offload": "params"}),
    ({"lora": {"r": 8}, "quant": {"kind": "int8"}, "precision": "bf16"}, {}),
    ({"checkpointing": "full"}, {"gpus": 4, "zero": 3}),
    ({}, {"gpus": 4, "zero": 2}),
    ({}, {"gpus": 2, "ddp": True}),
    ({}, {"gpus": 2, "tp": 2}),
    ({"batch": 4}, {"gpus": 2, "pp": 2, "micro_batches": 4}),
]


def _steps(workload: dict, layout: dict) -> tuple[Timeline, Timeline]:
    run = RunSpec.model_validate(
        {"model": SMALL, "workload": {"seq": 64, **workload}, "parallel": layout}
    )
    spec, w = run.model.resolved(), run.workload
    workspace = cublas_workspace_bytes(None, (9, 0))
    if not run.parallel.single:
        layout_steps = parallel.training_steps(spec, w, run.parallel, workspace)
        return layout_steps.first, layout_steps.steady
    build = hf_training_steps if w.impl.value == "hf" else reference.training_steps
    first, steady, _ = build(spec, w, workspace)
    return first, steady


def _records(timeline: Timeline) -> list[tuple]:
    return [
        (a.name, a.component, a.sizes, a.start, a.end, a.persistent, a.part, a.stream)
        for a in timeline.allocations
    ]


@pytest.mark.parametrize(("workload", "layout"), RUNS, ids=str)
def test_the_played_back_steady_step_is_the_simulated_one(
    workload: dict, layout: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, played = _steps(workload, layout)
    monkeypatch.setattr(Tape, "span", lambda self, start, leave_out=(): None)
    _, simulated = _steps(workload, layout)
    assert played.points == simulated.points
    assert _records(played) == _records(simulated)
