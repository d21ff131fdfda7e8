"""Multi-GPU layouts: the step of the busiest rank (rank 0) under FSDP2, DeepSpeed ZeRO, DDP,
tensor and pipeline parallelism, plus the memory NCCL takes outside PyTorch's allocator.

What is measured and what is modelled only (README, "Multi-GPU"; ``measured`` below): FSDP2
is replayed event by event (``vramfit.estimate.fsdp``) and DTensor tensor parallel (alone and
under FSDP2, Llama-style projections) op by op; both were measured on one GPU under a fake
process group. ZeRO, DDP, HSDP and PP are models of the engines' documented allocations,
unmeasured.

- **ZeRO** (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", Section 5 and Figure 1): with mixed-precision Adam, Ψ parameters and N
  data-parallel ranks, the model states per rank are ``(2 + 2 + K)Ψ`` (baseline),
  ``2Ψ + 2Ψ + KΨ/N`` (P_os), ``2Ψ + (2 + K)Ψ/N`` (P_os+g), ``(2 + 2 + K)Ψ/N`` (P_os+g+p),
  K = 12 (fp32 master weights, momentum and variance). The step runs the model in 16 bits.
- **DDP** (torch/nn/parallel/distributed.py, reducer.cpp): gradient buckets of
  ``bucket_cap_mb`` (25 MiB; the first bucket 1 MiB, ``_DEFAULT_FIRST_BUCKET_BYTES``) hold a
  second copy of the gradients, unless ``gradient_as_bucket_view`` makes ``.grad`` a view of
  them.
- **TP** (``torch.distributed.tensor.parallel.parallelize_module``, ColwiseParallel on q/k/v,
  gate, up; RowwiseParallel on o, down): each rank holds heads/T of attention and ffn/T of
  the MLP; norms, embeddings and lm_head stay replicated. Sequence parallel (DTensor
  ``SequenceParallel``) runs the norms, dropouts and residuals on seq/T tokens, all-gathering
  before each colwise projection (which saves the gathered input) and reduce-scattering after
  each rowwise one (``vramfit.estimate.profiles.hf.Model.gather`` / ``scatter``); Megatron's
  variant (Korthikanti et al. 2022, Table 2) re-gathers in backward instead.
- **PP** (1F1B, Narayanan et al. 2021): the first stage holds layers/P layers (rounded up) and
  the embeddings, and keeps min(P, M) micro-batches of activations in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramfit.config import Fsdp, ModelSpec, Offload, Parallel, Workload
from vramfit.estimate.kernels import H200, Multiprocessors
from vramfit.estimate.timeline import Timeline

# NCCL's buffers per peer connection and channel (nccl src/include/device.h, 2.2x):
# DEFAULT_BUFFSIZE (Simple, NCCL_BUFFSIZE) 4 MiB; DEFAULT_LL_BUFFSIZE
# = NCCL_LL_LINES_PER_THREAD (8) x NCCL_LL_MAX_NTHREADS (512) x NCCL_STEPS (8) x 16 B;
# DEFAULT_LL128_BUFFSIZE = NCCL_LL128_ELEMS_PER_THREAD (120) x NCCL_LL128_MAX_NTHREADS (640)
# x NCCL_STEPS (8) x 8 B.
NCCL_SIMPLE_BYTES = 4 * 2**20
NCCL_LL_BYTES = 8 * 512 * 8 * 16
NCCL_LL128_BYTES = 120 * 640 * 8 * 8
NCCL_CHANNELS = 16  # rings NCCL builds over NVLink on an 8-GPU H100/H200 node (NCCL_MAX_NCHANNELS)
# Connections per channel a rank receives on: one ring peer, and a tree's parent and children.
NCCL_CONNECTIONS = 3
# Per communicator besides the buffers: work FIFOs, proxy state, device-side structures; the
# reports of 0.5-0.7 GB per communicator on A100s (NVIDIA/nccl issues #964, #1685) are buffers
# plus this.
NCCL_FIXED_BYTES = 64 * 2**20


def nccl_communicator_bytes(ranks: int) -> int:
    """Device memory one NCCL communicator of ``ranks`` ranks takes (0 for one rank): receive
    buffers for every protocol on each channel and connection, and a fixed part. Unmeasured:
    the fake process group used for the measurements allocates nothing."""
    if ranks <= 1:
        return 0
    per_connection = NCCL_SIMPLE_BYTES + NCCL_LL_BYTES + NCCL_LL128_BYTES
    connections = NCCL_CONNECTIONS if ranks > 2 else 1
    return NCCL_CHANNELS * connections * per_connection + NCCL_FIXED_BYTES


def nccl_bytes(par: Parallel) -> int:
    """NCCL on rank 0: one communicator per process group the layout communicates over (the
    data-parallel group, HSDP's replicate group, the tensor-parallel group; pipeline stages
    talk point to point to their neighbours: two peer connections)."""
    total = 0
    if par.fsdp is Fsdp.hybrid:
        total += nccl_communicator_bytes(par.shard)
        total += nccl_communicator_bytes(par.dp // par.shard)
    else:
        total += nccl_communicator_bytes(par.dp)
    total += nccl_communicator_bytes(par.tp)
    if par.pp > 1:
        per_connection = NCCL_SIMPLE_BYTES + NCCL_LL_BYTES + NCCL_LL128_BYTES
        total += 2 * NCCL_CHANNELS * per_connection + NCCL_FIXED_BYTES
    return total


# ZeRO: the paper's model states, and DeepSpeed's own estimators --------------------------


def zero_model_states_bytes(params: int, ranks: int, stage: int, k: int = 12) -> float:
    """Model-state bytes per rank (ZeRO paper, Figure 1): 2Ψ fp16 weights, 2Ψ fp16 gradients,
    KΨ optimizer states; stage 1 partitions the optimizer states, 2 also the gradients, 3 also
    the weights, over ``ranks``."""
    psi, n = params, ranks
    if stage == 0:
        return (2 + 2 + k) * psi
    if stage == 1:
        return 2 * psi + 2 * psi + k * psi / n
    if stage == 2:
        return 2 * psi + (2 + k) * psi / n
    return (2 + 2 + k) * psi / n


def deepspeed_zero2_estimate(
    params: int, gpus_per_node: int, nodes: int, cpu_offload: bool, buffer_factor: float = 1.5
) -> tuple[int, float]:
    """(GPU bytes, CPU bytes) of DeepSpeed's ``estimate_zero2_model_states_mem_needs``
    (deepspeed/runtime/zero/stage_1_and_2.py): without offload 4Ψ (fp16 weights and
    gradients) + 16Ψ/N (fp32 master, momentum, variance, fp32 gradient partition)."""
    total_gpus = gpus_per_node * nodes
    if cpu_offload:
        return 2 * params, params * max(4 * total_gpus, 16) * buffer_factor
    return 4 * params + int(16 * params / total_gpus), params * 4 * gpus_per_node * buffer_factor


def deepspeed_zero3_estimate(
    params: int,
    largest_layer_params: int,
    gpus_per_node: int,
    nodes: int,
    offload_optimizer: bool,
    offload_params: bool,
    zero_init: bool,
    buffer_factor: float = 1.5,
) -> tuple[int, float]:
    """(GPU bytes, CPU bytes) of DeepSpeed's ``estimate_zero3_model_states_mem_needs``
    (deepspeed/runtime/zero/stage3.py): the largest layer gathered in fp32-sized room
    (4 B/param), plus 18Ψ/N of partitioned states without offload."""
    total_gpus = gpus_per_node * nodes
    per_node = 1 / nodes
    largest = 4 * largest_layer_params
    if offload_optimizer:
        if offload_params:
            gpu = largest
            cpu = params * max(4 * gpus_per_node, 18 * per_node) * buffer_factor
        else:
            gpu = largest + int(2 * params / total_gpus)
            cpu = params * max(4 * gpus_per_node, 16 * per_node) * buffer_factor
    else:
        gpu = largest + int(18 * params / total_gpus)
        held = largest_layer_params if zero_init else params
        cpu = held * 4 * gpus_per_node * buffer_factor
    return gpu, cpu


# The steps of each layout ------------------------------------------------------------------


@dataclass
class LayoutSteps:
    """What ``vramfit.estimate.core`` replays for a multi-GPU layout."""

    first: Timeline
    steady: Timeline
    block_bytes: dict[str, int]
    nccl_bytes: int = 0
    cpu_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def training_steps(
    spec: ModelSpec,
    w: Workload,
    par: Parallel,
    workspace_bytes: int,
    mp: Multiprocessors = H200,
    in_flight: int | None = None,
) -> LayoutSteps:
    """Rank 0's first and steady training steps under ``par`` (``in_flight``: see
    ``schedule.replicated_training_steps``)."""
    from vramfit.estimate import schedule

    if par.fsdp is not Fsdp.none:
        first, steady, block, cpu = schedule.fsdp_training_steps(
            spec, w, par, workspace_bytes, mp
        )
    else:
        first, steady, block, cpu = schedule.replicated_training_steps(
            spec, w, par, workspace_bytes, mp, in_flight
        )
    if measured(spec, par):
        note = (
            f"{describe(par)}: this layout was measured on one GPU with a fake process group "
            "(no communication); NCCL's memory is a model, unmeasured"
        )
    else:
        note = "modelled only (not measured): " + describe(par)
    return LayoutSteps(first, steady, block, nccl_bytes(par), cpu, [note])


# The model types whose tensor-parallel plan (transformers' Llama base_model_tp_plan:
# separate q/k/v/gate/up/o/down projections) vramfit.measure.tp runs and measured.
TP_MEASURED_TYPES = ("llama", "mistral", "qwen2")


def measured(spec: ModelSpec, par: Parallel) -> bool:
    """Whether rank 0 of this layout was measured on the H200 under a fake process group
    (README, "Multi-GPU"): FSDP2 full / shard-grad-op (any reshard_after_forward, CPU
    offload), DTensor tensor parallel alone or under FSDP2 for Llama-style projections;
    not HSDP, ZeRO, DDP or pipelines."""
    if par.zero or par.ddp or par.pp > 1 or par.fsdp is Fsdp.hybrid:
        return False
    if par.tp > 1:
        spec = spec.resolved()
        model_type = spec.model_type.value if spec.model_type else spec.arch.value
        return model_type in TP_MEASURED_TYPES and par.offload is Offload.none
    return par.fsdp is not Fsdp.none


def describe(par: Parallel) -> str:
    """The layout in words: ``ZeRO-2 x 64``, ``TP 8 x PP 4 x DDP 2``."""
    parts = []
    if par.tp > 1:
        parts.append(f"TP {par.tp}" + (" + SP" if par.sp else ""))
    if par.pp > 1:
        parts.append(f"PP {par.pp} ({par.micro_batches or par.pp} micro-batches)")
    if par.fsdp is not Fsdp.none:
        parts.append(f"FSDP2 {par.fsdp.value} {par.shard}")
    elif par.zero:
        parts.append(f"ZeRO-{par.zero} {par.dp}")
    elif par.ddp:
        parts.append(f"DDP {par.dp}")
    elif par.dp > 1:
        parts.append(f"{par.dp} replicas")
    return " x ".join(parts) or "one GPU"


def tp_block(spec: ModelSpec, par: Parallel) -> ModelSpec:
    """The per-rank shape tensor parallel leaves (ColwiseParallel / RowwiseParallel split the
    heads, the K/V heads and the MLP width; hidden, vocabulary and norms are replicated) and
    the layers pipeline stage 0 holds."""
    spec = spec.resolved()
    assert spec.heads and spec.kv_heads and spec.ffn and spec.head_dim
    layers = -(-spec.layers // par.pp)
    if par.tp == 1 and par.pp == 1:
        return spec
    return ModelSpec.model_validate(
        {
            **spec.model_dump(),
            "heads": spec.heads // par.tp,
            "kv_heads": spec.kv_heads // par.tp,
            "ffn": spec.ffn // par.tp,
            "head_dim": spec.head_dim,
            "layers": layers,
            "params": None,  # a declared count is the whole model's
        }
    )


def ddp_buckets(grad_bytes: list[int], cap_bytes: int, first_cap_bytes: int = 2**20) -> list[int]:
    """DDP's gradient buckets: parameters in reverse order, a bucket closed once it reaches
    its cap, the first at 1 MiB (``_DEFAULT_FIRST_BUCKET_BYTES``), the rest at
    ``bucket_cap_mb`` (torch/nn/parallel/distributed.py, ``_compute_bucket_assignment_by_size``
    in reducer.cpp)."""
    buckets, current, cap = [], 0, first_cap_bytes
    for nbytes in reversed(grad_bytes):
        current += nbytes
        if current >= cap:
            buckets.append(current)
            current, cap = 0, cap_bytes
    if current:
        buckets.append(current)
    return buckets
