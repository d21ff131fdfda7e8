"""The default estimator: a RunSpec (and optionally a GPU) in, an Estimate out. Pure."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

from vramfit.config import Attention, Impl, Mode, Precision, RunSpec
from vramfit.estimate.inference import kv_cache_bytes
from vramfit.estimate.kernels import H200, Multiprocessors
from vramfit.estimate.overhead import cublas_workspace_bytes, cuda_context_bytes
from vramfit.estimate.params import ParamCounts, count_params
from vramfit.estimate.profiles import reference
from vramfit.estimate.profiles.hf import hf_unsupported
from vramfit.estimate.schedule import hf_inference, hf_training_steps, managed_state_bytes
from vramfit.estimate.timeline import TENSOR_COMPONENTS, Replay, Timeline, replay
from vramfit.units import format_times

# Components in display order; the breakdown at the peak uses these keys. Managed memory
# (a paged optimizer's state) is outside PyTorch's allocator: in the device total only.
COMPONENTS = (
    *TENSOR_COMPONENTS,
    "allocator_rounding",
    "allocator_reserve",
    "managed_optimizer_state",
    "cuda_context",
    "nccl",
)


@dataclass(frozen=True)
class Hardware:
    """What the estimate needs to know about the GPU."""

    name: str
    memory_bytes: int
    compute_capability: tuple[int, int] | None = None
    context_bytes: int | None = None  # measured context + kernels; None: the H200 figure
    # None: the H200's, the GPU every kernel figure was measured on (the cuBLAS workspace,
    # in contrast, follows compute_capability: pre-Hopper's when that is None)
    multiprocessors: Multiprocessors | None = None
    # the caching allocator's own limit on its segments, below what the GPU has room for
    # (torch.cuda.set_per_process_memory_fraction: the fraction of the device's memory)
    allocator_limit_bytes: int | None = None


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one step, by phase and by component.

    ``peak_allocated_bytes`` is what ``torch.cuda.max_memory_allocated`` reports (the
    tensors' bytes replayed through the caching allocator, which rounds them up);
    ``total_bytes`` adds the allocator's reserve, CUDA managed memory (``managed_bytes``: a
    paged optimizer's state, resident while the GPU has room; under pressure the driver
    evicts its pages to host memory instead of failing) and the CUDA context, i.e. what the
    device has in use, which is what decides an out-of-memory. ``breakdown`` sums to
    ``total_bytes``.
    """

    run: RunSpec
    counts: ParamCounts
    params: int
    phases: dict[str, int]
    peak_phase: str
    peak_point: str
    peak_allocated_bytes: int
    tensor_peak_bytes: int  # the same peak before allocator rounding: bytes tensors ask for
    breakdown: dict[str, int]
    total_bytes: int
    block_activation_bytes: dict[str, int]
    kv_cache_bytes: int
    hardware: Hardware | None = None
    notes: tuple[str, ...] = field(default=())
    managed_bytes: int = 0
    # multi-GPU (rank 0, the busiest): NCCL's buffers (a model, outside PyTorch's allocator;
    # part of total_bytes), the reserve of each stream's pools, what is offloaded to the CPU
    nccl_bytes: int = 0
    stream_reserved_bytes: dict[str, int] = field(default_factory=dict)
    cpu_bytes: int = 0
    # whose code was estimated: the run's --impl, or the reference loop where the hf profile
    # does not describe the model (a note says why)
    implementation: Impl = Impl.hf
    # the GPU filled up: how often the allocator freed its cache and retried a cudaMalloc
    # (torch.cuda.memory_stats()["num_alloc_retries"], the failing retry of an out-of-memory
    # included), and the total it needs without that
    cache_flushes: int = 0
    unflushed_total_bytes: int | None = None
    # where the run runs out of memory even after freeing the cache ("phase: point"); the
    # estimate's figures are then those without the GPU's limit
    out_of_memory: str | None = None

    @property
    def fits(self) -> bool | None:
        if self.hardware is None:
            return None
        return self.out_of_memory is None and self.total_bytes <= self.hardware.memory_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.hardware is None else self.hardware.memory_bytes - self.total_bytes


def estimate(run: RunSpec, hardware: Hardware | None = None) -> Estimate:
    """Build the step's memory timeline, replay it through the allocator, read its peaks.

    Training replays three steps (the first creates the optimizer state and workspaces,
    the next two are steady), as ``vramfit measure --train`` runs them.

    Python's cycle collector is paused meanwhile: an estimate makes hundreds of thousands of
    long-lived objects (graph nodes, tape records, allocator blocks linked to their
    neighbours), and each full collection walked all of them again, a third of a 512-layer
    estimate's time. What they leave behind is collected once it is resumed.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        return _estimate(run, hardware)
    finally:
        if paused:
            gc.enable()


def _estimate(run: RunSpec, hardware: Hardware | None) -> Estimate:
    spec = run.model.resolved()
    workload = run.workload
    counts = count_params(spec)
    params = spec.params or counts.total
    cc = hardware.compute_capability if hardware else None
    workspace = cublas_workspace_bytes(None, cc)
    training = workload.mode is Mode.train
    block_bytes: dict[str, int] = {}
    mp = (hardware and hardware.multiprocessors) or H200
    hf_impl = workload.impl is Impl.hf
    notes = []
    unsupported = hf_unsupported(spec, workload) if hf_impl else None
    if unsupported:
        notes.append(f"{unsupported}: estimated with the reference implementation")
        hf_impl = False
    par = run.parallel
    nccl = cpu = 0
    if training and not par.single:
        from vramfit.estimate import parallel

        layout = parallel.training_steps(spec, workload, par, workspace, mp)
        first, steady, block_bytes = layout.first, layout.steady, layout.block_bytes
        steps = [first, steady, steady]
        nccl, cpu = layout.nccl_bytes, layout.cpu_bytes
        notes += layout.notes
    elif training:
        build = hf_training_steps if hf_impl else reference.training_steps
        first, steady, block_bytes = build(spec, workload, workspace, mp)
        steps = [first, steady, steady]
    else:
        steady = (hf_inference if hf_impl else reference.inference)(
            spec, workload, workspace
        )
        steps = [steady]
    rep = replay(steps)
    flash = workload.attention is Attention.flash and workload.precision is not Precision.fp32
    context = (
        hardware.context_bytes
        if hardware and hardware.context_bytes
        else cuda_context_bytes(training=training, flash=flash)
    )
    managed = managed_state_bytes(spec, workload) if training and hf_impl else 0
    gpu = _on_the_gpu(rep, steps, hardware, context + managed + nccl) if hardware else None
    if gpu is not None:
        rep = gpu.replay
        notes.append(gpu.note)

    phases: dict[str, int] = {}
    for timeline, allocated in zip(steps, rep.allocated, strict=True):
        for phase, start, end in timeline.phase_runs():
            n_bytes = max(allocated[start:end])
            if n_bytes > phases.get(phase, -1):
                phases[phase] = n_bytes
    steady_allocated = rep.allocated[-1]
    peak_index = steady_allocated.index(max(steady_allocated))  # the first point at the peak
    peak_phase, peak_point = steady.points[peak_index]
    live = steady.components_at(peak_index)
    breakdown = {name: live.get(name, 0) for name in COMPONENTS}
    breakdown["allocator_rounding"] = rep.peak_allocated - sum(live.values())
    breakdown["allocator_reserve"] = rep.reserved - rep.peak_allocated
    breakdown["managed_optimizer_state"] = managed
    breakdown["cuda_context"] = context
    breakdown["nccl"] = nccl
    breakdown = {k: v for k, v in breakdown.items() if v}

    if spec.params and abs(spec.params - counts.total) > 0.01 * counts.total:
        notes.append(
            f"--params {spec.params:,} differs from the {counts.total:,} that the architecture "
            "implies; state memory uses --params, activations use the architecture"
        )
    if spec.experts > 1:
        notes.append(f"MoE: {counts.active:,} of {counts.total:,} parameters are active per token")
    if managed:
        notes.append(
            f"the paged optimizer keeps {managed / 2**30:.2f} GiB of state in CUDA managed "
            "memory: in the device total, not in peak allocated; when the GPU runs short the "
            "driver evicts its pages to host memory, so the run may still fit, more slowly"
        )
    return Estimate(
        run=RunSpec(model=spec, workload=workload, parallel=par),
        counts=counts,
        params=params,
        phases=phases,
        peak_phase=peak_phase,
        peak_point=peak_point,
        peak_allocated_bytes=rep.peak_allocated,
        tensor_peak_bytes=max(steady.live_bytes()),
        breakdown=breakdown,
        total_bytes=sum(breakdown.values()),
        block_activation_bytes=block_bytes,
        kv_cache_bytes=kv_cache_bytes(spec, workload) if workload.gen_tokens else 0,
        hardware=hardware,
        notes=tuple(notes),
        managed_bytes=managed,
        nccl_bytes=nccl,
        stream_reserved_bytes=_stream_names(rep.reserved_by_stream) if not par.single else {},
        cpu_bytes=cpu,
        implementation=Impl.hf if hf_impl else Impl.reference,
        cache_flushes=gpu.flushes if gpu else 0,
        unflushed_total_bytes=gpu.unflushed_total if gpu else None,
        out_of_memory=gpu.out_of_memory if gpu else None,
    )


# The most retries of a run measured to fit as predicted (benchmarks/data/h200-flush-validation,
# h200-boundary-validation: 0 to 5). Generations predicted to fit after 380-429 retries ran out
# of memory after 140-359 (h200-flush-boundary-validation): the replay's blocks land in other
# segments than the real allocator's once it has freed and remade hundreds of them.
MEASURED_RETRIES = 5


@dataclass(frozen=True)
class _Limited:
    """The replay on a GPU whose room the segments outgrow (see ``_on_the_gpu``)."""

    replay: Replay
    note: str
    flushes: int = 0
    unflushed_total: int | None = None
    out_of_memory: str | None = None


def _on_the_gpu(
    rep: Replay, steps: list[Timeline], hardware: Hardware, outside: int
) -> _Limited | None:
    """The steps replayed again within what cudaMalloc grants, where ``rep`` (no limit)
    reserved more: the GPU's memory less what is outside the allocator (``outside``: the
    context, managed memory, NCCL), or the allocator's own limit if lower. None when the
    segments fit.

    A cudaMalloc that fails makes the allocator free its cached segments and retry (see
    ``vramfit.estimate.allocator``): the run fits as long as what is in use fits, more slowly.
    """
    limit = hardware.memory_bytes - outside
    if hardware.allocator_limit_bytes is not None:
        limit = min(limit, hardware.allocator_limit_bytes)
    if rep.reserved <= limit:
        return None
    gib = 2**30
    for k, timeline in enumerate(steps):  # the tensors alone outgrow the limit: no replay
        if any(timeline is earlier for earlier in steps[:k]):
            continue  # the second steady step: its timeline is the first one's
        over = next((i for i, n in enumerate(timeline.live_bytes()) if n > limit), None)
        if over is not None:
            if hardware.allocator_limit_bytes is None:
                return None  # the total is beyond the GPU already: plainly too big
            phase, point = timeline.points[over]
            return _Limited(
                rep,
                f"at {phase}: {point} (step {k + 1}) the tensors alone need more than the "
                f"{max(limit, 0) / gib:.2f} GiB the allocator can hold on this GPU",
                out_of_memory=f"{phase}: {point}",
            )
    limited = replay(steps, limit)
    if limited.out_of_memory is not None:
        k, i, size = limited.out_of_memory
        phase, point = steps[k].points[i]
        return _Limited(
            rep,
            f"at {phase}: {point} (step {k + 1}) a {size / gib:.2f} GiB request finds no "
            f"room even after the allocator frees its cached segments; the figures are what "
            f"the run holds where nothing limits it",
            flushes=limited.retries,
            out_of_memory=f"{phase}: {point}",
        )
    unflushed = rep.reserved + outside
    caution = (
        f"; uncertain past {MEASURED_RETRIES}: measured, fits after up to {MEASURED_RETRIES} "
        "retries held, and runs predicted to fit after hundreds ran out of memory"
        if limited.retries > MEASURED_RETRIES
        else ""
    )
    return _Limited(
        limited,
        f"the GPU fills up: where a cudaMalloc fails, the allocator frees its cached segments "
        f"and retries, {format_times(limited.retries)} over the "
        f"{'steps' if len(steps) > 1 else 'run'} "
        f"(num_alloc_retries; each frees and synchronizes, a slower step); where nothing "
        f"limits it, the run holds {unflushed / gib:.2f} GiB{caution}",
        flushes=limited.retries,
        unflushed_total=unflushed,
    )


def _stream_names(reserved: dict[int, int]) -> dict[str, int]:
    from vramfit.estimate.fsdp import STREAM_NAMES

    return {STREAM_NAMES.get(k, str(k)): v for k, v in sorted(reserved.items())}
