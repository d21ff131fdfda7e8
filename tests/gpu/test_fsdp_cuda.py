"""FSDP2 rank 0 on a real CUDA device under a fake process group (skipped without CUDA; CI has
none). Run on a GPU machine: ``PYTHONPATH=src python3 -m pytest tests/gpu -q``."""

from __future__ import annotations

import pytest

from vramfit.config import RunSpec

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from vramfit.estimate.core import estimate  # noqa: E402
from vramfit.measure.train import measure_train  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    ("mode", "offload"), [("full", "none"), ("shard-grad-op", "none"), ("full", "params")]
)
def test_fsdp2_rank0_matches_the_prediction(mode: str, offload: str) -> None:
    import torch.distributed as dist

    run = RunSpec.model_validate(
        {
            "model": {"arch": "llama", "layers": 4, "hidden": 1024, "heads": 16, "kv_heads": 4,
                      "vocab": 32000},
            "workload": {"impl": "hf", "loop": "drops", "optimizer": "adamw", "batch": 4,
                         "seq": 1024, "checkpointing": "full"},
            "parallel": {"gpus": 4, "fsdp": mode, "offload": offload},
        }
    )
    try:
        measured = measure_train(run, steps=3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    predicted = estimate(run)
    assert abs(predicted.peak_allocated_bytes / measured.peak_allocated_bytes - 1) < 0.02
