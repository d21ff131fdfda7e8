"""An autograd-level simulation of one step: a graph of ops, replayed as PyTorch runs it.

An implementation profile (``vramfit.estimate.profiles``) describes the model's forward as a
graph of ops, each an autograd node of ``vramfit.estimate.ops`` that states what its forward
allocates, what autograd saves, and what its backward allocates. Nothing here knows about
transformers; the schedules below are generic:

- ``forward`` with grad mode on: each tensor lives until its last forward use or until the
  last node that saved it has run its backward, whichever is later (autograd's
  ``SavedVariable`` holds a reference; ``release_variables`` drops it after the node ran).
- inside a checkpointed region (``torch.utils.checkpoint``, non-reentrant), nothing is saved:
  the checkpoint keeps the region's inputs; backward reruns the region, saving, as soon as a
  node of it needs a saved tensor, and stops once the last tensor the region saves exists
  (``_StopRecomputationError`` in torch/utils/checkpoint.py).
- ``backward`` follows torch/csrc/autograd/engine.cpp on one device: nodes run in reverse
  creation order (the ready queue orders by sequence number); per node: the backward
  formula allocates the input gradients (``ops``), the incoming gradients die when it
  returns, ``validate_outputs`` reduces a broadcast gradient to its input's shape
  (``sum_to``) and casts it to the input's dtype, then the node releases its saved tensors,
  and each gradient is added to its input's buffer: in place when the buffer holds the only
  reference to a non-view tensor, else as a new sum (``InputBuffer::accumulate``). A leaf's
  ``AccumulateGrad`` steals a fresh gradient and clones any other.
- no grad mode (inference, evaluation): nothing is saved, every tensor dies at its last use.

The result is a ``Tape`` (``vramfit.estimate.timeline``): the same allocations and frees that
``replay`` feeds through the caching-allocator model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from operator import attrgetter
from typing import TYPE_CHECKING

from vramfit.estimate.kernels import H200, Multiprocessors, column_sum_scratch_bytes
from vramfit.estimate.timeline import Span, Tape

if TYPE_CHECKING:
    from vramfit.estimate.inference import Workspaces


_SIZES = {"fp32": 4, "fp16": 2, "bf16": 2, "int64": 8, "int32": 4, "uint8": 1, "int8": 1, "bool": 1}


class DType(str, Enum):
    """Element types of the simulated tensors. ``size`` (bytes per element) and ``floating``
    are plain attributes of each member, not properties: an estimate reads them for every
    tensor it makes."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int64 = "int64"
    int32 = "int32"
    uint8 = "uint8"
    int8 = "int8"
    bool = "bool"

    def __init__(self, value: str) -> None:
        self.size: int = _SIZES[value]
        self.floating: bool = value in ("fp32", "fp16", "bf16")


FLOATS = frozenset(t for t in DType if t.floating)


class Component(str, Enum):
    """What a tensor is, for the breakdown (PyTorch's mem_tracker names its kinds likewise)."""

    weights = "weights"
    autocast_weight_copies = "autocast_weight_copies"
    gradients = "gradients"
    optimizer_state = "optimizer_state"
    optimizer_temp = "optimizer_temp"
    activations = "activations"
    activation_grads = "activation_grads"
    logits = "logits"
    kv_cache = "kv_cache"
    cublas_workspace = "cublas_workspace"
    # a data-parallel engine's (FSDP2, ZeRO): this rank's shards, and the unsharded copies of
    # the layers in flight, the all-gather / reduce-scatter buffers
    sharded_weights = "sharded_weights"
    sharded_gradients = "sharded_gradients"
    unsharded_weights = "unsharded_weights"
    unsharded_gradients = "unsharded_gradients"
    collective_buffers = "collective_buffers"


@dataclass(eq=False, slots=True)
class Tensor:
    """A tensor of the forward graph. A view shares its ``base``'s storage."""

    name: str
    numel: int
    dtype: DType
    requires_grad: bool = False
    component: Component = Component.activations
    base: Tensor | None = None
    leaf: bool = False  # a parameter (or other leaf) that lives outside the step
    trainable: bool = False  # a parameter that requires grad (whatever the grad mode)
    part: str = ""  # for saved activations: norm / attention / mlp
    # a parameter (or a copy or gradient of one) of a model declared at another size than
    # its shapes give (``--params``): bytes are round(numel * scale * itemsize)
    scale: float = 1.0
    # one value per row, (..., 1): ``mean(-1, keepdim=True)`` and elementwise ops on it. A
    # gradient broadcast from it is reduced along the fastest-moving dimension, which
    # stages nothing in global memory (unlike a bias's column sum)
    per_row: bool = False

    @property
    def nbytes(self) -> int:
        return self.bytes_as(self.dtype)

    def bytes_as(self, dtype: DType) -> int:
        """Bytes of a tensor like this one in ``dtype`` (its gradient, its cast)."""
        if self.scale == 1.0:
            return self.numel * dtype.size
        return round(self.numel * self.scale * dtype.size)

    @property
    def root(self) -> Tensor:
        t = self
        while t.base is not None:
            t = t.base
        return t


@dataclass(eq=False, slots=True)
class _GradStorage:
    key: int | None
    refs: int = 1


@dataclass(eq=False, slots=True)
class Grad:
    """A gradient during backward: one holder's reference to a gradient storage."""

    storage: _GradStorage
    numel: int
    dtype: DType
    view: bool = False  # a view of another tensor: autograd cannot add into it in place


class Backward:
    """What a backward formula sees: the incoming gradients, and calls to make its outputs."""

    def __init__(self, sim: _Sim, node: Node, grads_out: list[Grad | None]) -> None:
        self.sim, self.node, self.grads_out = sim, node, grads_out
        self.results: list[tuple[int, Grad]] = []

    def needs(self, i: int) -> bool:
        """Whether input ``i`` gets a gradient (it requires grad)."""
        return self.node.inputs[i].requires_grad

    def out(self, j: int = 0) -> Grad | None:
        return self.grads_out[j]

    def new(
        self,
        i: int,
        numel: int | None = None,
        dtype: DType | None = None,
        *,
        view: bool = False,
        name: str = "",
    ) -> Grad | None:
        """Allocate input ``i``'s gradient (by default its input's size and dtype). ``view``:
        the formula returns a view of what it computed (a reshape of a matmul's output)."""
        if not self.needs(i):
            return None
        x = self.node.inputs[i]
        dtype = x.dtype if dtype is None else dtype
        nbytes = x.bytes_as(dtype) if numel is None else numel * dtype.size
        numel = x.numel if numel is None else numel
        label = name or f"{self.node.name} grad of {x.name}"
        key = self.sim.tape.new(label, Component.activation_grads, nbytes)
        g = Grad(_GradStorage(key), numel, dtype, view=view)
        self.results.append((i, g))
        return g

    def alias(self, i: int, g: Grad | None, *, view: bool = False) -> None:
        """Input ``i``'s gradient is ``g`` itself (AddBackward passes its gradient to both
        inputs; validate_outputs reduces it where the input was broadcast) or, with ``view``,
        a view of it shaped like the input (a reshape, a slice): no allocation."""
        if g is None or not self.needs(i):
            return
        g.storage.refs += 1
        numel = self.node.inputs[i].numel if view else g.numel
        self.results.append((i, Grad(g.storage, numel, g.dtype, view or g.view)))

    def temp(self, name: str, nbytes: int) -> None:
        """Scratch the backward kernel allocates and frees within the node."""
        self.sim.tape.temp(f"{self.node.name} {name}", Component.activation_grads, nbytes)

    def temp_alloc(self, name: str, nbytes: int) -> int | None:
        """Scratch that lives until ``free``."""
        return self.sim.tape.new(f"{self.node.name} {name}", Component.activation_grads, nbytes)

    def free(self, key: int | None) -> None:
        self.sim.tape.free(key)


BackwardRule = Callable[[Backward], None]


class Hooks:
    """What a parallel engine does around the modules it wraps (no-ops here): FSDP2's
    pre/post-forward hooks (``_fsdp_state.py`` ``_pre_forward`` / ``_post_forward``), its
    pre-backward hook on a module's outputs and its post-backward function on its inputs
    (``RegisterPostBackwardFunction``), and the root's final backward callback. ``unit`` is a
    decoder layer; the root (everything outside the layers) has ``forward_start`` /
    ``forward_end`` and ``backward_start`` / ``backward_end``."""

    def forward_start(self, sim: _Sim) -> None: ...
    def unit_forward(self, sim: _Sim, unit: int) -> None: ...
    def unit_forward_done(self, sim: _Sim, unit: int) -> None: ...
    def forward_end(self, sim: _Sim) -> None: ...
    def backward_start(self, sim: _Sim) -> None: ...
    def unit_backward(self, sim: _Sim, unit: int) -> None: ...
    def unit_backward_done(self, sim: _Sim, unit: int) -> None: ...
    def backward_end(self, sim: _Sim) -> None: ...


@dataclass(eq=False, slots=True)
class Node:
    """One autograd node (or an op that records none) of the forward graph."""

    name: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    saved: list[Tensor] = field(default_factory=list)
    backward: BackwardRule | None = None
    hidden: list[Tensor] = field(default_factory=list)  # outputs only autograd sees
    scratch: list[tuple[str, int]] = field(default_factory=list)  # forward temporaries
    region: int | None = None  # checkpointed region
    cast_cache: bool = False  # autocast's cached cast of a parameter: lives to autocast's exit
    new_point: bool = True
    matmul: bool | None = None  # a cuBLAS matmul (True: with a bias epilogue, cuBLASLt)
    # tensors an autograd Function keeps as ctx attributes, not through save_for_backward:
    # saved-tensor hooks never see them, so a non-reentrant checkpoint cannot drop them
    # (bitsandbytes' MatMul8bitLt: ctx.tensors)
    kept: list[Tensor] = field(default_factory=list)
    unit: int | None = None  # the decoder layer (a sharding unit) the op runs in
    backward_point: bool = True  # its backward is a point of its own (else: the previous's)
    rerun: bool = True  # a checkpoint's recompute runs it too (False: the first run's only)
    first_run: bool = True  # the forward runs it (False: only a checkpoint's recompute)
    autocast_exit: bool = False  # the model's autocast context exits before this op
    # autograd's sequence number: backward runs the ready node with the highest first
    # (engine.cpp ReadyQueue); the creation index unless a profile reorders two nodes
    seq: int = 0


class Graph:
    """The forward graph a profile builds, op by op."""

    def __init__(self, *, grad: bool, inference_mode: bool | None = None) -> None:
        self.grad = grad  # grad mode: autograd records nodes and saves tensors
        # without grad: torch.inference_mode (the default) or torch.no_grad. Autocast caches a
        # cast of a leaf that requires grad under no_grad as in grad mode, and not under
        # inference_mode (autocast_mode.cpp cached_cast; checked on the CPU: a second linear
        # under no_grad casts only its input)
        self.inference_mode = not grad if inference_mode is None else inference_mode
        self.nodes: list[Node] = []
        self.leaves: list[Tensor] = []
        self._region: int | None = None
        self._regions = 0
        self.held: list[tuple[Tensor, str]] = []  # tensors a caller keeps: (tensor, until)
        # reentrant torch.utils.checkpoint reruns a whole region (no early stop)
        self.reentrant = False
        self._unit: int | None = None
        # a non-reentrant rerun stops by raising (_StopRecomputationError): the region's
        # Python frame, with every local it still names, lives until the stop
        self.rerun_frame = False
        # the rerun starts at the region's first backward node, not at the first that
        # unpacks a saved tensor (the reference program's order)
        self.recompute_at_entry = False
        # the checkpoint's frame (holding the region's inputs) dies with the last saved
        # tensor of the region, not with the region's first node
        self.frame_dies_with_saved = False

    def leaf(
        self,
        name: str,
        numel: int,
        dtype: DType,
        *,
        requires_grad: bool,
        component: Component = Component.weights,
    ) -> Tensor:
        """A tensor that exists before the step (a parameter, or the input ids)."""
        t = Tensor(name, numel, dtype, requires_grad and self.grad, component, leaf=True)
        t.trainable = requires_grad
        self.leaves.append(t)
        return t

    def node(
        self,
        name: str,
        inputs: Sequence[Tensor],
        outputs: Sequence[Tensor],
        *,
        saved: Sequence[Tensor] = (),
        backward: BackwardRule | None = None,
        hidden: Sequence[Tensor] = (),
        scratch: Sequence[tuple[str, int]] = (),
        cast_cache: bool = False,
        new_point: bool = True,
        kept: Sequence[Tensor] = (),
    ) -> Node:
        """Record an op. Its outputs require grad when any input does (and grad mode is on).
        ``kept``: what its backward holds outside the saved-tensor hooks (``Node.kept``)."""
        grad = self.grad and backward is not None and any(x.requires_grad for x in inputs)
        n = Node(
            name,
            list(inputs),
            list(outputs),
            list(saved) if grad else [],
            backward if grad else None,
            list(hidden),
            list(scratch),
            self._region,
            cast_cache and not self.inference_mode,
            new_point,
            kept=list(kept) if grad else [],
            unit=self._unit,
            seq=len(self.nodes),
        )
        for out in (*outputs, *hidden):
            out.requires_grad = grad and out.dtype.floating and out not in hidden
        self.nodes.append(n)
        return n

    def checkpoint_begin(self) -> None:
        """Ops from here to ``checkpoint_end`` form one checkpointed region."""
        if self.grad:
            self._region = self._regions
            self._regions += 1

    def checkpoint_end(self) -> None:
        self._region = None

    def unit_begin(self, unit: int) -> None:
        """Ops from here to ``unit_end`` run inside decoder layer ``unit``: the module a
        data-parallel engine hooks (FSDP2's ``fully_shard`` unit)."""
        self._unit = unit

    def unit_end(self) -> None:
        self._unit = None

    def autocast_exit(self) -> None:
        """The model's forward leaves its autocast context here, before the ops recorded
        next: the cached weight casts die first (accelerate's ``convert_outputs_to_fp32``
        wraps an autocast forward and converts its outputs after it)."""
        self.node("autocast exits", [], []).autocast_exit = True

    def hold(self, tensor: Tensor, until: str) -> None:
        """The caller keeps ``tensor``: until ``"forward"`` ends, ``"backward"`` ends or the
        ``"step"`` ends (a training loop that keeps the model's outputs)."""
        self.held.append((tensor, until))


@dataclass(slots=True)
class _Storage:
    key: int | None
    refs: int = 0
    persistent: bool = False


class _Sim:
    """Replays a Graph onto a Tape: storages with reference counts, as Python and autograd
    hold them."""

    def __init__(
        self, graph: Graph, tape: Tape, mp: Multiprocessors, adopt: dict[int, int] | None = None
    ) -> None:
        self.g, self.tape, self.mp = graph, tape, mp
        self.adopt = adopt or {}  # tensor id -> the tape key of a tensor made before the graph
        self.storage: dict[int, _Storage] = {}
        self.saved_refs: dict[int, list[Tensor]] = {}  # node id -> tensors it holds
        self.pinned: dict[int, list[_Storage]] = {}  # node id -> storages its ctx keeps
        self.leaf_grads: dict[int, Grad] = {}  # leaf id -> its .grad
        self.leaf_pending: dict[int, int] = {}  # leaf id -> gradients still to arrive
        self.buffers: dict[int, Grad] = {}  # tensor id -> its accumulated gradient
        self.cast_cache: list[Tensor] = []
        self.region_inputs: dict[int, list[Tensor]] = {}
        # a reentrant region's backward: what CheckpointFunction.backward holds until the
        # backward over its recomputed graph returns (its outputs, the incoming gradients)
        self.region_held: dict[int, tuple[list[Tensor], list[Grad]]] = {}
        self.workspaces: Workspaces | None = None
        self.hooks: Hooks | None = None
        for leaf in graph.leaves:
            self.storage[id(leaf)] = _Storage(None, refs=1, persistent=True)

    def matmul(self, thread: str, biased: bool) -> None:
        """A matmul ran on ``thread``: the first one there makes cuBLAS's workspaces."""
        if self.workspaces is not None:
            self.workspaces.matmul(thread, biased)

    def st(self, t: Tensor) -> _Storage:
        return self.storage[id(t.root)]

    def make(self, t: Tensor) -> None:
        """Allocate ``t`` (a view allocates nothing)."""
        if t.base is None:
            key = self.adopt.get(id(t))
            if key is None:
                key = self.tape.new(t.name, t.component, t.nbytes, part=t.part)
            self.storage[id(t)] = _Storage(key)

    def ref(self, t: Tensor) -> None:
        self.st(t).refs += 1

    def unref(self, t: Tensor) -> None:
        s = self.st(t)
        s.refs -= 1
        self._free_if_unused(s)

    def free_if_unused(self, t: Tensor) -> None:
        self._free_if_unused(self.st(t))

    def _free_if_unused(self, s: _Storage) -> None:
        if s.refs <= 0 and not s.persistent and s.key is not None:
            self.tape.free(s.key)
            s.key = None

    def pin(self, n: Node) -> None:
        """``n``'s ctx keeps its ``kept`` tensors' storages (whatever recomputes later)."""
        stores = [self.st(t) for t in n.kept]
        for st in stores:
            st.refs += 1
        self.pinned[id(n)] = stores

    def unpin(self, n: Node) -> None:
        for st in self.pinned.pop(id(n), []):
            st.refs -= 1
            self._free_if_unused(st)

    def unref_grad(self, g: Grad) -> None:
        g.storage.refs -= 1
        if g.storage.refs <= 0 and g.storage.key is not None:
            self.tape.free(g.storage.key)
            g.storage.key = None

    def new_grad(
        self, name: str, numel: int, dtype: DType, component: Component, scale: float = 1.0
    ) -> Grad:
        nbytes = numel * dtype.size if scale == 1.0 else round(numel * scale * dtype.size)
        key = self.tape.new(name, component, nbytes)
        return Grad(_GradStorage(key), numel, dtype)


def _last_uses(nodes: Sequence[Node]) -> dict[int, int]:
    last: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for x in n.inputs:
            last[id(x)] = i
    return last


def run_forward(
    graph: Graph,
    tape: Tape,
    *,
    mp: Multiprocessors = H200,
    workspaces: Workspaces | None = None,
    adopt: dict[int, int] | None = None,
    hooks: Hooks | None = None,
) -> _Sim:
    """Replay the forward of ``graph`` onto ``tape`` (in the tape's current phase), keeping
    what autograd saves. Returns the state that ``end_forward`` and ``run_backward`` take.
    ``adopt`` maps tensors the graph makes to tensors already on the tape (a decode step's
    cache is the one the previous step left). ``hooks``: a parallel engine's module hooks
    (``Hooks``), kept for the backward."""
    sim = _Sim(graph, tape, mp, adopt)
    sim.workspaces = workspaces
    sim.hooks = hooks
    unit: int | None = None
    if hooks is not None:
        hooks.forward_start(sim)
    nodes = graph.nodes
    last: dict[int, int] = {}
    for i, n in enumerate(nodes):
        if n.first_run:
            for x in n.inputs:
                last[id(x)] = i
    held = {id(t) for t, _ in graph.held}
    produced_in: dict[int, int | None] = {}
    for n in nodes:
        if n.region is not None:
            inputs = sim.region_inputs.setdefault(n.region, [])
            for x in n.inputs:
                if not x.leaf and produced_in.get(id(x)) != n.region and x not in inputs:
                    inputs.append(x)
        for out in (*n.outputs, *n.hidden):
            produced_in[id(out)] = n.region
    entered: set[int] = set()
    for i, n in enumerate(nodes):
        if not n.first_run:
            continue
        if hooks is not None and n.unit != unit:
            if unit is not None:
                hooks.unit_forward_done(sim, unit)
            if n.unit is not None:
                hooks.unit_forward(sim, n.unit)
            unit = n.unit
        if n.new_point:
            tape.op(n.name)
        if n.autocast_exit:
            _clear_cast_cache(sim)
        if n.region is not None and n.region not in entered:
            entered.add(n.region)
            for x in sim.region_inputs[n.region]:
                sim.ref(x)  # the checkpoint keeps its inputs for the recompute
        for name, nbytes in n.scratch:
            tape.temp(f"{n.name} {name}", Component.activations, nbytes)
        for out in (*n.outputs, *n.hidden):
            sim.make(out)
            if id(out) in last or id(out) in held:
                sim.ref(out)  # Python holds it until its last use (or the caller keeps it)
        if n.matmul is not None:
            sim.matmul("forward", n.matmul)
        if n.backward is not None and n.region is None:
            for s in n.saved:
                sim.ref(s)
            sim.saved_refs[id(n)] = list(n.saved)
        if n.kept and (n.region is None or not graph.reentrant):
            # a reentrant checkpoint runs its region under no_grad: no ctx survives
            sim.pin(n)
        if n.cast_cache:
            for out in n.outputs:
                sim.ref(out)
                sim.cast_cache.append(out)
        for out in (*n.outputs, *n.hidden):
            sim.free_if_unused(out)
        for x in {id(x): x for x in n.inputs}.values():
            if last[id(x)] == i and not x.leaf and id(x) not in held:
                sim.unref(x)
    if hooks is not None:
        if unit is not None:
            hooks.unit_forward_done(sim, unit)
        hooks.forward_end(sim)
    return sim


def end_forward(sim: _Sim) -> None:
    """Autocast's context exits: its cached weight casts die; so do tensors held to here."""
    _clear_cast_cache(sim)
    release_held(sim, "forward")


def _clear_cast_cache(sim: _Sim) -> None:
    """The outermost autocast context exits (``torch.clear_autocast_cache``)."""
    for t in sim.cast_cache:
        sim.unref(t)
    sim.cast_cache = []


def release_held(sim: _Sim, until: str) -> None:
    """The caller drops what it kept ``until`` this point."""
    for t, u in sim.g.held:
        if u == until:
            sim.unref(t)


def run_backward(sim: _Sim, loss: Tensor) -> None:
    """Replay backward from ``loss`` (see the module docstring)."""
    tape = sim.tape
    nodes = [n for n in sim.g.nodes if n.backward is not None]
    for n in nodes:  # AccumulateGrad waits for one gradient per edge into its leaf
        for x in n.inputs:
            if x.leaf and x.requires_grad:
                sim.leaf_pending[id(x)] = sim.leaf_pending.get(id(x), 0) + 1
    tape.op("loss backward")
    sim.buffers[id(loss)] = sim.new_grad(
        "loss gradient", loss.numel, loss.dtype, Component.activation_grads
    )
    recomputed: set[int] = set()
    region_first: dict[int, Node] = {}
    region_nodes: dict[int, list[Node]] = {}
    for n in sim.g.nodes:
        if n.region is not None:
            region_nodes.setdefault(n.region, []).append(n)
    for n in nodes:
        if n.region is not None and (n.saved or not sim.g.frame_dies_with_saved):
            region_first.setdefault(n.region, n)
    skipped: list[Node] = []
    hooks = sim.hooks
    unit_first: dict[int, Node] = {}  # each unit's first node (its last to run backward)
    for n in nodes:
        if n.unit is not None:
            unit_first.setdefault(n.unit, n)
    started: set[int] = set()
    if hooks is not None:
        hooks.backward_start(sim)
    for n in sorted(nodes, key=attrgetter("seq"), reverse=True):
        if hooks is not None and n.unit is not None and n.unit not in started:
            started.add(n.unit)
            hooks.unit_backward(sim, n.unit)
        grads_out = [sim.buffers.pop(id(o), None) for o in n.outputs]
        if all(g is None for g in grads_out):
            skipped.append(n)
            if hooks is not None and n.unit is not None and unit_first[n.unit] is n:
                hooks.unit_backward_done(sim, n.unit)
            continue
        # a reentrant checkpoint is one autograd Function: its backward reruns the region
        # first, whatever the region's first node to run backward saves
        needs = n.saved or sim.g.reentrant or sim.g.recompute_at_entry
        if n.region is not None and n.region not in recomputed and needs:
            recomputed.add(n.region)
            if sim.g.reentrant:
                # CheckpointFunction.backward: `outputs = ctx.run_function(*inputs)`, then
                # torch.autograd.backward(outputs, args): both live until it returns, so
                # the incoming gradient cannot be accumulated into in place meanwhile
                # (torch/utils/checkpoint.py; the h200-traces QLoRA reentrant trace)
                grads = [g for g in grads_out if g is not None]
                for g in grads:
                    g.storage.refs += 1
                outputs = _recompute(sim, region_nodes[n.region], keep=n.outputs)
                sim.region_held[n.region] = outputs, grads
            else:
                _recompute(sim, region_nodes[n.region])
        if n.backward_point:
            tape.op(f"{n.name} backward")
        bw = Backward(sim, n, grads_out)
        assert n.backward is not None
        n.backward(bw)
        if n.region is not None:  # unpacked from the recompute: they die with apply's locals
            _drop_saved(sim, n)
        results = [(i, _validate(sim, n, i, g)) for i, g in bw.results]
        for g in bw.grads_out:  # the incoming gradients die as call_function returns
            if g is not None:
                sim.unref_grad(g)
        _drop_saved(sim, n)  # then release_variables
        sim.unpin(n)
        for i, g in results:
            _accumulate(sim, n.inputs[i], g)
        if n.region is not None and region_first[n.region] is n:
            for x in sim.region_inputs[n.region]:
                sim.unref(x)  # the checkpoint's frame lets its inputs go
            outputs, grads = sim.region_held.pop(n.region, ([], []))
            for x in outputs:
                sim.unref(x)
            for g in grads:
                sim.unref_grad(g)
        if hooks is not None and n.unit is not None and unit_first[n.unit] is n:
            hooks.unit_backward_done(sim, n.unit)
    for n in skipped:  # the graph is freed
        _drop_saved(sim, n)
        sim.unpin(n)
    if hooks is not None:
        hooks.backward_end(sim)
    release_held(sim, "backward")


def _drop_saved(sim: _Sim, n: Node) -> None:
    for s in sim.saved_refs.pop(id(n), []):
        sim.unref(s)


def _validate(sim: _Sim, n: Node, i: int, g: Grad) -> Grad:
    """``validate_outputs``: reduce a broadcast gradient to its input's shape, then cast it to
    the input's dtype (torch/csrc/autograd/engine.cpp)."""
    x = n.inputs[i]
    tape = sim.tape
    if g.numel != x.numel:
        rows = g.numel // max(1, x.numel)
        tape.op(f"{n.name} backward: sum to {x.name}")
        reduced = sim.new_grad(
            f"{n.name} grad of {x.name}", x.numel, g.dtype, Component.activation_grads, x.scale
        )
        if not x.per_row:  # a column sum: its blocks may stage partial sums
            tape.temp(
                f"{n.name} grad of {x.name} reduction",
                Component.activation_grads,
                column_sum_scratch_bytes(rows, x.numel, sim.mp),
            )
        sim.unref_grad(g)
        g = reduced
    if g.dtype != x.dtype:
        tape.op(f"{n.name} backward: grad of {x.name} to {x.dtype.value}")
        cast = sim.new_grad(
            f"{n.name} grad of {x.name} ({x.dtype.value})",
            x.numel,
            x.dtype,
            Component.activation_grads,
            x.scale,
        )
        sim.unref_grad(g)
        g = cast
    return g


def _in_place_ok(g: Grad) -> bool:
    return not g.view and g.storage.refs == 1 and g.storage.key is not None


def _accumulate(sim: _Sim, x: Tensor, g: Grad) -> None:
    """Add ``g`` to ``x``'s gradient buffer (``InputBuffer::accumulate``,
    torch/csrc/autograd/input_buffer.cpp: in place into a buffer that holds the only
    reference to a non-view tensor, else a new sum; ``g`` itself is reused only when the
    buffer is sparse, which no simulated gradient is); a leaf's buffer goes to
    ``AccumulateGrad`` once every gradient into it has arrived. The h200-traces Adafactor
    trace shows the new sum: a tied lm_head's transposed gradient, then the embedding's."""
    old = sim.buffers.get(id(x))
    if old is None:
        sim.buffers[id(x)] = g
    elif _in_place_ok(old):
        sim.unref_grad(g)
    else:
        sim.tape.op(f"gradients of {x.name} summed")
        total = sim.new_grad(
            f"summed gradient of {x.name}", x.numel, g.dtype, Component.activation_grads,
            x.scale,
        )
        sim.unref_grad(old)
        sim.unref_grad(g)
        sim.buffers[id(x)] = total
    if x.leaf:
        sim.leaf_pending[id(x)] -= 1
        if sim.leaf_pending[id(x)] == 0:
            _accumulate_grad(sim, x, sim.buffers.pop(id(x)))


def _accumulate_grad(sim: _Sim, leaf: Tensor, g: Grad) -> None:
    """``AccumulateGrad``: a fresh gradient (the only reference to a non-view tensor laid out
    like the parameter) becomes ``.grad``; any other is cloned
    (torch/csrc/autograd/functions/accumulate_grad.h)."""
    tape = sim.tape
    if g.storage.refs == 1 and g.storage.key is not None:
        record = tape.records[g.storage.key]  # type: ignore[index]
        record.component = Component.gradients
        record.name = f"{leaf.name} gradient"
        sim.leaf_grads[id(leaf)] = g
        return
    tape.op(f"{leaf.name} gradient clone")
    grad = sim.new_grad(
        f"{leaf.name} gradient", leaf.numel, leaf.dtype, Component.gradients, leaf.scale
    )
    sim.unref_grad(g)
    sim.leaf_grads[id(leaf)] = grad


def _recompute(sim: _Sim, nodes: list[Node], keep: Sequence[Tensor] = ()) -> list[Tensor]:
    """Rerun a checkpointed region (its ``nodes``), saving, up to the last tensor it saves: the
    inputs of that node, or its outputs where it saves them (non-reentrant checkpoint).
    Returns the recomputed tensors of ``keep`` (the caller still holds them) alive."""
    kept = {id(t) for t in keep}
    tape = sim.tape
    saving = [k for k, n in enumerate(nodes) if n.backward is not None and n.saved]
    stop = len(nodes) - 1 if sim.g.reentrant else saving[-1]
    outputs_of = {id(o) for o in (*nodes[stop].outputs, *nodes[stop].hidden)}
    after = sim.g.reentrant or any(id(s) in outputs_of for s in nodes[stop].saved)
    last: dict[int, int] = {}
    for k, m in enumerate(nodes if sim.g.rerun_frame else nodes[: stop + 1]):
        if m.rerun:
            for x in m.inputs:
                last[id(x)] = k
    local: dict[int, Tensor] = {}
    for k, n in enumerate(nodes[: stop + 1]):
        if not n.rerun:
            continue
        if n.new_point:
            tape.op(f"{n.name} (recompute)")
        for name, nbytes in n.scratch:
            tape.temp(f"{n.name} {name}", Component.activations, nbytes)
        if k < stop or after:
            for out in (*n.outputs, *n.hidden):
                sim.make(out)
                sim.ref(out)
                local[id(out)] = out
            if n.cast_cache:
                for out in n.outputs:
                    sim.ref(out)
                    sim.cast_cache.append(out)
            if n.matmul is not None:
                sim.matmul("backward", n.matmul)
        if n.backward is not None:
            for s in n.saved:
                sim.ref(s)
            sim.saved_refs[id(n)] = list(n.saved)
            if n.kept and sim.g.reentrant:  # the rerun with grad builds the kept ctx
                sim.pin(n)
        for out in (*n.outputs, *n.hidden):
            if id(out) in local and id(out) not in last and id(out) not in kept:
                sim.unref(local.pop(id(out)))
        for x in {id(x): x for x in n.inputs}.values():
            if last.get(id(x)) == k and id(x) in local and id(x) not in kept:
                sim.unref(local.pop(id(x)))
    held = []
    for x in local.values():  # the rerun stops: its locals die
        if id(x) in kept:
            held.append(x)
        else:
            sim.unref(x)
    for t in sim.cast_cache:  # and so does its autocast context
        sim.unref(t)
    sim.cast_cache = []
    return held


def forward_and_backward(
    graph: Graph,
    loss: Tensor,
    tape: Tape,
    span: Span | None,
    *,
    first: bool,
    workspace_bytes: int,
    mp: Multiprocessors = H200,
    hooks: Hooks | None = None,
) -> tuple[Span, _Sim | None, int | None]:
    """A training step's forward and backward on ``tape``. The first step simulates them;
    a later one plays the first one's records back (``span``), since a simulation depends
    only on the graph, its hooks and the calls that drive it, less the cuBLAS workspaces the
    first step made at its first matmul (they persist). Returns the span, the simulation and
    the forward's last point, the last two None when played back."""
    if span is not None:
        tape.play(span)
        return span, None, None
    from vramfit.estimate.inference import Workspaces

    start = tape.mark()
    ws = Workspaces(tape, workspace_bytes, active=first)
    sim = run_forward(graph, tape, mp=mp, workspaces=ws, hooks=hooks)
    forward_end = len(tape.timeline.points) - 1
    end_forward(sim)
    tape.phase = "backward"
    run_backward(sim, loss)
    return tape.span(start, leave_out=ws.keys), sim, forward_end
