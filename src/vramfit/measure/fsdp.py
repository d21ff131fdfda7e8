"""Rank 0 of an FSDP2 and / or tensor-parallel run, on one GPU: a fake process group stands in
for the other ranks.

``torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=N)``
(``torch.testing._internal.distributed.fake_pg``) makes every collective a no-op that returns
at once: the all-gathers leave their outputs as allocated, the reduce-scatters reduce nothing.
Everything PyTorch allocates for rank 0 is real (shards, all-gather and reduce-scatter buffers
on their own streams, activations, optimizer state); NCCL allocates nothing, and nothing is
communicated. torchtitan's memory estimator (scripts/estimate/estimation.py) works this way.

The model is built as torchtitan and accelerate build large models: the transformers model on
the meta device, ``fully_shard`` on each decoder layer and then on the model, with a
``MixedPrecisionPolicy``, then ``to_empty`` on the GPU and a random initialisation of the
local shards. With ``--offload params`` each ``fully_shard`` also gets a ``CPUOffloadPolicy``
(pinned shards on the CPU, gradients copied there, the optimizer stepping there), and
``to_empty`` materialises the shards on the CPU and the buffers on the GPU.

Tensor parallel (``vramfit.measure.tp``) is DTensor's ``parallelize_module`` over a 1-D "tp"
mesh, or over the "tp" dimension of a 2-D ("dp", "tp") mesh whose "dp" dimension
``fully_shard`` shards over (FSDP2 over TP shards, as torchtitan composes them).
"""

from __future__ import annotations

from typing import Any

from vramfit.config import (
    Checkpointing,
    Fsdp,
    Offload,
    Optimizer,
    Parallel,
    Precision,
    RunSpec,
    Workload,
)
from vramfit.errors import VramfitError

COMMUNICATION_NOTE = (
    "communication is faked: a fake process group of {n} ranks runs rank 0 alone on this GPU "
    "(no all-gather, reduce-scatter or all-reduce moves data, NCCL allocates nothing); compare "
    "the device total with the prediction less nccl_bytes"
)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# what steps CPU tensors under CPUOffloadPolicy (bitsandbytes' optimizers are CUDA kernels)
TORCH_OPTIMIZERS = (
    Optimizer.adamw, Optimizer.adamw_foreach, Optimizer.adamw_forloop, Optimizer.adamw_fused,
    Optimizer.sgd, Optimizer.sgd_momentum, Optimizer.adafactor, Optimizer.none,
)


def check_fsdp_measurable(run: RunSpec) -> None:
    """FSDP2 full / shard-grad-op, tensor parallel (with or without sequence parallel) and
    FSDP2 over TP shards run here; ZeRO, DDP, HSDP and PP are modelled only."""
    par = run.parallel
    if par.zero or par.ddp or par.pp > 1 or par.fsdp is Fsdp.hybrid:
        raise VramfitError(
            "measure runs FSDP2 full or shard-grad-op and tensor parallel only (ZeRO, DDP, "
            "HSDP and PP are modelled)",
            field="--fsdp",
        )
    if par.offload is Offload.params and par.tp > 1:
        raise VramfitError("measure runs --offload params without --tp", field="--offload")
    if par.offload is Offload.params and run.workload.optimizer not in TORCH_OPTIMIZERS:
        raise VramfitError(
            "--offload params steps on the CPU: use a torch.optim optimizer", field="--optimizer"
        )
    if par.tp > 1:
        from vramfit.measure.tp import check_tp_measurable

        check_tp_measurable(run.model.resolved())
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
    """The transformers model of ``spec`` under FSDP2 and / or tensor parallel on ``device``
    (see the module docstring): with ``tp > 1`` the TP plan first (``vramfit.measure.tp``);
    with FSDP ``fully_shard(layer)`` for each decoder layer, then ``fully_shard(model)``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from vramfit.estimate.fsdp import POLICY
    from vramfit.measure.hf import hf_config, import_transformers

    transformers = import_transformers()
    init_fake_group(torch, par.gpus)
    offload = par.offload is Offload.params
    if par.fsdp is Fsdp.none:  # TP alone: the user's recipe (autocast over fp32 weights)
        from vramfit.measure.train import _WEIGHT_DTYPE

        orig_name = _WEIGHT_DTYPE[workload.precision]
    else:
        param_dtype, reduce_dtype, orig_dtype = POLICY[workload.precision]
        orig_name = _DTYPES[orig_dtype.value]
    cfg = hf_config(spec, workload)
    attn = "eager" if workload.attention.value == "eager" else "sdpa"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, attn_implementation=attn, dtype=getattr(torch, orig_name)
        )
    if workload.checkpointing is Checkpointing.full:
        model.gradient_checkpointing_enable()  # non-reentrant: transformers' default
    mesh = None
    if par.tp > 1:
        from vramfit.measure.tp import parallelize

        mesh = parallelize(torch, model, par, device)
    if par.fsdp is not Fsdp.none:
        mp = MixedPrecisionPolicy(
            param_dtype=getattr(torch, _DTYPES[param_dtype.value]),
            reduce_dtype=getattr(torch, _DTYPES[reduce_dtype.value]),
        )
        dp: dict[str, Any] = {} if mesh is None else {"mesh": mesh["dp"]}
        if offload:  # pinning needs an accelerator: unpinned on a CPU-only run
            dp["offload_policy"] = CPUOffloadPolicy(pin_memory=device != "cpu")
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp, reshard_after_forward=par.reshards, **dp)
        fully_shard(model, mp_policy=mp, **dp)  # the root: not resharded after forward
    # CPUOffloadPolicy wants the shards materialised on the CPU (as torchtitan does:
    # to_empty(device="cpu"), the buffers on the GPU); fully_shard pins them at lazy init
    model.to_empty(device="cpu" if offload else device)
    with torch.no_grad():
        for p in model.parameters():
            # offloaded: the CPU local shards of DTensors on a GPU mesh, initialised locally
            (p.to_local() if offload and hasattr(p, "to_local") else p).normal_(0.0, 0.02)
        if offload:
            for module in model.modules():
                for name, buf in module.named_buffers(recurse=False):
                    module._buffers[name] = buf.to(device)
        for module in model.modules():  # buffers are not parameters: rebuild RoPE's
            init = getattr(module, "rope_init_fn", None)
            if init is not None and hasattr(module, "inv_freq"):
                inv_freq, _ = init(module.config, device)
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq = module.inv_freq.clone()
    return model


def compute_workload(workload: Workload, par: Parallel | None = None) -> Workload:
    """What the loop runs: under FSDP the MixedPrecisionPolicy casts, so no autocast and no
    scaler; tensor parallel alone runs the workload as it is (``schedule`` models it so)."""
    from vramfit.estimate.fsdp import compute_workload as cw

    if par is not None and par.fsdp is Fsdp.none:
        return workload
    if workload.precision is Precision.amp_fp16:
        raise VramfitError(
            "FSDP2 with fp16 needs a sharded grad scaler: use amp-bf16", field="--precision"
        )
    return cw(workload)
