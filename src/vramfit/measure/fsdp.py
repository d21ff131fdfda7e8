"""Rank 0 of an FSDP2 run, on one GPU: a fake process group stands in for the other ranks.

``torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=N)``
(``torch.testing._internal.distributed.fake_pg``) makes every collective a no-op that returns
at once: the all-gathers leave their outputs as allocated, the reduce-scatters reduce nothing.
Everything PyTorch allocates for rank 0 is real (shards, all-gather and reduce-scatter buffers
on their own streams, activations, optimizer state); NCCL allocates nothing, and nothing is
communicated. torchtitan's memory estimator (scripts/estimate/estimation.py) works this way.

The model is built as torchtitan and accelerate build large models: the transformers model on
the meta device, ``fully_shard`` on each decoder layer and then on the model, with a
``MixedPrecisionPolicy``, then ``to_empty`` on the GPU and a random initialisation of the
local shards.
"""

from __future__ import annotations

from typing import Any

from vramfit.config import Checkpointing, Fsdp, Parallel, Precision, RunSpec, Workload
from vramfit.errors import VramfitError

COMMUNICATION_NOTE = (
    "communication is faked: a fake process group of {n} ranks runs rank 0 alone on this GPU "
    "(no all-gather or reduce-scatter moves data, NCCL allocates nothing); compare the device "
    "total with the prediction less nccl_bytes"
)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_fsdp_measurable(run: RunSpec) -> None:
    """Only FSDP2 full / shard-grad-op training, without TP / PP, runs on one GPU here."""
    par = run.parallel
    if par.fsdp not in (Fsdp.full, Fsdp.shard_grad_op) or par.tp > 1 or par.pp > 1:
        raise VramfitError(
            "measure runs FSDP2 full or shard-grad-op only (ZeRO, DDP, TP and PP are modelled)",
            field="--fsdp",
        )
    if run.workload.loop.value == "trainer":
        raise VramfitError("measure --gpus runs a plain loop: use --loop drops", field="--loop")


def init_fake_group(torch: Any, world: int) -> None:
    """The fake process group of ``world`` ranks (re-created when the size changes)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if not fake_group() or dist.get_world_size() == world:
            return  # a real group (a torchrun rank) is used as it is
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def fake_group() -> bool:
    """Whether the process group is the fake one (no communication, no NCCL memory)."""
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_backend() == "fake"


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a transformers causal LM (Llama-style or GPT-2)."""
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(inner, "layers", None) or getattr(inner, "h", None)
    if layers is None:
        raise VramfitError("no decoder layers found to shard", field="--fsdp")
    return list(layers)


def build_fsdp_model(
    torch: Any, spec: Any, workload: Workload, par: Parallel, device: str
) -> Any:
    """The transformers model of ``spec`` under FSDP2 on ``device`` (see the module
    docstring); ``fully_shard(layer)`` for each decoder layer, then ``fully_shard(model)``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from vramfit.estimate.fsdp import POLICY
    from vramfit.measure.hf import hf_config, import_transformers

    transformers = import_transformers()
    init_fake_group(torch, par.shard)
    param_dtype, reduce_dtype, orig_dtype = POLICY[workload.precision]
    cfg = hf_config(spec, workload)
    attn = "eager" if workload.attention.value == "eager" else "sdpa"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, attn_implementation=attn, dtype=getattr(torch, _DTYPES[orig_dtype.value])
        )
    if workload.checkpointing is Checkpointing.full:
        model.gradient_checkpointing_enable()  # non-reentrant: transformers' default
    mp = MixedPrecisionPolicy(
        param_dtype=getattr(torch, _DTYPES[param_dtype.value]),
        reduce_dtype=getattr(torch, _DTYPES[reduce_dtype.value]),
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, reshard_after_forward=par.reshards)
    fully_shard(model, mp_policy=mp)  # the root: not resharded after forward
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for module in model.modules():  # buffers are not parameters: rebuild RoPE's
            init = getattr(module, "rope_init_fn", None)
            if init is not None and hasattr(module, "inv_freq"):
                inv_freq, _ = init(module.config, device)
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq = module.inv_freq.clone()
    return model


def compute_workload(workload: Workload) -> Workload:
    """What the loop runs: the MixedPrecisionPolicy casts, so no autocast and no scaler."""
    from vramfit.estimate.fsdp import compute_workload as cw

    if workload.precision is Precision.amp_fp16:
        raise VramfitError(
            "FSDP2 with fp16 needs a sharded grad scaler: use amp-bf16", field="--precision"
        )
    return cw(workload)
