"""A memory timeline: allocations with lifetimes over the points of one step.

Rather than one big sum, each tensor (or group of same-lifetime tensors) is an
``Allocation`` that is live from one point of the step to another. The bytes live at
a point are the sum of the allocations spanning it; a phase's peak is the maximum over
its points; the breakdown at the overall peak is what the user sees. Checkpointing,
attention kernels, optimizers and the KV cache become changes to the list of
allocations, not special cases in a formula (design note: a memory timeline).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Allocation:
    """``n_bytes`` live from point ``start`` to point ``end`` (inclusive)."""

    name: str
    component: str
    n_bytes: int
    start: int
    end: int


@dataclass
class Timeline:
    """Points in step order (each tagged with its phase) and the allocations over them."""

    points: list[tuple[str, str]] = field(default_factory=list)  # (phase, point name)
    allocations: list[Allocation] = field(default_factory=list)

    def point(self, phase: str, name: str) -> int:
        """Append a point and return its index."""
        self.points.append((phase, name))
        return len(self.points) - 1

    @property
    def last(self) -> int:
        return len(self.points) - 1

    def alloc(self, name: str, component: str, n_bytes: int, start: int, end: int) -> None:
        """Record ``n_bytes`` live over [start, end]; zero-byte allocations are dropped."""
        if n_bytes <= 0:
            return
        if not 0 <= start <= end < len(self.points):
            raise ValueError(f"allocation {name!r} spans [{start}, {end}] outside the timeline")
        self.allocations.append(Allocation(name, component, int(n_bytes), start, end))

    def live_bytes(self) -> list[int]:
        """Bytes live at each point (difference array: O(points + allocations))."""
        delta = [0] * (len(self.points) + 1)
        for a in self.allocations:
            delta[a.start] += a.n_bytes
            delta[a.end + 1] -= a.n_bytes
        live, running = [], 0
        for d in delta[:-1]:
            running += d
            live.append(running)
        return live

    def peak_point(self) -> int:
        """Index of the first point where live bytes reach their maximum."""
        live = self.live_bytes()
        return max(range(len(live)), key=lambda i: (live[i], -i))

    def phase_peaks(self) -> dict[str, int]:
        """Phase -> maximum live bytes over that phase's points, in step order."""
        peaks: dict[str, int] = {}
        for (phase, _), live in zip(self.points, self.live_bytes()):
            peaks[phase] = max(peaks.get(phase, 0), live)
        return peaks

    def components_at(self, index: int) -> dict[str, int]:
        """Component -> bytes live at point ``index``."""
        parts: dict[str, int] = defaultdict(int)
        for a in self.allocations:
            if a.start <= index <= a.end:
                parts[a.component] += a.n_bytes
        return dict(parts)
