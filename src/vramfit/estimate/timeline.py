"""A memory timeline: allocations with lifetimes over the points of one step.

Rather than one big sum, each tensor (or group of tensors with one lifetime) is an
``Allocation`` that is live from one point of the step to another. The bytes live at a
point are the sum of the allocations spanning it; a phase's peak is the maximum over its
points. Checkpointing, attention kernels, optimizers and the KV cache become changes to
the list of allocations, not special cases in a formula. ``replay`` feeds the same list,
tensor by tensor, through the caching allocator model to get what PyTorch reports.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from operator import attrgetter, itemgetter

from vramfit.estimate.allocator import CachingAllocator, OutOfMemory

# The memory components a tensor can belong to, in the breakdown's display order
# (vramfit.estimate.graph.Component names them; vramfit.estimate.core adds what the allocator
# and the driver hold besides).
TENSOR_COMPONENTS = (
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
    "sharded_weights",
    "sharded_gradients",
    "unsharded_weights",
    "unsharded_gradients",
    "collective_buffers",
)
COMPONENT_NAMES = frozenset(TENSOR_COMPONENTS)

@dataclass(slots=True)
class Allocation:
    """Tensors of ``sizes`` bytes, live from point ``start`` to point ``end`` (inclusive).

    ``persistent`` allocations (weights, optimizer state, workspaces) outlive the step: a
    replay of several steps allocates them once. ``part``: for saved activations, the part
    of the block that saved them ("norm", "attention" or "mlp"). A ``Tape`` makes one per
    tensor as the op runs (``end`` is None until it is freed) and hands the same objects to
    its ``Timeline``: a 512-layer step has about fifty thousand.
    """

    name: str
    component: str
    sizes: tuple[int, ...]
    start: int
    end: int | None = None
    persistent: bool = False
    part: str = ""
    stream: int = 0  # the CUDA stream that allocates it (0: the default stream)

    @property
    def n_bytes(self) -> int:
        return sum(self.sizes)


@dataclass
class Timeline:
    """Points in step order (each tagged with its phase) and the allocations over them."""

    points: list[tuple[str, str]] = field(default_factory=list)  # (phase, point name)
    allocations: list[Allocation] = field(default_factory=list)
    # points after whose frees the program calls torch.cuda.empty_cache (``Tape.empty_cache``)
    releases: list[int] = field(default_factory=list)

    @property
    def last(self) -> int:
        return len(self.points) - 1

    def phase_runs(self) -> list[tuple[str, int, int]]:
        """``(phase, start, end)``: each run of consecutive points of one phase, ``end``
        excluded."""
        runs: list[tuple[str, int, int]] = []
        start = 0
        for phase, group in groupby(self.points, key=itemgetter(0)):
            end = start + len(list(group))
            runs.append((phase, start, end))
            start = end
        return runs

    def live_bytes(self) -> list[int]:
        """Requested bytes live at each point (difference array: O(points + allocations))."""
        delta = [0] * (len(self.points) + 1)
        for a in self.allocations:
            sizes = a.sizes
            n_bytes = sizes[0] if len(sizes) == 1 else sum(sizes)
            delta[a.start] += n_bytes
            delta[a.end + 1] -= n_bytes
        live, running = [], 0
        for d in delta[:-1]:
            running += d
            live.append(running)
        return live

    def components_at(self, index: int) -> dict[str, int]:
        """Component -> requested bytes live at point ``index``."""
        parts: dict[str, int] = defaultdict(int)
        for a in self.allocations:
            if a.start <= index <= a.end:
                parts[a.component] += a.n_bytes
        return dict(parts)


@dataclass
class Tape:
    """Builds a Timeline op by op: a tensor is recorded when created and closed when freed.

    Within an op, tensors are allocated in creation order and freed after all of them.
    """

    timeline: Timeline = field(default_factory=Timeline)
    records: list[Allocation] = field(default_factory=list)
    phase: str = "forward"

    def op(self, name: str) -> int:
        """Append a point of the current phase to the timeline and return its index."""
        points = self.timeline.points
        points.append((self.phase, name))
        return len(points) - 1

    @property
    def now(self) -> int:
        return len(self.timeline.points) - 1

    def new(
        self, name: str, component: str, size: int, part: str = "", stream: int = 0
    ) -> int | None:
        """Create a tensor at the current op (on ``stream``); its key, or None for an empty
        one. A component that is not one of ``COMPONENT_NAMES`` is an error, not bytes lost
        from a total."""
        if component not in COMPONENT_NAMES:
            raise ValueError(f"unknown memory component {component!r}")
        if size <= 0:
            return None
        records = self.records
        now = len(self.timeline.points) - 1
        records.append(Allocation(name, component, (int(size),), now, None, False, part, stream))
        return len(records) - 1

    def free(self, *keys: int | None) -> None:
        """Free tensors after the current op (None keys are ignored)."""
        records, now = self.records, len(self.timeline.points) - 1
        for key in keys:
            if key is not None:
                record = records[key]
                if record.end is None:
                    record.end = now

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()`` after the current op's frees: the allocator returns
        every cached segment that holds no tensor."""
        self.timeline.releases.append(self.now)

    def temp(self, name: str, component: str, size: int) -> None:
        """A tensor created and freed within the current op."""
        self.free(self.new(name, component, size))

    def persist(
        self, name: str, component: str, sizes: Sequence[int], stream: int = 0
    ) -> int | None:
        """Tensors that outlive the step (weights, optimizer state, workspaces), from now on;
        their key, or None when all are empty."""
        if component not in COMPONENT_NAMES:
            raise ValueError(f"unknown memory component {component!r}")
        sizes = tuple(int(s) for s in sizes if s > 0)
        if not sizes:
            return None
        self.records.append(Allocation(name, component, sizes, self.now, None, True, "", stream))
        return len(self.records) - 1

    def mark(self) -> tuple[int, int]:
        """Where the tape is: its record and point counts (the start of a ``span``)."""
        return len(self.records), len(self.timeline.points)

    def span(self, start: tuple[int, int], leave_out: Collection[int] = ()) -> Span:
        """What the tape recorded since ``start``, less the records under the keys
        ``leave_out``: to be played onto a later step's tape (``play``)."""
        first_record, first_point = start
        records = self.records
        return Span(
            first_point,
            self.timeline.points[first_point:],
            [records[k] for k in range(first_record, len(records)) if k not in leave_out],
            self.phase,
        )

    def play(self, span: Span) -> None:
        """Append ``span``'s points and records, recorded on a tape whose points before it
        were this one's. The records themselves are shared, not copied: their ends are the
        same points on both tapes, and the tape they were recorded on has set the last of
        them (its frees after the span, its ``finish``) before a later step plays them."""
        if len(self.timeline.points) != span.first_point:
            raise ValueError("a span plays onto a tape at the point where it was recorded")
        self.timeline.points.extend(span.points)
        self.records.extend(span.records)
        self.phase = span.phase

    def finish(self) -> Timeline:
        """Close what is still open at the step's end (gradients: the next zero_grad)."""
        last = self.now
        for record in self.records:
            if record.persistent or record.end is None:
                record.end = last
        self.timeline.allocations.extend(self.records)
        return self.timeline

    def block_bytes(self, forward_end: int) -> dict[str, int]:
        """Bytes made by block 0's forward and still alive at the forward's end, by part."""
        parts: dict[str, int] = {}
        for r in self.records:
            if r.part and r.name.startswith("block 0 ") and r.start <= forward_end:
                if r.end is None or r.end > forward_end:
                    parts[r.part] = parts.get(r.part, 0) + sum(r.sizes)
        return parts


@dataclass(frozen=True)
class Span:
    """Points and records one tape made in a row (``Tape.span``): the simulated forward and
    backward of a first training step, which a steady step repeats (``Tape.play``)."""

    first_point: int
    points: list[tuple[str, str]]
    records: list[Allocation]
    phase: str  # the tape's phase at its end


@dataclass(frozen=True)
class Replay:
    """What the caching allocator reports over a sequence of steps.

    ``allocated[k][i]``: bytes in allocated blocks at point ``i`` of step ``k`` (at its
    largest moment: after the point's allocations, before its frees). ``reserved``: the
    most bytes of segments held at once (a step's ``empty_cache`` returns some).
    """

    allocated: list[list[int]]
    peak_allocated: int
    reserved: int
    reserved_by_stream: dict[int, int] = field(default_factory=dict)
    retries: int = 0  # the allocator freed its cache to stay within the limit
    # (step, point, request bytes) where a request failed even after that; the replay
    # stops there
    out_of_memory: tuple[int, int, int] | None = None


def replay(steps: Sequence[Timeline], limit: int | None = None) -> Replay:
    """Replay ``steps`` in order through the caching allocator.

    At each point the allocations starting there are made in order, then those ending
    there are freed, then the cache is emptied where the step says so (``releases``); what
    ends at a step's last point is freed after it (the next step's
    ``zero_grad(set_to_none=True)``). Persistent allocations are made once and kept. The
    replay holds the blocks the allocator hands out (``take``), not handles. ``limit``: the
    most bytes of segments the GPU grants (``CachingAllocator.limit``).
    """
    alloc = CachingAllocator(limit=limit)
    try:
        allocated = _replay(alloc, steps)
        out_of_memory = None
    except _Stopped as stop:
        allocated, out_of_memory = stop.allocated, stop.where
    alloc.unlink()
    return Replay(
        allocated=allocated,
        peak_allocated=alloc.peak_allocated,
        reserved=alloc.reserved_peak,
        reserved_by_stream=dict(alloc.reserved_by_stream),
        retries=alloc.retries,
        out_of_memory=out_of_memory,
    )


class _Stopped(Exception):
    """The replay ran out of memory: what it got through, and where it stopped."""

    def __init__(self, allocated: list[list[int]], where: tuple[int, int, int]) -> None:
        super().__init__(where)
        self.allocated, self.where = allocated, where


def _replay(alloc: CachingAllocator, steps: Sequence[Timeline]) -> list[list[int]]:
    take, give = alloc.take, alloc.give
    made: set[str] = set()
    allocated: list[list[int]] = []
    last: tuple[Timeline, frozenset[str], object, list[int]] | None = None  # step, its start
    for timeline in steps:
        state = alloc.state()
        if last is not None and last[0] is timeline and last[1] == made and last[2] == state:
            # the last step again, from the state it started in (it left the allocator as it
            # found it): a replay is deterministic, so this step is that one
            allocated.append(last[3])
            continue
        before = frozenset(made)
        n_points = len(timeline.points)
        final = n_points - 1
        # in point order, keeping the order within a point (a Tape already records so)
        todo = [a for a in timeline.allocations if not (a.persistent and a.name in made)]
        todo.sort(key=attrgetter("start"))
        todo.append(Allocation("", "", (), n_points, n_points))  # a sentinel past the end
        ends: dict[int, list] = {}  # point -> blocks freed after it
        releases = frozenset(timeline.releases)
        per_point: list[int] = []
        k = 0
        for i in range(n_points):
            a = todo[k]
            try:
                while a.start == i:
                    stream = a.stream
                    if a.persistent:
                        for size in a.sizes:
                            take(size, stream)
                        made.add(a.name)
                    else:
                        end = a.end if a.end < final else n_points
                        freed = ends.get(end)
                        if freed is None:
                            freed = ends[end] = []
                        for size in a.sizes:
                            freed.append(take(size, stream))
                    k += 1
                    a = todo[k]
            except OutOfMemory as oom:
                per_point.append(alloc.allocated)
                raise _Stopped([*allocated, per_point], (len(allocated), i, oom.size)) from None
            per_point.append(alloc.allocated)
            blocks = ends.pop(i, None)
            if blocks is not None:
                for block in blocks:
                    give(block)
            if releases and i in releases:
                alloc.empty_cache()
        for block in ends.pop(n_points, ()):
            give(block)
        allocated.append(per_point)
        last = timeline, before, state, per_point
    return allocated
