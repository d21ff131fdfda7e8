"""Tensor parallel against the real DTensor engine, on the CPU: what rank 0 holds, saves and
peaks at.

A fake process group of T ranks (``torch.testing._internal.distributed.fake_pg``) runs rank 0
of the real parallelized transformers model (``vramfit.measure.tp``: the plan ``vramfit
measure --tp`` runs) on CPU tensors; collectives move nothing but allocate their outputs.
Each case runs one training forward and backward and compares, against the estimate for the
same layout:

- the parameters rank 0 holds: the local shards' bytes, against the weights the replicated
  layout replays (``tp_block``: heads / T, K/V heads / T, ffn / T; norms, embeddings and
  lm_head whole);
- without checkpointing, what block 0 saves for backward (``saved_tensors_hooks``; a
  DTensor counts its local shard), as the multiset of (elements, dtype) of distinct
  storages, against what block 0's nodes save in the hf profile's graph for the per-rank shape;
- the peak of the bytes that the step's ops made and that are still referenced (a dispatch
  mode, as in tests/test_hf_inference_oracle.py; a DTensor counts its local shard, a
  collective's output its elements), against the peak of the profile's graph replayed onto
  a tape. DTensor's own mechanisms decide it: the all-reduce that copies each colwise
  projection's input gradient, the rowwise output's all-reduce, the norms' ``from_local``
  views that keep their input gradient apart from the residual's.

Eager attention and no dropout, as in tests/test_hf_profile_oracle.py. Under full
checkpointing with sequence parallel, layer 0's split of the embeddings runs inside its
checkpoint, which keeps the full embeddings to that layer's backward.
"""

from __future__ import annotations

import weakref
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.test_hf_profile_oracle import TORCH_DTYPE_NAMES  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from vramfit.config import RunSpec  # noqa: E402
from vramfit.estimate import parallel  # noqa: E402
from vramfit.estimate.graph import end_forward, run_backward, run_forward  # noqa: E402
from vramfit.estimate.profiles import hf  # noqa: E402
from vramfit.estimate.timeline import Tape  # noqa: E402

B, S = 2, 16
MODEL = {"arch": "llama", "layers": 3, "hidden": 256, "heads": 8, "kv_heads": 4, "vocab": 64,
         "ffn": 704}
SLACK = 256  # 0-dim constants and the int64 positions, which the profile omits


def _run(tp: int, sp: bool, precision: str, checkpointing: str) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": MODEL,
            "workload": {"impl": "hf", "loop": "drops", "batch": B, "seq": S,
                         "precision": precision, "attention": "eager", "optimizer": "adamw",
                         "checkpointing": checkpointing},
            "parallel": {"gpus": tp, "tp": tp, "sp": sp},
        }
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return getattr(t, "elem", t)  # a functional collective's AsyncCollectiveTensor


class _Live(TorchDispatchMode):
    """Bytes of the storages ops made that are still referenced, and their peak."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.live: dict[object, int] = {}
        self.peak = 0
        self.skip = skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor):
                continue
            t = _local(t)
            try:
                storage = t.untyped_storage()
                key: object = storage.data_ptr()
                owner, nbytes = storage, storage.nbytes()
            except RuntimeError:  # a collective's output not yet waited on
                key, owner, nbytes = ("tensor", id(t)), t, t.numel() * t.element_size()
            if key and key not in self.live and key not in self.skip:
                self.live[key] = nbytes
                weakref.finalize(owner, self.live.pop, key, None)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _real(run: RunSpec) -> tuple[int, Counter, int]:
    """(parameter bytes, what block 0 saves, peak live bytes) of rank 0 of the real model."""
    import torch.distributed as dist

    from vramfit.measure.fsdp import build_fsdp_model

    torch.manual_seed(0)
    try:
        model = build_fsdp_model(torch, run.model.resolved(), run.workload, run.parallel, "cpu")
        model.train()
        held = [_local(t) for t in (*model.parameters(), *model.buffers())]
        param_bytes = sum(_local(p).untyped_storage().nbytes() for p in model.parameters())
        params = {t.untyped_storage().data_ptr() for t in held}
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
        mode = _Live(params | {ids.untyped_storage().data_ptr()})
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
            loss = model(input_ids=ids, labels=ids).loss
            active["on"] = False  # the recompute under checkpointing packs again
            loss.backward()
            del loss
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return param_bytes, Counter(seen.values()), mode.peak


def _predicted(run: RunSpec) -> tuple[int, Counter, int]:
    par = run.parallel
    spec = parallel.tp_block(run.model.resolved(), par)
    graph, model, _, loss = hf.build(
        spec, run.workload, grad=True, batch=B, seq=S, sp=par.tp if par.sp else 1, tp=par.tp
    )
    assert loss is not None
    param_bytes = sum(p.nbytes for p in model.param_list)
    seen: dict[int, tuple[int, str]] = {}
    for node in graph.nodes:
        if not node.name.startswith("block 0 ") or "(recompute)" in node.name:
            continue
        for t in node.saved:
            root = t.root
            if not root.leaf:
                seen[id(root)] = (root.numel, root.dtype.value)
    tape = Tape()
    tape.op("start")
    sim = run_forward(graph, tape)
    end_forward(sim)
    tape.phase = "backward"
    run_backward(sim, loss)
    return param_bytes, Counter(seen.values()), max(tape.finish().live_bytes())


@pytest.mark.parametrize(
    ("tp", "sp", "precision", "checkpointing"),
    [
        (2, False, "fp32", "none"),
        (2, True, "fp32", "none"),
        (2, True, "fp32", "full"),
        pytest.param(4, False, "bf16", "full", marks=pytest.mark.slow),
    ],
)
def test_rank0_holds_saves_and_peaks_as_dtensor_tp_does(
    tp: int, sp: bool, precision: str, checkpointing: str
) -> None:
    run = _run(tp, sp, precision, checkpointing)
    (real_params, real_saved, real_peak) = _real(run)
    (params, saved, peak) = _predicted(run)
    assert params == real_params
    assert checkpointing == "full" or saved == real_saved, (
        f"profile only: {saved - real_saved}; DTensor only: {real_saved - saved}"
    )
    assert abs(peak - real_peak) <= SLACK, (peak, real_peak)
