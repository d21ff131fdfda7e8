"""Solvers over the pure model: the largest batch or sequence that fits, and what to change.

What is monotone and what is not: the peak allocated bytes never shrink when batch or
sequence grows (every tensor grows or stays; a property the tests check with hypothesis),
but the device total need not grow with them. The caching allocator's reserve depends on
how the blocks happen to fit into its segments, so one more sequence can need less
memory: measured on an H200, GPT-2 at batch 26 held 32.45 GiB and at batch 27 28.49 GiB,
as vramfit predicts. So a search on the total finds *a* boundary (N fits, N + 1 does not),
not necessarily the largest value that fits. ``solve_max`` also finds the bound past which
the peak allocated bytes plus the CUDA context alone exceed the GPU (the total is at least
that, and the peak is monotone: no larger value can fit), estimates every value between
the two when there are few, and says when there were too many to prove the answer largest.

Where the segments outgrow the GPU, an estimate replays within its room (the allocator frees
its cache and retries, ``vramfit.estimate.core``): the total of a run that fits so is within
the GPU, and its peak is the limited replay's, which can hand out blocks other than the
unlimited one does (by less than 1 MiB a block: the remainders too small to split off).
Such totals tell the search nothing of how far the boundary is (``distance`` in
``solve_max`` says what it interpolates instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from vramfit.config import (
    Attention,
    Checkpointing,
    Mode,
    Optimizer,
    Parallel,
    Positions,
    Precision,
    RunSpec,
)
from vramfit.errors import VramfitError
from vramfit.estimate.core import Estimate, Hardware, estimate

SolveField = Literal["batch", "seq"]
_LIMIT = {"batch": 10_000_000, "seq": 100_000_000}  # the Workload field bounds
# at most this many values between the bisection's boundary and the bound are estimated one
# by one (each costs an estimate); beyond that the answer is not proven to be the largest
SCAN_MAX = 32


def _with(run: RunSpec, **changes: object) -> RunSpec:
    """``run`` with workload fields changed, validated as any input is (enums and nested
    models, not plain strings and dicts), on the same GPUs in the same layout."""
    workload = {**run.workload.model_dump(), **changes}
    return RunSpec.model_validate(
        {"model": run.model, "workload": workload, "parallel": run.parallel}
    )


@dataclass(frozen=True)
class Solution:
    """The largest ``field`` value that fits, and how far that is proven.

    ``value``: the largest value found that fits (0: not even 1 fits), ``estimate`` its
    estimate. ``limit``: the end of the search range (the field's bound, or for ``seq`` the
    learned position table). Every value above ``bound`` does not fit (its peak allocated
    bytes plus the CUDA context exceed the GPU, or it is beyond ``limit``). Every value from
    ``value`` to ``checked_to`` was estimated; when ``checked_to < bound`` the values in
    between were not, and one of them may fit (``largest`` is False). ``too_big``: values
    below ``value`` that were estimated and do not fit (the total is not monotone).
    ``by_positions``: ``limit`` is the learned position table, not the field's bound.
    """

    field: SolveField
    value: int
    estimate: Estimate | None
    limit: int
    bound: int
    checked_to: int
    too_big: tuple[int, ...]
    by_positions: bool = False
    parallel: Parallel | None = None  # the layout the run was solved in

    @property
    def largest(self) -> bool:
        """Whether ``value`` is proven to be the largest that fits within ``limit``."""
        return self.checked_to >= self.bound


def search_limit(run: RunSpec, field: SolveField) -> int:
    """The largest value the search may try: the field's bound; for ``seq`` with learned
    positions, the position table less the generated tokens (GPT-2: 1024)."""
    limit = _LIMIT[field]
    spec = run.model.resolved()
    if field == "seq" and spec.positions is Positions.learned and spec.max_positions:
        limit = min(limit, spec.max_positions - run.workload.gen_tokens)
    return limit


def solve_max(run: RunSpec, hardware: Hardware, field: SolveField) -> Solution:
    """The largest ``field`` (batch or seq) whose device total fits ``hardware``.

    A bracketing search from the run's own value and regula falsi find a boundary (``low``
    fits, ``low + 1`` does not) and the bound (the values above it have peak allocated bytes
    plus the CUDA context beyond the GPU); when at most ``SCAN_MAX`` values lie between the
    two, each is estimated (see the module docstring). Where the bracket's ends fit only by
    the allocator's cache flushes or run out of memory, the bound comes first and caps the
    boundary's search, which interpolates ``distance`` rather than the totals.
    """
    limit = search_limit(run, field)
    memory = hardware.memory_bytes
    seen: dict[int, Estimate] = {}

    def probe(value: int) -> Estimate:
        if value not in seen:
            seen[value] = estimate(_with(run, **{field: value}), hardware)
        return seen[value]

    def excess(value: int) -> int:  # > 0: does not fit
        est = probe(value)
        over = est.total_bytes - memory
        # out of memory within the allocator's own limit (allocator_limit_bytes) although the
        # total where nothing limits it is within the GPU: it does not fit all the same
        return over if est.fits or over > 0 else 1

    def floor_excess(value: int) -> int:  # > 0: no value from here on fits (see hopeless)
        est = probe(value)
        over = est.peak_allocated_bytes + est.breakdown.get("cuda_context", 0) - memory
        if hardware.allocator_limit_bytes is not None:  # the allocator holds no more than it
            over = max(over, est.peak_allocated_bytes - hardware.allocator_limit_bytes)
        return over

    def flushed(value: int) -> bool:  # its total says little of how far the boundary is
        est = probe(value)
        return est.cache_flushes > 0 or est.out_of_memory is not None

    def distance(value: int) -> int:  # <= 0 exactly where excess is
        # where the allocator's cache flushes decide the fit, near the GPU's memory, a run
        # that fits so totals the GPU's memory less a few MiB whatever its size, and one out
        # of memory what it would hold where nothing limits it (terabytes for a long
        # generation): interpolated between such totals, each step moved one value (Llama-3
        # 8B generating 4,096 tokens on an H100: 24 steps from batch 49 to 73). So a fit by
        # flushes is as far from the boundary as its peak and context are below the GPU's
        # memory, and a run out of memory as its excess, up to the GPU's memory
        est = probe(value)
        if est.fits and est.cache_flushes:
            return floor_excess(value)  # peak + context <= total <= memory
        return min(excess(value), memory) if flushed(value) else excess(value)

    def find_bound() -> int:
        # the total is at least peak + context, and the peak is monotone, so no value above
        # the last one whose peak + context fit the GPU can fit
        start = max(v for v in seen if floor_excess(v) <= 0)
        above = [v for v in seen if v > start and floor_excess(v) > 0]
        lo, hi = (start, min(above)) if above else _bracket(floor_excess, start, limit)
        return _crossing(floor_excess, lo, hi, limit)

    # the boundary: low fits (or is 0), low + 1 does not; the search starts from the run's own
    # value, which is usually close
    low = 0
    bound: int | None = None
    start = min(max(1, getattr(run.workload, field)), limit)
    bracket = None
    if limit >= 1 and excess(start) <= 0:
        bracket = _bracket(excess, start, limit)
    elif limit >= 1 and excess(1) <= 0:
        bracket = (1, start)
    if bracket is not None:
        lo, hi = bracket
        if flushed(lo) or (hi <= limit and flushed(hi)):
            bound = find_bound()  # no higher than the bound (see below)
            hi = min(hi, bound + 1)
        low = _crossing(distance, lo, hi, limit)
    # the bound (low itself fits: when low >= 1, so does 1's peak + context, without
    # estimating 1)
    if limit < 1 or (low == 0 and floor_excess(1) > 0):
        bound = 0
    elif bound is None:
        bound = find_bound()
    # every value between the boundary and the bound, when there are few enough
    if bound - low <= SCAN_MAX:
        for value in range(low + 1, bound + 1):
            excess(value)
    best = max((v for v, est in seen.items() if est.fits), default=0)
    checked_to = best
    while checked_to + 1 in seen:
        checked_to += 1
    if checked_to < bound and bound - low <= SCAN_MAX:
        checked_to = bound
    # the values just below the answer that do not fit, down to one that does (few: the
    # reserve jumps at a segment boundary and falls back, as measured for GPT-2 above)
    value = best - 1
    while 1 <= value and best - value <= SCAN_MAX and excess(value) > 0:
        value -= 1
    too_big = tuple(v for v in sorted(seen) if v < best and not seen[v].fits)
    by_positions = limit < _LIMIT[field]
    return Solution(
        field, best, seen.get(best), limit, bound, checked_to, too_big, by_positions, run.parallel
    )


def _bracket(g: Callable[[int], int], lo: int, limit: int) -> tuple[int, int]:
    """From ``g(lo) <= 0``: ``(lo, hi)`` with ``g(lo) <= 0 < g(hi)``, or ``hi = limit + 1``.

    Each step goes 10% past where the last two points extrapolate ``g`` to cross zero (the
    totals grow about linearly, faster with eager attention), at least 1.5 times as far, and
    4 times as far while ``g`` does not grow (small values: whole segments, no change).
    """
    prev = None
    while lo < limit:
        step = 3 * lo
        if prev is not None and g(lo) > g(prev):
            slope = (g(lo) - g(prev)) / (lo - prev)
            step = max(lo // 2 + 1, int(-g(lo) / slope * 1.1) + 1)
        hi = min(lo + step, limit)
        if g(hi) > 0:
            return lo, hi
        prev, lo = lo, hi
    return lo, limit + 1


def _crossing(g: Callable[[int], int], lo: int, hi: int, limit: int) -> int:
    """Given ``g(lo) <= 0 < g(hi)`` (or ``hi = limit + 1``, never evaluated): the ``v`` in
    ``[lo, hi)`` with ``g(v) <= 0 < g(v + 1)`` that the search reaches.

    The Illinois variant of regula falsi (Dowell & Jarratt 1971): each step evaluates
    ``g`` where the bracket interpolates it to zero, halving the weight of an end that stays
    twice in a row; every step shrinks the bracket by at least one. A few steps when ``g``
    is close to linear, as the totals are. ``g`` need not be monotone (the total is not):
    the invariant alone makes the answer a boundary.
    """
    g_lo: float = g(lo)
    if hi > limit:  # the limit first: it may fit
        if g(limit) <= 0:
            return limit
        hi = limit
    g_hi: float = g(hi)
    kept = 0  # -1: lo moved last time, +1: hi moved last time
    while hi - lo > 1:
        guess = lo + int((hi - lo) * -g_lo / (g_hi - g_lo))
        guess = min(max(guess, lo + 1), hi - 1)
        value = g(guess)
        if value <= 0:
            lo, g_lo = guess, value
            if kept == -1:
                g_hi /= 2
            kept = -1
        else:
            hi, g_hi = guess, value
            if kept == 1:
                g_lo /= 2
            kept = 1
    return lo


class Totals:
    """Device totals on ``hardware``, one estimate per distinct run: pricing suggestions asks
    for some runs more than once (the run itself, a single change that is also the first
    step of the combined ones, an alternative the caller prices again). ``known``: a run
    already estimated on the same hardware, and its estimate."""

    def __init__(
        self, hardware: Hardware, known: tuple[RunSpec, Estimate] | None = None
    ) -> None:
        self.hardware = hardware
        self._totals: dict[str, int] = {}
        if known is not None:
            self._totals[known[0].model_dump_json()] = known[1].total_bytes

    def __call__(self, run: RunSpec) -> int:
        key = run.model_dump_json()
        if key not in self._totals:
            self._totals[key] = estimate(run, self.hardware).total_bytes
        return self._totals[key]


@dataclass(frozen=True)
class Suggestion:
    """One change to the run and the total it would lead to."""

    change: str
    total_bytes: int
    fits: bool


def suggestions(run: RunSpec, on: Hardware | Totals) -> list[Suggestion]:
    """Single changes that lower the total, those that fit first, then by total. When none
    fits alone, the changes are combined greedily (largest saving first) until one does.
    ``on``: the GPU, or the caller's ``Totals`` on it, to share its estimates."""
    totals = on if isinstance(on, Totals) else Totals(on)
    hardware = totals.hardware
    out, changes = _single_changes(run, totals)
    if out and not any(s.fits for s in out):
        combined, names = run, []
        for suggestion in sorted(out, key=lambda s: s.total_bytes):
            changed = _with(combined, **changes[suggestion.change])
            if changed == combined:
                continue  # implied by the changes already made (QLoRA sets LoRA and bf16)
            combined = changed
            for option in ("--" + o.strip() for o in suggestion.change.split("--") if o.strip()):
                if option not in names:
                    names.append(option)
            total = totals(combined)
            if total <= hardware.memory_bytes:
                out.insert(0, Suggestion(" ".join(names), total, True))
                break
    return out


def _adapter_changes(run: RunSpec) -> list[tuple[str, RunSpec]]:
    """A full fine-tune's LoRA and QLoRA alternatives (peft's default targets, rank 16; QLoRA
    as its paper and peft's examples load it: nf4, double quantization, bf16 compute), where
    the hf profile describes the model."""
    from vramfit.estimate.profiles.hf import hf_unsupported

    w = run.workload
    if w.impl.value != "hf" or w.lora is not None or w.quant is not None:
        return []
    if not run.parallel.single:  # multi-GPU layouts are modelled without adapters
        return []
    if hf_unsupported(run.model, w):
        return []
    spec = run.model.resolved()
    targets = (
        {}
        if spec.model_type is None or spec.model_type.value != "phi3"
        else {
            "targets": "all-linear"  # peft has no default targets for phi3
        }
    )
    flag = " --lora-targets all-linear" if targets else ""
    lora = {"r": 16, **targets}
    try:
        out = [(f"--lora-rank 16{flag}", _with(run, lora=lora))]
    except (ValueError, VramfitError):  # no linear layers peft can adapt as described
        return []
    # the QLoRA recipe trains under autocast (the Trainer's bf16=True): pure bf16 would leave
    # the hidden states in the fp32 that prepare_model_for_kbit_training casts the norms and
    # embeddings to, and their attention to SDPA's math kernel (see profiles/hf.py)
    qlora = {"lora": lora, "quant": {"kind": "nf4", "double_quant": True, "compute_dtype": "bf16"}}
    amp = w.precision is Precision.amp_bf16
    if not amp:
        qlora["precision"] = Precision.amp_bf16
    out.append(
        (
            f"--lora-rank 16{flag} --quant nf4 --quant-double --quant-compute-dtype bf16"
            + ("" if amp else " --precision amp-bf16"),
            _with(run, **qlora),
        )
    )
    return out


def _quantized_inference(run: RunSpec) -> list[tuple[str, RunSpec]]:
    """Inference on bitsandbytes-quantized weights: ``load_in_8bit``, and nf4 computing in the
    run's 16-bit dtype (``bnb_4bit_compute_dtype``; BitsAndBytesConfig's fp32 default would
    run every 4-bit matmul and its output in fp32), where the hf profile describes the run and
    the config takes it (not with an 8-bit ``--kv-dtype``: transformers' quantized models have
    no such cache)."""
    from vramfit.estimate.profiles.hf import hf_unsupported

    w = run.workload
    if w.impl.value != "hf" or w.quant is not None or not run.parallel.single:
        return []
    compute = "fp16" if w.precision is Precision.fp16 else "bf16"
    options = {
        "--quant int8": {"kind": "int8"},
        f"--quant nf4 --quant-compute-dtype {compute}": {"kind": "nf4", "compute_dtype": compute},
    }
    out = []
    for change, quant in options.items():
        try:
            changed = _with(run, quant=quant)
        except (ValueError, VramfitError):
            continue
        if not hf_unsupported(changed.model, changed.workload):
            out.append((change, changed))
    return out


def _single_changes(
    run: RunSpec, totals: Totals
) -> tuple[list[Suggestion], dict[str, dict[str, object]]]:
    w, hardware = run.workload, totals.hardware
    candidates: list[tuple[str, RunSpec]] = []
    if w.mode is Mode.train:
        if w.checkpointing is not Checkpointing.full:
            candidates.append(
                ("--checkpointing full", _with(run, checkpointing=Checkpointing.full))
            )
        if w.optimizer is Optimizer.adamw:
            candidates.append(
                ("--optimizer adamw-fused", _with(run, optimizer=Optimizer.adamw_fused))
            )
        if w.optimizer in (Optimizer.adamw, Optimizer.adamw_fused):
            candidates.append(("--optimizer adam-8bit", _with(run, optimizer=Optimizer.adam_8bit)))
        if w.precision in (Precision.fp32, Precision.amp_bf16, Precision.amp_fp16):
            candidates.append(("--precision bf16", _with(run, precision=Precision.bf16)))
        candidates += _adapter_changes(run)
    else:
        if w.precision in (Precision.fp32, Precision.amp_bf16, Precision.amp_fp16):
            candidates.append(("--precision bf16", _with(run, precision=Precision.bf16)))
        candidates += _quantized_inference(run)
    if w.attention is Attention.eager:
        candidates.append(("--attention flash", _with(run, attention=Attention.flash)))
    if w.batch > 1:
        candidates.append(
            (f"--batch {max(1, w.batch // 2)}", _with(run, batch=max(1, w.batch // 2)))
        )
    current = totals(run)
    out, changes = [], {}
    for change, changed in candidates:
        total = totals(changed)
        if total < current:
            out.append(Suggestion(change, total, total <= hardware.memory_bytes))
            changes[change] = {
                k: v for k, v in changed.workload.model_dump().items() if v != getattr(w, k)
            }
    return sorted(out, key=lambda s: (not s.fits, s.total_bytes)), changes
