"""The replay and the allocator model, against a plain transcription of the same rules.

``vramfit.estimate.allocator`` and ``timeline.replay`` are written for speed (slotted blocks,
inlined rounding and free-pool updates, a single pass over allocations in point order). The
reference below states the same rules the slow, obvious way (c10/cuda/CUDACachingAllocator.cpp:
512-byte rounding, 2 MiB small / 20 MiB large segments, best fit with the lowest address
among equal sizes, split thresholds, merging with free neighbours); both must agree to the
byte on every point of every step, over a grid of real step programs and over random
request sequences.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vramfit.config import Mode, RunSpec
from vramfit.estimate.allocator import CachingAllocator, OutOfMemory
from vramfit.estimate.profiles.reference import inference, training_steps
from vramfit.estimate.timeline import Allocation, Timeline, replay

KIB, MIB = 1 << 10, 1 << 20


@dataclass
class _Block:
    segment: int
    offset: int
    size: int
    small: bool
    free: bool = True
    prev: _Block | None = None
    next: _Block | None = None

    @property
    def address(self) -> int:
        return self.segment + self.offset


@dataclass
class PlainAllocator:
    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    pools: dict[bool, list[tuple[int, int, _Block]]] = field(
        default_factory=lambda: {True: [], False: []}
    )
    live: dict[int, _Block] = field(default_factory=dict)
    limit: int | None = None  # cudaMalloc refuses segments past it
    retries: int = 0
    lowest: int = 1 << 62  # new segments go below every earlier one

    def _cuda_malloc_fails(self, seg: int) -> bool:
        return self.limit is not None and self.reserved + seg > self.limit

    def _release_cached(self) -> None:
        """release_cached_blocks: every free block that is a whole segment goes back."""
        for pool in self.pools.values():
            whole = [e for e in pool if e[2].prev is None and e[2].next is None]
            for entry in whole:
                pool.remove(entry)
                self.reserved -= entry[0]

    def malloc(self, handle: int, size: int) -> None:
        size = max(512, -(-size // 512) * 512)
        small = size <= MIB
        pool = self.pools[small]
        fitting = [entry for entry in pool if entry[0] >= size]
        if fitting:
            entry = min(fitting, key=lambda e: (e[0], e[1]))
            pool.remove(entry)
            block = entry[2]
        else:
            if small:
                seg = 2 * MIB
            elif size < 10 * MIB:
                seg = 20 * MIB
            else:
                seg = -(-size // (2 * MIB)) * 2 * MIB
            if self._cuda_malloc_fails(seg):
                self.retries += 1
                self._release_cached()
                if self._cuda_malloc_fails(seg):
                    raise MemoryError(size)
            self.lowest -= seg
            block = _Block(self.lowest, 0, seg, small)
            self.reserved += seg
        remaining = block.size - size
        if (remaining >= 512) if small else (remaining > MIB):
            rest = _Block(block.segment, block.offset + size, remaining, small, True, block)
            rest.next = block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            pool.append((rest.size, rest.address, rest))
        block.free = False
        self.live[handle] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, handle: int) -> None:
        block = self.live.pop(handle)
        self.allocated -= block.size
        pool = self.pools[block.small]
        block.free = True
        prev, nxt = block.prev, block.next
        if prev is not None and prev.free:
            pool.remove((prev.size, prev.address, prev))
            prev.size += block.size
            prev.next = nxt
            if nxt is not None:
                nxt.prev = prev
            block = prev
        if nxt is not None and nxt.free:
            pool.remove((nxt.size, nxt.address, nxt))
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        pool.append((block.size, block.address, block))

    def free_blocks(self) -> list[tuple[bool, int, int]]:
        return sorted((small, a, s) for small, pool in self.pools.items() for s, a, _ in pool)


def plain_replay(steps: Sequence[Timeline]) -> tuple[list[list[int]], int, int]:
    """The replay's rules, point by point: make what starts, record, free what ends."""
    alloc = PlainAllocator()
    handles = itertools.count(1)
    made: set[str] = set()
    allocated = []
    for timeline in steps:
        last = len(timeline.points) - 1
        ends: dict[int, list[int]] = defaultdict(list)
        per_point = []
        for i in range(len(timeline.points)):
            for a in timeline.allocations:
                if a.start != i or (a.persistent and a.name in made):
                    continue
                ids = [next(handles) for _ in a.sizes]
                for h, size in zip(ids, a.sizes, strict=True):
                    alloc.malloc(h, size)
                if a.persistent:
                    made.add(a.name)
                else:
                    ends[min(a.end, last + 1) if a.end < last else last + 1] += ids
            per_point.append(alloc.allocated)
            for h in ends.pop(i, []):
                alloc.free(h)
        for h in ends.pop(last + 1, []):
            alloc.free(h)
        allocated.append(per_point)
    return allocated, alloc.peak_allocated, alloc.reserved


def _runs() -> list[dict]:
    """1-8 layers, both families, eager and flash, every checkpointing, training and inference
    with and without generated tokens; precisions and GQA rotate through the grid."""
    precisions = ["amp-bf16", "fp32", "bf16", "amp-fp16"]
    runs = []
    for n, (arch, layers, attention, work) in enumerate(
        itertools.product(
            ["llama", "gpt2"],
            range(1, 9),
            ["eager", "flash"],
            ["none", "selective", "full", "infer", "infer+gen"],
        )
    ):
        model: dict = {"arch": arch, "layers": layers, "hidden": 128, "vocab": 1000}
        if n % 3 == 0:
            model.update(heads=4, kv_heads=2)
        workload: dict = {
            "impl": "reference",
            "attention": attention,
            "seq": 64 + 32 * (n % 5),
            "batch": 1 + n % 3,
        }
        workload["precision"] = precisions[n % 4 if not work.startswith("infer") else n % 3 + 1]
        if work.startswith("infer"):
            workload.update(mode="infer", gen_tokens=16 if work == "infer+gen" else 0)
        else:
            workload["checkpointing"] = work
        runs.append({"model": model, "workload": workload})
    return runs


def _steps(case: dict) -> list[Timeline]:
    run = RunSpec.model_validate(case)
    if run.workload.mode is Mode.train:
        first, steady, _ = training_steps(run.model, run.workload, 8 * MIB)
        return [first, steady, steady]
    return [inference(run.model.resolved(), run.workload, 8 * MIB)]


@pytest.mark.parametrize("case", _runs(), ids=lambda c: str(sorted(c["workload"].items())))
def test_the_fast_replay_is_the_plain_replay_to_the_byte(case: dict) -> None:
    steps = _steps(case)
    fast = replay(steps)
    allocated, peak, reserved = plain_replay(steps)
    assert fast.allocated == allocated
    assert (fast.peak_allocated, fast.reserved) == (peak, reserved)


def _one_point(*sizes: int) -> Timeline:
    return Timeline(
        points=[("forward", "op")],
        allocations=[Allocation(f"t{i}", "activations", (n,), 0, 0) for i, n in enumerate(sizes)],
    )


def test_a_repeated_step_from_another_state_is_replayed_again() -> None:
    # after a first step that leaves one free 30 MiB segment, the steady step's 13 MiB
    # request finds no room and gets a segment of its own, 14 MiB, whole (1 MiB left is not
    # split off); the next steady step starts with that segment cached, fits its 12 MiB
    # request there and splits the 30 MiB one for the 13 MiB: 1 MiB less allocated. A replay
    # that took the second steady step for the first (same program) would miss it.
    first, steady = _one_point(30 * MIB), _one_point(12 * MIB, 25 * MIB // 2, 13 * MIB)
    fast = replay([first, steady, steady])
    allocated, peak, reserved = plain_replay([first, steady, steady])
    assert allocated[1] != allocated[2]
    assert fast.allocated == allocated
    assert (fast.peak_allocated, fast.reserved) == (peak, reserved)


_SIZES = st.one_of(
    # the thresholds themselves: 512 B, the 1 MiB pool boundary, 10 MiB, a segment less 1 MiB
    st.sampled_from([512, 513, MIB, MIB + 1, 10 * MIB - 1, 10 * MIB, 19 * MIB, 2 * MIB - 512]),
    st.integers(1, 4 * KIB),  # small pool, under one block
    st.integers(1, MIB + 1024),  # around the small/large boundary
    st.integers(MIB, 12 * MIB),  # 20 MiB segments and the 10 MiB threshold
    st.integers(8 * MIB, 64 * MIB),  # rounded to 2 MiB
)


_LIMITS = st.one_of(st.none(), st.integers(0, 200).map(lambda n: n * MIB))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), _SIZES, st.integers(0, 10**6)), max_size=120), _LIMITS
)
@example([(True, 19 * MIB, 0)], None)  # 1 MiB left in a 20 MiB segment: not split
@example([(True, 2 * MIB - 512, 0), (True, 512, 0), (False, 0, 0), (False, 0, 0)], None)
# at the limit: the free 20 MiB segment goes back for the 30 MiB one, then no room is left
@example([(True, 12 * MIB, 0), (False, 0, 0), (True, 30 * MIB, 0), (True, 30 * MIB, 0)], 40 * MIB)
def test_the_allocator_is_the_plain_allocator(
    ops: list[tuple[bool, int, int]], limit: int | None
) -> None:
    fast, plain = CachingAllocator(limit=limit), PlainAllocator(limit=limit)
    live: list[int] = []
    for handle, (make, size, pick) in enumerate(ops):
        if make or not live:
            try:
                plain.malloc(handle, size)
            except MemoryError:
                with pytest.raises(OutOfMemory):
                    fast.malloc(handle, size)
                assert fast.retries == plain.retries
                return
            fast.malloc(handle, size)
            live.append(handle)
        else:
            victim = live.pop(pick % len(live))
            fast.free(victim)
            plain.free(victim)
        assert (fast.allocated, fast.reserved, fast.peak_allocated, fast.retries) == (
            plain.allocated,
            plain.reserved,
            plain.peak_allocated,
            plain.retries,
        )
        fast_free = sorted(
            (small, a, s) for _, small, pool in fast.pools() for s, a, _ in pool.entries()
        )
        assert fast_free == plain.free_blocks()
