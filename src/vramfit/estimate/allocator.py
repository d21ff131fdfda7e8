"""A replay of PyTorch's CUDA caching allocator over a timeline's tensors.

``torch.cuda.max_memory_allocated`` counts allocator *blocks*, and the device holds
allocator *segments*; both exceed the bytes the tensors ask for. This module replays
the allocations and frees of a step through the allocator's documented rules
(c10/cuda/CUDACachingAllocator.cpp, default configuration, one stream):

- requests are rounded up to 512 B (``round_size``, kMinBlockSize);
- requests up to 1 MiB come from a small pool of 2 MiB segments; larger ones from a large
  pool whose new segments are 20 MiB for requests under 10 MiB, else the request rounded
  up to 2 MiB (``get_allocation_size``: kSmallBuffer, kLargeBuffer, kRoundLarge);
- a request takes the smallest free cached block of its pool that fits (best fit,
  ``get_free_block``), split when the rest is at least 512 B (small pool) or more than
  1 MiB (large pool) (``should_split``); otherwise the whole block is handed out;
- freed blocks merge with free neighbours of the same segment and stay cached: a segment
  is returned only by ``empty_cache`` (``release_cached_blocks``: every segment that is one
  free block), which the Trainer calls before it trains; ``reserved_peak`` is the most
  ever held (``reserved_bytes.all.peak``);
- when a new segment would not fit (cudaMalloc fails: the GPU is full, or the segments would
  pass ``torch.cuda.set_per_process_memory_fraction``'s limit), the allocator frees every
  cached segment that is one free block and retries once (``malloc``: ``alloc_block``, then
  ``release_cached_blocks`` and ``alloc_block(isRetry)``, counted in ``num_alloc_retries``;
  ``release_available_cached_blocks`` does nothing without ``max_split_size``); a retry that
  fails too is the out-of-memory error;
- every stream has its own pools: a block freed by one stream is never handed to another
  (``BlockPool`` entries compare by stream first, ``get_free_block`` searches the request's
  stream only), so a side stream's segments (FSDP2's all-gather copy-in, its reduce-scatter)
  stay reserved beside the default stream's.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20  # kSmallSize
SMALL_BUFFER = 2 << 20  # kSmallBuffer
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
LARGE_BUFFER = 20 << 20  # kLargeBuffer
ROUND_LARGE = 2 << 20  # kRoundLarge


def round_size(size: int) -> int:
    """A request rounded up to the allocator's 512-byte granularity."""
    return max(MIN_BLOCK, -(-size // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    """Size of the new segment (cudaMalloc) a request of ``size`` rounded bytes creates."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class _Block:
    """A block of a segment: a plain class with slots, as millions are made per estimate."""

    __slots__ = ("segment", "address", "size", "small", "free", "prev", "next", "pool")

    def __init__(
        self,
        segment: int,
        address: int,
        size: int,
        small: bool,
        pool: _Pool,
        prev: _Block | None = None,
        next: _Block | None = None,  # noqa: A002 (the allocator's own name for the link)
    ) -> None:
        self.segment = segment  # the segment's base address
        self.address = address  # segment + offset
        self.size = size
        self.small = small  # belongs to the small pool (its segment is one 2 MiB buffer)
        self.free = True
        self.prev = prev
        self.next = next
        self.pool = pool  # the pool it returns to


class _Pool:
    """One pool's free blocks in the allocator's order (``BlockComparatorSize``: size, then
    address): the distinct sizes in order, each size's block addresses in order, and the
    blocks by address.

    A pool holds many blocks of few sizes (a 512-layer step's large pool: some 1,450 free
    blocks of about 11 sizes), so best fit bisects the sizes and takes the first address of
    the size it finds, rather than bisecting (size, address) pairs over every block."""

    __slots__ = ("sizes", "addresses", "blocks")

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.addresses: dict[int, list[int]] = {}  # size -> addresses of its free blocks
        self.blocks: dict[int, _Block] = {}  # address -> free block

    def entries(self) -> list[tuple[int, int, _Block]]:
        """``(size, address, block)`` of every free block, in the allocator's order."""
        blocks, addresses = self.blocks, self.addresses
        return [(s, a, blocks[a]) for s in self.sizes for a in addresses[s]]

    def add(self, block: _Block) -> None:
        size, address = block.size, block.address
        same = self.addresses.get(size)
        if same is None:
            self.addresses[size] = [address]
            insort(self.sizes, size)
        else:
            insort(same, address)
        self.blocks[address] = block

    def remove(self, block: _Block) -> None:
        size, address = block.size, block.address
        same = self.addresses[size]
        if len(same) == 1:
            del self.addresses[size]
            del self.sizes[bisect_left(self.sizes, size)]
        else:
            del same[bisect_left(same, address)]
        del self.blocks[address]


class OutOfMemory(Exception):
    """A request the allocator cannot serve even after freeing its cache."""

    def __init__(self, size: int) -> None:
        super().__init__(f"out of memory for a request of {size} bytes")
        self.size = size


@dataclass
class CachingAllocator:
    """Allocated and reserved bytes as PyTorch's allocator would report them.

    ``limit``: the most bytes of segments cudaMalloc grants (None: no limit); ``retries``:
    how often the allocator freed its cache to stay within it."""

    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    reserved_peak: int = 0
    limit: int | None = None
    retries: int = 0
    _floor: int = 1 << 62  # the lowest segment address so far: new segments go below it
    _free: dict[bool, _Pool] = field(
        default_factory=lambda: {True: _Pool(), False: _Pool()}
    )  # small pool? -> the default stream's pool
    _live: dict[int, _Block] = field(default_factory=dict)
    _streams: dict[int, dict[bool, _Pool]] = field(default_factory=dict)
    reserved_by_stream: dict[int, int] = field(default_factory=dict)
    _segments: list[_Block] = field(default_factory=list)  # each segment's first block

    def unlink(self) -> None:
        """Break the links between neighbouring blocks once the replay is done: they are
        reference cycles, which reference counting alone cannot free."""
        for block in self._segments:
            while block is not None:
                block.prev, block = None, block.next

    def pools(self) -> list[tuple[int, bool, _Pool]]:
        """``(stream, small, pool)`` of every pool: the default stream's, then the others' in
        stream order."""
        pools = [(0, small, pool) for small, pool in self._free.items()]
        for stream, by_size in sorted(self._streams.items()):
            pools += [(stream, small, pool) for small, pool in by_size.items()]
        return pools

    def state(self) -> tuple[int, int, list[tuple[int, bool, list[tuple[int, int]]]]]:
        """Reserved and allocated bytes and every pool's free blocks ``(size, address)``.

        Between two steps (nothing live but tensors never freed) this is all that decides
        the allocator's next moves: the live blocks are the rest of the segments."""
        pools = [
            (stream, small, [(s, a) for s, a, _ in pool.entries()])
            for stream, small, pool in self.pools()
        ]
        return self.reserved, self.allocated, pools

    def malloc(
        self, handle: int, size: int, segment_address: int | None = None, stream: int = 0
    ) -> None:
        """Allocate ``size`` bytes under ``handle`` (freed later with ``free(handle)``), from
        ``stream``'s pools (0: the default stream).

        A new segment goes below every earlier one (our model of cudaMalloc's addresses),
        unless ``segment_address`` says where the driver put it (replaying a real trace).
        """
        self._live[handle] = self.take(size, stream, segment_address)

    def free(self, handle: int) -> None:
        """Return the block of ``handle`` to its pool."""
        self.give(self._live.pop(handle))

    def take(self, size: int, stream: int = 0, segment_address: int | None = None) -> _Block:
        """``malloc`` without a handle: the block itself, for ``give`` (a replay holds the
        blocks it allocates rather than looking each up by handle)."""
        # round_size, segment_size and the pool's own methods, inlined: this is the
        # estimator's innermost loop
        size = -(-size // MIN_BLOCK) * MIN_BLOCK if size > MIN_BLOCK else MIN_BLOCK
        small = size <= SMALL_SIZE
        if stream:
            pools = self._streams.get(stream)
            if pools is None:
                pools = self._streams[stream] = {True: _Pool(), False: _Pool()}
            pool = pools[small]
        else:
            pool = self._free[small]
        sizes = pool.sizes
        i = bisect_left(sizes, size)
        if i < len(sizes):  # best fit: the smallest size that fits, its lowest address
            fit = sizes[i]
            same = pool.addresses[fit]
            if len(same) == 1:
                del pool.addresses[fit]
                del sizes[i]
                block = pool.blocks.pop(same[0])
            else:
                block = pool.blocks.pop(same.pop(0))
        else:
            if small:
                seg = SMALL_BUFFER
            elif size < MIN_LARGE_ALLOC:
                seg = LARGE_BUFFER
            else:
                seg = -(-size // ROUND_LARGE) * ROUND_LARGE
            if self.limit is not None and self.reserved + seg > self.limit:
                # cudaMalloc fails: free the cached whole segments, then retry once
                self.retries += 1
                self.empty_cache()
                if self.reserved + seg > self.limit:
                    raise OutOfMemory(size)
            # a new segment's address: below every earlier one, as cudaMalloc placed most
            # new segments in the recorded traces (it decides which equal free block is taken)
            if segment_address is None:
                base = self._floor = self._floor - seg
            else:
                base = segment_address
            block = _Block(base, base, seg, small, pool)
            self._segments.append(block)
            self.reserved += seg
            if self.reserved > self.reserved_peak:
                self.reserved_peak = self.reserved
            self.reserved_by_stream[stream] = self.reserved_by_stream.get(stream, 0) + seg
        remaining = block.size - size
        if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE):
            after = block.next
            address = block.address + size
            rest = _Block(block.segment, address, remaining, small, pool, block, after)
            if after is not None:
                after.prev = rest
            block.next = rest
            block.size = size
            same = pool.addresses.get(remaining)
            if same is None:
                pool.addresses[remaining] = [address]
                insort(sizes, remaining)
            else:
                insort(same, address)
            pool.blocks[address] = rest
        block.free = False
        allocated = self.allocated + block.size
        self.allocated = allocated
        if allocated > self.peak_allocated:
            self.peak_allocated = allocated
        return block

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache``: return every segment that is one free block, in every
        stream's pools (``release_cached_blocks``); a segment with any block in use stays."""
        for stream, _, pool in self.pools():
            whole = [b for b in pool.blocks.values() if b.prev is None and b.next is None]
            for block in whole:
                pool.remove(block)
                self.reserved -= block.size
                self.reserved_by_stream[stream] -= block.size
        # a segment's first block is one free block exactly when the segment was returned
        self._segments = [b for b in self._segments if not (b.free and b.next is None)]

    def give(self, block: _Block) -> None:
        """Return a block to its pool, merging it with free neighbours of its segment."""
        self.allocated -= block.size
        pool = block.pool
        block.free = True
        before, after = block.prev, block.next
        if before is not None and before.free:
            pool.remove(before)
            before.size += block.size
            before.next = after
            if after is not None:
                after.prev = before
            block = before
        if after is not None and after.free:
            pool.remove(after)
            block.size += after.size
            block.next = after.next
            if after.next is not None:
                after.next.prev = block
        pool.add(block)
