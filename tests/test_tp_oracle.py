"""Tensor parallel against the real DTensor engine, on the CPU: what rank 0 holds and saves.

A fake process group of T ranks (``torch.testing._internal.distributed.fake_pg``) runs rank 0
of the real parallelized transformers model (``vramfit.measure.tp``: the plan ``vramfit
measure --tp`` runs) on CPU tensors; collectives move nothing but allocate their outputs.
Each case compares, against the estimate for the same layout:

- the parameters rank 0 holds: the local shards' bytes, against the weights the replicated
  layout replays (``tp_block``: heads / T, K/V heads / T, ffn / T; norms, embeddings and
  lm_head whole);
- what block 0 saves for backward (``saved_tensors_hooks``; a DTensor counts its local
  shard), as the multiset of (elements, dtype) of distinct storages, against what block 0's
  nodes save in the hf profile's graph for the per-rank shape, with sequence parallel's
  seq / T norms and gathered projection inputs.

Eager attention and no dropout, as in tests/test_hf_profile_oracle.py.
"""

from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.test_hf_profile_oracle import TORCH_DTYPE_NAMES  # noqa: E402

from vramfit.config import RunSpec  # noqa: E402
from vramfit.estimate import parallel  # noqa: E402
from vramfit.estimate.profiles import hf  # noqa: E402

B, S = 2, 16
TINY = {"arch": "llama", "layers": 2, "hidden": 64, "heads": 8, "kv_heads": 4, "vocab": 128,
        "ffn": 176}


def _run(tp: int, sp: bool, precision: str, fsdp: str = "none") -> RunSpec:
    dp = 2 if fsdp != "none" else 1
    return RunSpec.model_validate(
        {
            "model": TINY,
            "workload": {"impl": "hf", "loop": "drops", "batch": B, "seq": S,
                         "precision": precision, "attention": "eager", "optimizer": "adamw"},
            "parallel": {"gpus": tp * dp, "tp": tp, "sp": sp, "fsdp": fsdp},
        }
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _real(run: RunSpec) -> tuple[int, Counter]:
    """(parameter bytes of rank 0, what block 0 saves) of the real parallelized model."""
    import torch.distributed as dist

    from vramfit.measure.fsdp import build_fsdp_model

    torch.manual_seed(0)
    try:
        model = build_fsdp_model(torch, run.model.resolved(), run.workload, run.parallel, "cpu")
        model.train()
        locals_ = [_local(p) for p in model.parameters()]
        param_bytes = sum(t.untyped_storage().nbytes() for t in locals_)
        params = {t.untyped_storage().data_ptr() for t in locals_}
        active = {"on": False}
        seen: dict[int, tuple[int, str]] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            local = _local(t)
            ptr = local.untyped_storage().data_ptr()
            if active["on"] and ptr not in params:
                seen[ptr] = (local.untyped_storage().nbytes() // local.element_size(),
                             TORCH_DTYPE_NAMES[local.dtype])
            return t

        block = model.model.layers[0]
        block.register_forward_pre_hook(lambda *_: active.update(on=True))
        block.register_forward_hook(lambda *_: active.update(on=False))
        ids = torch.randint(0, run.model.vocab, (B, S))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return param_bytes, Counter(seen.values())


def _predicted(run: RunSpec) -> tuple[int, Counter]:
    par = run.parallel
    spec = parallel.tp_block(run.model.resolved(), par)
    _, model, _, _ = hf.build(
        spec, run.workload, grad=True, batch=B, seq=S, sp=par.tp if par.sp else 1
    )
    graph, _, _, _ = hf.build(
        spec, run.workload, grad=True, batch=B, seq=S, sp=par.tp if par.sp else 1
    )
    param_bytes = sum(p.nbytes for p in model.param_list)
    seen: dict[int, tuple[int, str]] = {}
    for node in graph.nodes:
        if not node.name.startswith("block 0 "):
            continue
        for t in node.saved:
            root = t.root
            if not root.leaf:
                seen[id(root)] = (root.numel, root.dtype.value)
    return param_bytes, Counter(seen.values())


@pytest.mark.parametrize(
    ("tp", "sp", "precision"),
    [(2, False, "fp32"), (4, False, "bf16"), (2, True, "fp32"), (4, True, "bf16")],
)
def test_rank0_holds_and_saves_what_dtensor_tp_does(tp: int, sp: bool, precision: str) -> None:
    run = _run(tp, sp, precision)
    (real_params, real_saved), (params, saved) = _real(run), _predicted(run)
    assert params == real_params
    assert saved == real_saved, (
        f"profile only: {saved - real_saved}; DTensor only: {real_saved - saved}"
    )
