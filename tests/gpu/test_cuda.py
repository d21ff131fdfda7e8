"""Real CUDA measurements (skipped without a CUDA device; CI has none).

Run on a GPU machine: ``PYTHONPATH=src python3 -m pytest tests/gpu -q``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vramfit.config import ModelSpec, RunSpec, Workload

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from vramfit.measure.train import measure_train  # noqa: E402

pytestmark = pytest.mark.gpu

TINY = ModelSpec(arch="llama", layers=2, hidden=256, kv_heads=2, vocab=1000)


def test_training_phases_are_measured() -> None:
    run = RunSpec(model=TINY, workload=Workload(batch=4, seq=256, precision="amp-bf16"))
    result = measure_train(run, steps=2)
    assert result.oom is False
    assert set(result.phases) == {"forward", "backward", "optimizer"}
    assert result.weights_bytes >= 4 * result.params  # fp32 master weights under AMP
    assert all(peak > result.weights_bytes for peak in result.phases.values())
    # AdamW state: two fp32 copies of the weights stay after the first step.
    assert result.phase_end["optimizer"] >= 3 * result.weights_bytes
    assert result.peak_allocated_bytes == max(result.phases.values())
    assert result.reserved_peak_bytes >= result.peak_allocated_bytes
    assert result.context_bytes > 0
    assert result.total_bytes >= result.context_bytes + result.peak_allocated_bytes // 2
    assert result.device_total_bytes > result.total_bytes


def test_inference_phases_are_measured() -> None:
    workload = Workload(mode="infer", batch=2, seq=128, gen_tokens=8, precision="bf16")
    result = measure_train(RunSpec(model=TINY, workload=workload))
    spec = TINY.resolved()
    assert spec.kv_heads and spec.head_dim
    # k and v, per layer: (batch, kv_heads, seq + gen_tokens, head_dim) in bf16
    cache_bytes = 2 * spec.layers * 2 * spec.kv_heads * (128 + 8) * spec.head_dim * 2
    assert result.phase_end["kv_cache"] - result.weights_bytes >= cache_bytes
    assert result.phases["prefill"] > result.phase_end["kv_cache"]
    assert result.phases["decode"] > 0


def test_oom_is_reported_and_memory_released() -> None:
    before = torch.cuda.memory_allocated()
    # 4M tokens of fp32 logits over a 50257 vocabulary: far beyond any GPU.
    spec = ModelSpec(arch="llama", layers=1, hidden=64, vocab=50257)
    run = RunSpec(model=spec, workload=Workload(batch=4096, seq=1024, precision="fp32"))
    result = measure_train(run, steps=1)
    assert result.oom is True
    assert result.reached == "step 1 forward"
    assert torch.cuda.memory_allocated() <= before + 64 * 2**20  # only library workspaces left


_CELLS = """
import dataclasses, json
from vramfit.measure.matmul import NOTEBOOK_CELLS, measure_matmul
cells = [measure_matmul(d, shape=s, batch=b) for d, s, b in NOTEBOOK_CELLS]
print(json.dumps([dataclasses.asdict(c) for c in cells]))
"""


def test_matmul_cells_match_the_prediction_exactly() -> None:
    # A fresh process, so no earlier test's cuBLASLt workspace is counted.
    done = subprocess.run(
        [sys.executable, "-c", _CELLS], capture_output=True, text=True, env=os.environ, check=True
    )
    cells = json.loads(done.stdout.strip().splitlines()[-1])
    for cell in cells:
        assert cell["allocated_bytes"] == cell["predicted_bytes"], cell
        assert cell["peak_bytes"] == cell["predicted_peak_bytes"], cell
        assert cell["workspace_bytes"] == cell["prediction"]["workspace"], cell
