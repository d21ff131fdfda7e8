"""``vramfit measure --gpus N --tp T``'s code path on the CPU (no memory is measured): the
real DTensor plan, FSDP2 over it and the training loop run end to end under a fake process
group, so that a GPU run cannot die of a Python error; what cannot be measured is refused in
one line."""

from __future__ import annotations

import pytest

from vramfit.config import RunSpec
from vramfit.errors import VramfitError

TINY = {"arch": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128,
        "ffn": 176}


def _run(parallel: dict, model: dict | None = None, **workload: object) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": model or TINY,
            "workload": {"impl": "hf", "loop": "drops", "batch": 2, "seq": 16,
                         "optimizer": "adamw", **workload},
            "parallel": parallel,
        }
    )


@pytest.mark.parametrize(
    ("parallel", "workload"),
    [
        ({"gpus": 2, "tp": 2}, {"precision": "amp-bf16"}),
        ({"gpus": 4, "tp": 2, "sp": True, "fsdp": "full"},
         {"precision": "bf16", "checkpointing": "full"}),
    ],
    ids=["tp-amp", "fsdp-tp-sp-ckpt"],
)
def test_tp_measure_path_runs_on_cpu(parallel: dict, workload: dict) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch.distributed as dist

    from vramfit.measure.backend import CpuBackend
    from vramfit.measure.train import measure_train

    try:
        m = measure_train(_run(parallel, **workload), steps=2, backend=CpuBackend())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not m.oom
    assert [s["phase"] for s in m.steps[:3]] == ["forward", "backward", "optimizer"]
    assert any(n.startswith("communication is faked") for n in m.notes)


@pytest.mark.parametrize(
    ("parallel", "model", "message"),
    [
        ({"gpus": 4, "tp": 2, "ddp": True}, None, "measure runs FSDP2 full or shard-grad-op"),
        ({"gpus": 4, "tp": 2, "pp": 2}, None, "measure runs FSDP2 full or shard-grad-op"),
        ({"gpus": 4, "zero": 3}, None, "measure runs FSDP2 full or shard-grad-op"),
        ({"gpus": 2, "tp": 2},
         {"arch": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "vocab": 128},
         "measure --tp runs Llama-style models"),
    ],
)
def test_what_cannot_be_measured_is_refused(
    parallel: dict, model: dict | None, message: str
) -> None:
    from vramfit.measure.fsdp import check_fsdp_measurable

    with pytest.raises(VramfitError, match=message):
        check_fsdp_measurable(_run(parallel, model))
