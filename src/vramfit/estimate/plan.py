"""``vramfit plan``: which multi-GPU layouts of a model fit a GPU, and by how much.

The candidates: FSDP2 full / shard-grad-op (alone and over tensor-parallel shards), ZeRO 1-3,
and DDP with tensor and pipeline parallelism (TP within a node: at most 8), each with and
without full checkpointing, at the given per-replica batch and sequence. Each is judged on
rank 0, the busiest rank.

Speed, without a second model: a rank's step repeats its decoder layers, and every quantity
the estimator reports grows by the same amount per layer once the allocator has reached its
periodic state (DESIGN.md, "Blocks repeat"). So each candidate is replayed with 3 and with 4
layers per rank (from 3 on, FSDP2's prefetch has its steady pattern; 2 and 3 for replicated
layouts), at the real widths, shard
degree and batch, and the peak is extrapolated linearly to the layers it holds (within 1% of
the full replay on the measured FSDP2 shapes). The device total adds the 4-layer replay's
reserve above its peak: the allocator's fragmentation does not grow linearly, and this part
is the plan's approximation (within -24% / +11% of the full replay on Llama-3 8B and 70B
shapes). ``vramfit estimate`` replays every layer: confirm a plan's choice with it.

Two cuts keep the search small: a layout whose model states alone (weights, gradients,
optimizer state in the run's dtypes, before any activation) exceed the GPU is refused
without a replay, and a layout that does not fit with full checkpointing is not tried without
it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vramfit.config import Checkpointing, Fsdp, ModelSpec, Parallel, Workload
from vramfit.errors import VramfitError
from vramfit.estimate.core import Hardware
from vramfit.estimate.parallel import describe
from vramfit.estimate.params import count_params

TP_MAX = 8  # tensor parallel stays inside an NVLink node (Narayanan et al. 2021, Section 3.3)
# the device total's approximation: from 24% below to 11% above the full replay on the Llama-3
# shapes checked (module docstring); a verdict this close to the GPU's memory may be the other
LOW, HIGH = 0.24, 0.11
PP_CHOICES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Candidate:
    """One layout judged for rank 0."""

    parallel: Parallel
    checkpointing: Checkpointing
    peak_allocated_bytes: int | None = None
    total_bytes: int | None = None
    headroom_bytes: int | None = None
    reason: str | None = None  # why it does not fit (None: it fits)
    # the peak plus what is outside the allocator (context, NCCL): a refusal below the GPU's
    # memory may fit by the allocator's cache flushes (vramfit.estimate.core)
    floor_bytes: int | None = None

    @property
    def layout(self) -> str:
        return describe(self.parallel)

    @property
    def near(self) -> bool:
        """Whether the verdict is within the plan's approximation of the device total (``LOW``,
        ``HIGH``): a fit whose full replay could exceed the GPU, or a refusal whose full replay
        could fit it (``vramfit estimate`` replays every layer), by the allocator's cache
        flushes too where the peak and what is outside the allocator fit."""
        if self.total_bytes is None or self.headroom_bytes is None:
            return False
        memory = self.total_bytes + self.headroom_bytes
        if self.headroom_bytes >= 0:
            return self.total_bytes / (1 - LOW) > memory
        flushes = self.floor_bytes is not None and self.floor_bytes <= memory
        return self.total_bytes / (1 + HIGH) <= memory or flushes


@dataclass
class Plan:
    gpus: int
    hardware: Hardware
    workload: Workload
    fits: list[Candidate] = field(default_factory=list)
    rejected: list[Candidate] = field(default_factory=list)
    replays: int = 0  # estimates run (each a 2- or 3-layer replay)


def _divisors(n: int, choices: tuple[int, ...]) -> list[int]:
    return [c for c in choices if n % c == 0]


def layouts(spec: ModelSpec, gpus: int, batch: int) -> list[Parallel]:
    """Every candidate layout the config accepts for ``gpus`` ranks."""
    spec = spec.resolved()
    assert spec.heads and spec.kv_heads and spec.ffn
    out: list[Parallel] = []
    tps = [
        t
        for t in (1, 2, 4, 8)
        if t <= min(TP_MAX, gpus)
        and gpus % t == 0
        and not (spec.heads % t or spec.kv_heads % t or spec.ffn % t)
    ]

    def add(**fields: object) -> None:
        try:
            out.append(Parallel.model_validate({"gpus": gpus, **fields}))
        except ValueError:
            pass  # an impossible combination: not a candidate

    for tp in tps:
        for pp in _divisors(gpus // tp, PP_CHOICES):
            if pp > spec.layers or (pp > 1 and batch % pp):
                continue  # more stages than layers, or a batch that does not split
            dp = gpus // (tp * pp)
            micro = pp if pp > 1 else None
            if pp == 1 and dp > 1:
                for mode in (Fsdp.full, Fsdp.shard_grad_op):
                    add(fsdp=mode.value, tp=tp)
                if tp == 1:
                    for stage in (3, 2, 1):  # most sharded first (see make_plan)
                        add(zero=stage)
            if dp > 1:
                add(ddp=True, tp=tp, pp=pp, micro_batches=micro)
            elif tp * pp > 1:
                add(tp=tp, pp=pp, micro_batches=micro)
    return out


def state_bytes_per_param(w: Workload) -> int:
    """Bytes per parameter of the weights, their gradients and the optimizer state the run
    keeps, at least: the parameters' dtype (fp32 under fp32 and AMP, else 16-bit) for weights
    and gradients; AdamW's two moments and SGD's momentum in that dtype (torch's
    ``zeros_like(param)``); bitsandbytes' 8-bit moments at one byte each (their absmax left out)
    and its 32-bit ones at four; Adafactor's factored moments and SGD without momentum as none.
    Mixed-precision AdamW: 4 + 4 + 8 = 16, pure bf16 AdamW: 2 + 2 + 4 = 8."""
    from vramfit.config import Optimizer, Precision

    ws = 4 if w.precision in (Precision.fp32, Precision.amp_fp16, Precision.amp_bf16) else 2
    if w.optimizer in (
        Optimizer.adamw, Optimizer.adamw_foreach, Optimizer.adamw_fused, Optimizer.adamw_forloop
    ):
        states = 2 * ws
    elif w.optimizer is Optimizer.sgd_momentum:
        states = ws
    elif w.optimizer in (Optimizer.adam_8bit, Optimizer.paged_adamw_8bit):
        states = 2
    elif w.optimizer is Optimizer.paged_adamw_32bit:
        states = 8
    else:  # sgd, adafactor, adafactor-hf, none
        states = 0
    return 2 * ws + states


def model_states_bytes(spec: ModelSpec, par: Parallel, w: Workload) -> int:
    """Weights + gradients + optimizer state per rank before activations, divided as the
    layout divides them (``state_bytes_per_param``; ZeRO as DeepSpeed keeps them whatever
    the optimizer: the ZeRO paper's 2 + 2 + 12 bytes per parameter). A lower bound on the
    peak."""
    psi = count_params(spec).total / (par.tp * par.pp)
    if par.fsdp is not Fsdp.none:
        return int(state_bytes_per_param(w) * psi / par.shard)
    if par.zero:
        from vramfit.estimate.parallel import zero_model_states_bytes

        return int(zero_model_states_bytes(int(psi), par.dp, par.zero))
    return int(state_bytes_per_param(w) * psi)


def _at_layers(spec: ModelSpec, per_rank: int, pp: int) -> ModelSpec:
    values = {**spec.model_dump(), "layers": per_rank * pp, "params": None}
    return ModelSpec.model_validate(values)


_LAYER_INDEX = re.compile(r"(block |layers\.|h\.)(\d+)")


def _replay(
    spec: ModelSpec, w: Workload, par: Parallel, hardware: Hardware, layers: int, in_flight: int
) -> tuple[dict[tuple[int, str, str, int], int], int, int, int]:
    """Allocated bytes at the points outside the layers of the three replayed steps, keyed by
    (step, phase, name, occurrence from the phase's end); the peak; the device total less
    the peak (reserve, context, NCCL); and what is outside the allocator (context, NCCL)."""
    from vramfit.config import Attention, Precision
    from vramfit.estimate import parallel
    from vramfit.estimate.kernels import H200
    from vramfit.estimate.overhead import cublas_workspace_bytes, cuda_context_bytes
    from vramfit.estimate.timeline import replay

    workspace = cublas_workspace_bytes(None, hardware.compute_capability)
    mp = hardware.multiprocessors or H200
    held = in_flight if par.pp > 1 else None
    steps = parallel.training_steps(spec.resolved(), w, par, workspace, mp, held)
    timelines = [steps.first, steps.steady]  # a third step changes a plan's numbers little
    rep = replay(timelines)
    points: dict[tuple[int, str, str, int], int] = {}
    for k, (timeline, allocated) in enumerate(zip(timelines, rep.allocated, strict=True)):
        # a repeated name is counted from the phase's end: the root's post-backward is the
        # last "wait for the previous reduce-scatter" whatever the number of layers
        seen: dict[tuple[str, str], list[int]] = {}
        for (phase, name), n_bytes in zip(timeline.points, allocated, strict=True):
            if _LAYER_INDEX.search(name) is None:  # outside the repeated layers
                seen.setdefault((phase, name), []).append(n_bytes)
        for (phase, named), values in seen.items():
            for n, n_bytes in enumerate(reversed(values)):
                points[(k, phase, named, n)] = n_bytes
    flash = w.attention is Attention.flash and w.precision is not Precision.fp32
    context = hardware.context_bytes or cuda_context_bytes(training=True, flash=flash)
    outside = context + steps.nccl_bytes
    return points, rep.peak_allocated, rep.reserved - rep.peak_allocated + outside, outside


def judge(
    spec: ModelSpec, w: Workload, par: Parallel, hardware: Hardware, plan: Plan
) -> Candidate:
    """Rank 0's peak and device total under ``par``: 3- and 4-layer replays, extrapolated to
    the layers a rank holds (see the module docstring)."""
    spec = spec.resolved()
    layers = -(-spec.layers // par.pp)
    ckpt = w.checkpointing
    states = model_states_bytes(spec, par, w)
    if states > hardware.memory_bytes:
        return Candidate(par, ckpt, reason=f"model states alone need {states / 2**30:,.1f} GiB")
    # what is live at the start of backward in any case: every layer's input, which even full
    # checkpointing keeps (torch.utils.checkpoint saves a region's inputs), for each micro-batch
    # in flight on the first stage (1F1B), in the 16-bit compute dtype (fp32 for fp32 runs)
    micro = par.micro_batches or 1
    in_flight = min(par.pp, micro) if par.pp > 1 else 1
    width = 4 if w.precision.value == "fp32" else 2
    inputs = layers * in_flight * (w.batch // micro) * w.seq * spec.hidden * width
    if states + inputs > hardware.memory_bytes:
        need = (states + inputs) / 2**30
        return Candidate(
            par, ckpt, reason=f"model states and layer inputs alone need {need:,.1f} GiB"
        )
    # replays at 3 and 4 layers per rank (all of them when fewer) and, on a pipeline's first
    # stage, with 2 and 3 micro-batches in flight (all of them when fewer; with one, the peak
    # can be the optimizer step's, from two on it is the backward's and grows linearly)
    # (FSDP2's and ZeRO-3's prefetch pattern is steady from 3 layers on; a replicated
    # layer's from 2)
    sharded = par.fsdp is not Fsdp.none or par.zero == 3
    first_layers = 3 if sharded else 2
    ls = (layers,) if layers <= first_layers + 1 else (first_layers, first_layers + 1)
    ks = (in_flight,) if in_flight <= 3 else (2, 3)
    grid = {
        (n, k): _replay(_at_layers(spec, n, par.pp), w, par, hardware, n, k)
        for n in ls
        for k in ks
    }
    plan.replays += len(grid)

    def at_rank(v: dict[tuple[int, int], int]) -> int:
        """Bilinear in layers and micro-batches in flight: each adds the same bytes."""
        (l0, k0), x, y = (ls[0], ks[0]), layers - ls[0], in_flight - ks[0]
        base = v[(l0, k0)]
        dl = v[(ls[-1], k0)] - base
        dk = v[(l0, ks[-1])] - base
        dlk = v[(ls[-1], ks[-1])] - v[(ls[-1], k0)] - v[(l0, ks[-1])] + base
        return base + x * dl + y * dk + x * y * dlk

    # the peak, and each point outside the layers that every replay shares, grow so: the
    # largest of them at the rank's size (the peak of a short replay can sit at the root's
    # reduce-scatter, where the activations are gone)
    # (with several micro-batches sampled, a point's occurrences do not line up: peak only)
    shared = set.intersection(*(set(r[0]) for r in grid.values())) if len(ks) == 1 else set()
    peak = max(
        [
            at_rank({g: r[1] for g, r in grid.items()}),
            *(at_rank({g: r[0][key] for g, r in grid.items()}) for key in shared),
        ]
    )
    # the allocator's reserve above the peak (and the context, NCCL) is taken as the largest
    # replay's: fragmentation does not grow linearly
    _, _, beyond_peak, outside = grid[(ls[-1], ks[-1])]
    total = peak + beyond_peak
    headroom = hardware.memory_bytes - total
    reason = None if headroom >= 0 else f"needs {total / 2**30:,.1f} GiB"
    return Candidate(par, ckpt, peak, total, headroom, reason, peak + outside)


def make_plan(spec: ModelSpec, w: Workload, gpus: int, hardware: Hardware) -> Plan:
    """Judge every layout for ``gpus`` ranks; fitting ones sorted by headroom (most first)."""
    if w.mode.value != "train":
        raise VramfitError("plans training layouts (mode train)", field="--mode")
    plan = Plan(gpus, hardware, w)
    staged: set[tuple[int, bool]] = set()  # (tp, engine) whose pipeline already fits
    too_big: dict[tuple[str, int], str] = {}  # layouts that do not fit with checkpointing
    for par in layouts(spec, gpus, w.batch):
        if par.pp > 1 and (par.tp, par.ddp) in staged:
            # layouts come in ascending pp: more stages only shrink the rank further, at the
            # cost of a longer pipeline bubble; the fewest stages that fit is the one to list
            continue
        # dominance: shard-grad-op keeps what full reshards, and ZeRO stage k keeps more than
        # stage k + 1 (tested properties), so neither fits where the leaner one does not
        leaner = (
            ("fsdp full", par.tp) if par.fsdp is Fsdp.shard_grad_op
            else (f"zero {par.zero + 1}", par.tp) if 0 < par.zero < 3 else None
        )
        if leaner is not None and leaner in too_big:
            reason = f"needs more than {too_big[leaner]}, which does not fit"
            for ckpt in (Checkpointing.full, Checkpointing.none):
                plan.rejected.append(Candidate(par, ckpt, reason=reason))
            key = ("fsdp sgo" if par.fsdp is Fsdp.shard_grad_op else f"zero {par.zero}", par.tp)
            too_big[key] = describe(par)
            continue
        full = Workload.model_validate({**w.model_dump(), "checkpointing": "full"})
        none = Workload.model_validate({**w.model_dump(), "checkpointing": "none"})
        with_ckpt = judge(spec, full, par, hardware, plan)
        if with_ckpt.reason is not None:
            if par.fsdp is Fsdp.full:
                too_big[("fsdp full", par.tp)] = describe(par)
            elif par.zero:
                too_big[(f"zero {par.zero}", par.tp)] = describe(par)
            plan.rejected.append(with_ckpt)
            reason = "does not fit with full checkpointing either"
            plan.rejected.append(Candidate(par, Checkpointing.none, reason=reason))
            continue
        if par.pp > 1:
            staged.add((par.tp, par.ddp))
        plan.fits.append(with_ckpt)
        without = judge(spec, none, par, hardware, plan)
        (plan.fits if without.reason is None else plan.rejected).append(without)
    plan.fits.sort(key=lambda c: -(c.headroom_bytes or 0))
    return plan


# at most this many larger world sizes are planned when none fits (each plan takes ~1 s)
MORE_GPUS_TRIES = 4


@dataclass(frozen=True)
class MoreGpus:
    """What doubling the world size would do: ``best`` is the first fitting layout (most
    headroom) at ``gpus`` ranks, the fewest of ``gpus_tried`` (each twice the last) at which one
    fits; ``best`` is None when none fits up to the last tried."""

    gpus: int
    best: Candidate | None
    gpus_tried: tuple[int, ...]


def ranks_for_states(per_param: int, params: int, hardware: Hardware) -> int:
    """The fewest ranks whose GPUs hold ``per_param`` bytes of model state for each of
    ``params`` parameters, sharded evenly over them, before any activation."""
    return -(-per_param * params // hardware.memory_bytes)


def more_gpus(spec: ModelSpec, w: Workload, gpus: int, hardware: Hardware) -> MoreGpus:
    """The fewest ranks, doubling from ``gpus``, at which some layout fits.

    World sizes where even the leanest layout's model states (``state_bytes_per_param``, or
    ZeRO's 16, spread over every rank as FSDP2 full sharding with TP spreads them) exceed the
    GPU are skipped without a plan; from the first where they fit, up to ``MORE_GPUS_TRIES``
    sizes are planned. The per-replica batch stays: data parallelism does not shrink a
    replica's activations, so one too big for a GPU stays too big however many there are."""
    from vramfit.config import MAX_GPUS

    per_param = min(state_bytes_per_param(w), 16)
    least = ranks_for_states(per_param, count_params(spec.resolved()).total, hardware)
    n, tried = gpus * 2, []
    while n <= MAX_GPUS and n < least:
        n *= 2
    while n <= MAX_GPUS and len(tried) < MORE_GPUS_TRIES:
        tried.append(n)
        plan = make_plan(spec, w, n, hardware)
        if plan.fits:
            return MoreGpus(n, plan.fits[0], tuple(tried))
        n *= 2
    return MoreGpus(tried[-1] if tried else gpus, None, tuple(tried))
