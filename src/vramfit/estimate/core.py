"""The default estimator: a RunSpec (and optionally a GPU) in, an Estimate out. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from vramfit.config import Mode, RunSpec
from vramfit.estimate.activations import block_saved_checkpointed
from vramfit.estimate.inference import build_inference_timeline, kv_cache_bytes
from vramfit.estimate.overhead import DEFAULT_CONTEXT_BYTES, allocator_reserve_bytes, cublas_workspace_bytes
from vramfit.estimate.params import ParamCounts, count_params
from vramfit.estimate.training import build_training_timeline

# Components in display order; the breakdown at the peak uses these keys.
COMPONENTS = (
    "weights",
    "autocast_weight_copies",
    "gradients",
    "optimizer_state",
    "optimizer_temp",
    "activations",
    "activation_grads",
    "logits",
    "kv_cache",
    "cublas_workspace",
    "allocator_reserve",
    "cuda_context",
)


@dataclass(frozen=True)
class Hardware:
    """What the estimate needs to know about the GPU."""

    name: str
    memory_bytes: int
    compute_capability: tuple[int, int] | None = None
    context_bytes: int = DEFAULT_CONTEXT_BYTES


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one step, by phase and by component.

    ``peak_allocated_bytes`` is what ``torch.cuda.max_memory_allocated`` reports;
    ``total_bytes`` adds the allocator's reserve and the CUDA context, i.e. what the device
    has in use, which is what decides an out-of-memory. ``breakdown`` sums to ``total_bytes``.
    """

    run: RunSpec
    counts: ParamCounts
    params: int
    phases: dict[str, int]
    peak_phase: str
    peak_point: str
    peak_allocated_bytes: int
    breakdown: dict[str, int]
    total_bytes: int
    block_activation_bytes: dict[str, int]
    kv_cache_bytes: int
    hardware: Hardware | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool | None:
        return None if self.hardware is None else self.total_bytes <= self.hardware.memory_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.hardware is None else self.hardware.memory_bytes - self.total_bytes


def estimate(run: RunSpec, hardware: Hardware | None = None) -> Estimate:
    """Build the step's memory timeline and read its peaks."""
    spec = run.model.resolved()
    workload = run.workload
    counts = count_params(spec)
    params = spec.params or counts.total
    cc = hardware.compute_capability if hardware else None
    workspace = cublas_workspace_bytes(cc)
    if workload.mode is Mode.train:
        timeline = build_training_timeline(spec, workload, workspace)
    else:
        timeline = build_inference_timeline(spec, workload, workspace)

    peak_index = timeline.peak_point()
    peak_phase, peak_point = timeline.points[peak_index]
    live = timeline.components_at(peak_index)
    peak_allocated = sum(live.values())
    reserve = allocator_reserve_bytes(peak_allocated)
    context = hardware.context_bytes if hardware else DEFAULT_CONTEXT_BYTES
    breakdown = {name: live.get(name, 0) for name in COMPONENTS}
    breakdown["allocator_reserve"] = reserve
    breakdown["cuda_context"] = context
    breakdown = {k: v for k, v in breakdown.items() if v}

    notes = []
    if spec.params and abs(spec.params - counts.total) > 0.01 * counts.total:
        notes.append(
            f"--params {spec.params:,} differs from the {counts.total:,} that the architecture "
            "implies; state memory uses --params, activations use the architecture"
        )
    if spec.experts > 1:
        notes.append(f"MoE: {counts.active:,} of {counts.total:,} parameters are active per token")
    return Estimate(
        run=RunSpec(model=spec, workload=workload),
        counts=counts,
        params=params,
        phases=timeline.phase_peaks(),
        peak_phase=peak_phase,
        peak_point=peak_point,
        peak_allocated_bytes=peak_allocated,
        breakdown=breakdown,
        total_bytes=sum(breakdown.values()),
        block_activation_bytes=block_saved_checkpointed(spec, workload) if workload.mode is Mode.train else {},
        kv_cache_bytes=kv_cache_bytes(spec, workload) if workload.gen_tokens else 0,
        hardware=hardware,
        notes=tuple(notes),
    )
