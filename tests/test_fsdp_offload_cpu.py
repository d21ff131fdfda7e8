"""FSDP2 ``CPUOffloadPolicy`` (``--offload params``) against the real engine on the CPU.

A fake process group of 4 ranks runs rank 0 of ``vramfit measure``'s own model
(``build_fsdp_model`` with ``offload_policy=CPUOffloadPolicy()``) for a training step with
AdamW, and what it leaves on the CPU, the padded shards (``FSDPParam._sharded_param_data``),
the sharded gradients and AdamW's moments, is held against the estimate's ``cpu_bytes``.
AdamW's 0-dim ``step`` counters are on the CPU with or without offload, so neither side counts
them. On a CPU-only machine FSDP's device is the CPU itself: the copies of each shard to the
GPU and of each gradient back are no-ops there, so the GPU side of the replay (the shards'
orig-dtype copies on the all-gather copy-in stream, the GPU gradients freed after the copy)
is checked on a GPU only.
"""

from __future__ import annotations

import pytest

from vramfit.config import RunSpec
from vramfit.estimate.core import estimate

TINY = {"arch": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 130,
        "ffn": 176}


def _run(precision: str, gpus: int = 4) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": TINY,
            "workload": {"impl": "hf", "loop": "drops", "batch": 2, "seq": 16,
                         "optimizer": "adamw", "precision": precision},
            "parallel": {"gpus": gpus, "fsdp": "full", "offload": "params"},
        }
    )


def _storage_bytes(tensors: list) -> int:
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["amp-bf16", "bf16"])
def test_what_cpu_offload_keeps_on_the_cpu_is_cpu_bytes(precision: str) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch.distributed as dist

    from vramfit.measure.fsdp import build_fsdp_model, compute_workload

    run = _run(precision)
    try:
        model = build_fsdp_model(torch, run.model.resolved(), run.workload, run.parallel, "cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True, fused=False)
        ids = torch.randint(0, TINY["vocab"], (2, 16))
        assert compute_workload(run.workload, run.parallel).precision.value == (
            "bf16"  # the MixedPrecisionPolicy casts: no autocast
        )
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        fsdp_params = [
            fp
            for module in model.modules()
            if hasattr(module, "_get_fsdp_state")
            and (group := module._get_fsdp_state()._fsdp_param_group) is not None
            for fp in group.fsdp_params
        ]
        assert all(fp.offload_to_cpu for fp in fsdp_params)
        shards = _storage_bytes([fp._sharded_param_data for fp in fsdp_params])
        grads = _storage_bytes([p.grad.to_local() for p in model.parameters()])
        moments = _storage_bytes(
            [s.to_local() for st in optimizer.state.values()
             for k, s in st.items() if k != "step"]
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert shards + grads + moments == estimate(run).cpu_bytes


def test_offload_moves_the_shards_and_optimizer_off_the_gpu() -> None:
    """The replay under ``CPUOffloadPolicy``: no sharded weights or optimizer state on the
    GPU, and a lower peak than the GPU layout; nothing on the CPU without offload."""
    on_cpu = _run("amp-bf16", gpus=8)
    on_gpu = RunSpec.model_validate(
        {**on_cpu.model_dump(mode="json"),
         "parallel": {"gpus": 8, "fsdp": "full"}}
    )
    a, b = estimate(on_cpu), estimate(on_gpu)
    assert b.cpu_bytes == 0 < a.cpu_bytes
    assert a.peak_allocated_bytes < b.peak_allocated_bytes
    assert not any("CPUOffloadPolicy" in n for n in a.notes)
