"""Solvers over the pure model: the largest batch or sequence that fits, and what to change.

Bisection works because the estimate never shrinks when batch or sequence grows (a
property the tests check with hypothesis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vramfit.config import Attention, Checkpointing, Mode, Optimizer, Precision, RunSpec
from vramfit.estimate.core import Estimate, Hardware, estimate

SolveField = Literal["batch", "seq"]
_LIMIT = {"batch": 10_000_000, "seq": 100_000_000}  # the Workload field bounds


def _with(run: RunSpec, **changes: object) -> RunSpec:
    return run.model_copy(update={"workload": run.workload.model_copy(update=changes)})


def solve_max(run: RunSpec, hardware: Hardware, field: SolveField) -> tuple[int, Estimate | None]:
    """Largest ``field`` (batch or seq) whose total fits ``hardware``; 0 when even 1 does not.

    Exponential search for an upper bound, then bisection: O(log n) estimates.
    """

    def fits(value: int) -> bool:
        return estimate(_with(run, **{field: value}), hardware).total_bytes <= hardware.memory_bytes

    if not fits(1):
        return 0, None
    low, high = 1, 2
    while high <= _LIMIT[field] and fits(high):
        low, high = high, high * 2
    high = min(high, _LIMIT[field] + 1)
    while high - low > 1:  # invariant: fits(low), not fits(high)
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low, estimate(_with(run, **{field: low}), hardware)


@dataclass(frozen=True)
class Suggestion:
    """One change to the run and the total it would lead to."""

    change: str
    total_bytes: int
    fits: bool


def suggestions(run: RunSpec, hardware: Hardware) -> list[Suggestion]:
    """Single changes that lower the total, those that fit first, then by total. When none
    fits alone, the changes are combined greedily (largest saving first) until one does."""
    out, changes = _single_changes(run, hardware)
    if out and not any(s.fits for s in out):
        combined, names = run, []
        for suggestion in sorted(out, key=lambda s: s.total_bytes):
            combined = combined.model_copy(
                update={"workload": combined.workload.model_copy(update=changes[suggestion.change])}
            )
            names.append(suggestion.change)
            total = estimate(combined, hardware).total_bytes
            if total <= hardware.memory_bytes:
                out.insert(0, Suggestion(" ".join(names), total, True))
                break
    return out


def _single_changes(
    run: RunSpec, hardware: Hardware
) -> tuple[list[Suggestion], dict[str, dict[str, object]]]:
    w = run.workload
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
    elif w.precision in (Precision.fp32, Precision.amp_bf16, Precision.amp_fp16):
        candidates.append(("--precision bf16", _with(run, precision=Precision.bf16)))
    if w.attention is Attention.eager:
        candidates.append(("--attention flash", _with(run, attention=Attention.flash)))
    if w.batch > 1:
        candidates.append(
            (f"--batch {max(1, w.batch // 2)}", _with(run, batch=max(1, w.batch // 2)))
        )
    current = estimate(run, hardware).total_bytes
    out, changes = [], {}
    for change, changed in candidates:
        total = estimate(changed, hardware).total_bytes
        if total < current:
            out.append(Suggestion(change, total, total <= hardware.memory_bytes))
            changes[change] = {
                k: v for k, v in changed.workload.model_dump().items() if v != getattr(w, k)
            }
    return sorted(out, key=lambda s: (not s.fits, s.total_bytes)), changes
