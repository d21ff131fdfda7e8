"""PyTorch FSDP2 on the hf profile's training step: what one rank allocates, as tape events.

The layout is torchtitan's and accelerate's: ``fully_shard`` on every decoder layer, then on
the model (the root: embeddings, final norm, lm_head), with a ``MixedPrecisionPolicy``. What
follows is read from torch/distributed/fsdp/_fully_shard/ (torch 2.11 and 2.13 agree on it):

- ``_fsdp_param.py`` ``FSDPParam._init_sharded_param``: each parameter's local shard is a
  ``new_zeros`` tensor of ``ceil(dim0 / N)`` rows (``_get_dim0_padded_size`` in
  ``_fsdp_common.py``), in the parameter's own (orig) dtype, on the default stream. Rank 0
  holds a full chunk, so it is the busiest rank. ``param_dtype`` equal to the orig dtype is
  stored as None (``_init_dtype_attrs``).
- ``_fsdp_collectives.py`` ``foreach_all_gather``, on the all-gather copy-in stream: when
  ``param_dtype`` is set, one flat ``param_dtype`` copy of the group's shards
  (``_get_param_all_gather_inputs``), then the all-gather output of N x that many elements
  (``all_gather_comm.allocate``); ``foreach_all_gather_copy_out`` (default stream) allocates
  each parameter's unsharded tensor, padded (``init_all_gather_outputs``:
  ``numel * world_size``), and ``FSDPParamGroup.wait_for_unshard`` frees the all-gather
  output at once in backward, or, in forward, keeps it (``comm_ctx.all_gather_state``) until
  the next layer's copy-out, the root's ``_post_forward`` freeing the last one.
- ``FSDPParamGroup.reshard``: a layer's unsharded tensors are freed after its forward when
  ``reshard_after_forward`` (the root never reshards after forward: ``FSDPState._lazy_init``
  sets its ``post_forward_mesh_info = None``), and after its backward always.
- ``reshard_after_forward=K`` (an int): ``FSDPParam.to_sharded_post_forward`` keeps a
  ``clone`` of this rank's 1/K of each padded all-gather output (``param_dtype``, default
  stream) and frees the unsharded tensor; the backward's all-gather runs over the K-rank
  post-forward mesh from those shards (already in ``param_dtype``: no copy-in cast), and
  ``to_unsharded`` frees them after the copy-out.
- backward prefetch (``_backward_prefetch``): a layer's pre-backward hook unshards it and
  starts the all-gather of the layer before it (the root's starts the last layer's).
- ``post_backward`` then ``foreach_reduce``: reshard; free the previous reduce-scatter input
  (``reduce_scatter_states``, at most ``reduce_scatter_max_input_buffers = 1`` kept); allocate
  the reduce-scatter input in ``reduce_dtype`` at the padded unsharded size (default stream),
  ``chunk_cat`` the autograd gradients (``param_dtype``) into it and free them; allocate the
  reduce-scatter output, one flat shard of the group in ``reduce_dtype`` on the
  reduce-scatter stream: it becomes the sharded ``.grad`` (a cast to the orig dtype, on the
  same stream, when they differ). The root's runs in the final backward callback, which then
  drops the last input.
- ``offload_policy=CPUOffloadPolicy()`` (``--offload params``): ``_init_sharded_param`` moves
  each padded shard to the CPU (``.cpu()``, then ``.pin_memory()``), so the GPU holds no
  sharded parameter. ``_get_param_all_gather_inputs`` then skips its foreach fast path
  (``not fsdp_param.offload_to_cpu``): per parameter, ``FSDPParam.all_gather_inputs`` copies
  the shard to the GPU in the orig dtype (``_sharded_param_data.to(device,
  non_blocking=True)``, on the copy-in stream: ``foreach_all_gather``'s stream context) and
  ``_to_dtype_if_needed`` casts it to ``param_dtype`` (the orig-dtype copy dies at once when
  they differ); every parameter's input lives until ``foreach_all_gather`` returns, after the
  all-gather output is allocated and filled. In ``foreach_reduce`` each sharded gradient is
  copied to the CPU (``new_sharded_grad.to("cpu", non_blocking=...)``) and the GPU shard
  (``reduce_output``, in the orig dtype after any cast) dies when the function returns. The
  optimizer then steps the CPU parameters with CPU gradients: no GPU state or temporaries.
  The post-forward 1/K shards of an integer ``reshard_after_forward`` stay on the GPU.
- The caching allocator keeps each stream's blocks apart (``allocator.py``), which is why the
  device holds much more than the peak of allocated memory.

Compute runs in ``param_dtype`` without autocast, so the forward graph is the hf profile's
16-bit one. The optimizer sees the sharded fp32 parameters (its state and temporaries are
shard-sized). NCCL's own buffers are outside PyTorch's allocator: ``vramfit.estimate.parallel``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vramfit.config import Offload, Parallel, Precision, Workload
from vramfit.estimate.graph import Component, DType, Hooks, Tensor, _Sim
from vramfit.estimate.profiles import hf
from vramfit.estimate.timeline import Tape

DEFAULT_STREAM = 0
COPY_IN_STREAM = 1  # FSDPCommContext.all_gather_copy_in_stream
REDUCE_SCATTER_STREAM = 2  # FSDPCommContext.reduce_scatter_stream
STREAM_NAMES = {
    DEFAULT_STREAM: "default",
    COPY_IN_STREAM: "all_gather_copy_in",
    REDUCE_SCATTER_STREAM: "reduce_scatter",
}
ROOT = -1

_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")

# MixedPrecisionPolicy per precision: (param_dtype, reduce_dtype, orig dtype). The amp-*
# precisions are the common AMP setup: fp32 sharded master weights, 16-bit compute,
# gradients reduced in fp32.
POLICY = {
    Precision.fp32: (DType.fp32, DType.fp32, DType.fp32),
    Precision.amp_bf16: (DType.bf16, DType.fp32, DType.fp32),
    Precision.amp_fp16: (DType.fp16, DType.fp32, DType.fp32),
    Precision.bf16: (DType.bf16, DType.bf16, DType.bf16),
    Precision.fp16: (DType.fp16, DType.fp16, DType.fp16),
}
COMPUTE_PRECISION = {
    DType.fp32: Precision.fp32,
    DType.bf16: Precision.bf16,
    DType.fp16: Precision.fp16,
}


def unit_of(name: str) -> int:
    """The ``fully_shard`` unit a parameter belongs to: its decoder layer, else the root."""
    found = _LAYER.search(f".{name}")
    return int(found.group(1)) if found else ROOT


@dataclass
class ShardedParam:
    """One parameter as FSDP2 shards it over ``world`` ranks (rank 0's chunk)."""

    name: str
    dim0: int
    numel: int
    world: int
    leaf: Tensor | None = None  # the graph's (unsharded) parameter

    @property
    def shard_numel(self) -> int:
        rest = self.numel // self.dim0 if self.dim0 else 0
        return -(-self.dim0 // self.world) * rest

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.world


@dataclass
class Group:
    """An ``FSDPParamGroup``: the parameters one ``fully_shard`` call manages."""

    unit: int
    params: list[ShardedParam]
    reshard_after_forward: bool | int  # an int K: to groups of K ranks
    unsharded: list[int | None] = field(default_factory=list)
    post_forward: list[int | None] = field(default_factory=list)  # the 1/K shards
    pending: int | None = None  # an issued all-gather's output, waiting for its copy-out
    is_unsharded: bool = False

    @property
    def name(self) -> str:
        return "root" if self.unit == ROOT else f"block {self.unit}"

    @property
    def shard_numel(self) -> int:
        return sum(p.shard_numel for p in self.params)

    @property
    def padded_numel(self) -> int:
        return sum(p.padded_numel for p in self.params)


def shard_groups(
    b: hf.Block, world: int, reshard_after_forward: bool | int
) -> dict[int, Group]:
    """Every parameter of ``b`` in its group; rank 0's shards."""
    groups: dict[int, Group] = {}
    for name, dim0, numel in hf.param_rows(b):
        unit = unit_of(name)
        group = groups.get(unit)
        if group is None:
            # the root is never resharded after forward (see the module docstring)
            reshards = reshard_after_forward if unit != ROOT else False
            group = groups[unit] = Group(unit, [], reshards)
        group.params.append(ShardedParam(name, dim0, numel, world))
    return groups


def compute_workload(w: Workload) -> Workload:
    """The workload the forward graph runs: 16-bit weights, no autocast, under amp."""
    param_dtype = POLICY[w.precision][0]
    return Workload.model_validate(
        {**w.model_dump(), "precision": COMPUTE_PRECISION[param_dtype].value}
    )


def _to_dtype_if_needed(
    t: Tape,
    key: int | None,
    name: str,
    component: Component,
    numel: int,
    dtype: DType,
    to: DType,
    stream: int,
    op: str | None = None,
) -> int | None:
    """FSDP's ``_to_dtype_if_needed`` on ``stream``: a copy in ``to`` when it is not
    ``dtype``, made while the original is alive, which then dies (``op``: the tape point the
    cast starts, if it has one of its own)."""
    if to is dtype:
        return key
    if op is not None:
        t.op(op)
    cast = t.new(f"{name} ({to.value})", component, numel * to.size, stream=stream)
    t.free(key)
    return cast


class FsdpHooks(Hooks):
    """FSDP2's hooks, replayed onto the tape of one rank."""

    def __init__(
        self, groups: dict[int, Group], world: int, precision: Precision, offload: bool = False
    ) -> None:
        self.groups = groups
        self.world = world
        self.offload = offload  # CPUOffloadPolicy: the shards and their gradients on the CPU
        self.param_dtype, self.reduce_dtype, self.orig_dtype = POLICY[precision]
        self.layers = sorted(u for u in groups if u != ROOT)
        self.all_gather_state: int | None = None
        self.reduce_scatter_states: list[int | None] = []
        self.ordered: list[ShardedParam] = []  # model.parameters() order

    # FSDPParamGroup -----------------------------------------------------------------------
    def _unshard(self, t: Tape, g: Group) -> None:
        if g.is_unsharded or g.pending is not None:
            return
        t.op(f"FSDP all-gather {g.name}")
        copy_in = None
        nbytes = g.shard_numel * self.param_dtype.size
        if g.post_forward:  # from the post-forward shards, over their K-rank mesh
            if self.param_dtype is not self.orig_dtype and not self.offload:
                # _get_param_all_gather_inputs' foreach copy takes the post-forward shards
                # too: a flat copy-in buffer of their numel, in param_dtype
                k = g.reshard_after_forward
                copy_in = t.new(
                    f"{g.name} all-gather input", Component.collective_buffers,
                    g.padded_numel // k * self.param_dtype.size, stream=COPY_IN_STREAM,
                )
            g.pending = t.new(
                f"{g.name} all-gather output", Component.collective_buffers,
                g.padded_numel * self.param_dtype.size, stream=COPY_IN_STREAM,
            )
            t.free(copy_in)
            return
        if self.offload:  # FSDPParam.all_gather_inputs, one parameter at a time
            inputs = []
            for p in g.params:
                on_gpu = t.new(
                    f"{p.name} shard copied to the GPU", Component.collective_buffers,
                    p.shard_numel * self.orig_dtype.size, stream=COPY_IN_STREAM,
                )
                inputs.append(_to_dtype_if_needed(
                    t, on_gpu, f"{p.name} shard", Component.collective_buffers,
                    p.shard_numel, self.orig_dtype, self.param_dtype, COPY_IN_STREAM,
                ))
            g.pending = t.new(
                f"{g.name} all-gather output", Component.collective_buffers,
                nbytes * self.world, stream=COPY_IN_STREAM,
            )
            t.free(*inputs)  # foreach_all_gather returns
            return
        if self.param_dtype is not self.orig_dtype:  # _get_param_all_gather_inputs
            copy_in = t.new(
                f"{g.name} all-gather input", Component.collective_buffers, nbytes,
                stream=COPY_IN_STREAM,
            )
        g.pending = t.new(
            f"{g.name} all-gather output", Component.collective_buffers, nbytes * self.world,
            stream=COPY_IN_STREAM,
        )
        t.free(copy_in)

    def _wait_for_unshard(self, t: Tape, g: Group, forward: bool) -> None:
        if g.pending is None:
            return
        if forward and self.all_gather_state is not None:
            t.op("FSDP free the previous all-gather output")
            t.free(self.all_gather_state)
            self.all_gather_state = None
        t.op(f"FSDP all-gather copy-out {g.name}")
        g.unsharded = [
            t.new(
                f"{p.name} unsharded", Component.unsharded_weights,
                p.padded_numel * self.param_dtype.size,
            )
            for p in g.params
        ]
        g.is_unsharded = True
        if g.post_forward:  # to_unsharded frees them after the copy-out
            t.free(*g.post_forward)
            g.post_forward = []
        if forward:  # kept to overlap this copy-out with the next all-gather
            self.all_gather_state = g.pending
        else:
            t.free(g.pending)
        g.pending = None

    def _reshard(self, t: Tape, g: Group) -> None:
        if not g.is_unsharded:
            return
        t.op(f"FSDP reshard {g.name}")
        t.free(*g.unsharded)
        g.unsharded = []
        g.is_unsharded = False

    def _post_backward(self, sim: _Sim, g: Group) -> None:
        t = sim.tape
        grads = [sim.leaf_grads.pop(id(p.leaf), None) for p in g.params if p.leaf is not None]
        self._reshard(t, g)
        if self.reduce_scatter_states:
            t.op("FSDP wait for the previous reduce-scatter")
            t.free(*self.reduce_scatter_states)
            self.reduce_scatter_states = []
        if not any(grads):
            return
        t.op(f"FSDP reduce-scatter copy-in {g.name}")
        rs_input = t.new(
            f"{g.name} reduce-scatter input", Component.collective_buffers,
            g.padded_numel * self.reduce_dtype.size,
        )
        for grad in grads:  # unsharded_grads.clear(): the autograd gradients die
            if grad is not None:
                sim.unref_grad(grad)
        t.op(f"FSDP reduce-scatter {g.name}")
        out = t.new(
            f"{g.name} sharded gradients", Component.sharded_gradients,
            g.shard_numel * self.reduce_dtype.size, stream=REDUCE_SCATTER_STREAM,
        )
        out = _to_dtype_if_needed(
            t, out, f"{g.name} sharded gradients", Component.sharded_gradients,
            g.shard_numel, self.reduce_dtype, self.orig_dtype, REDUCE_SCATTER_STREAM,
            op=f"FSDP gradients to {self.orig_dtype.value} {g.name}",
        )
        if self.offload:  # copied to the CPU; the GPU shard dies as foreach_reduce returns
            t.op(f"FSDP gradients to the CPU {g.name}")
            t.free(out)
        self.reduce_scatter_states.append(rs_input)

    # the module hooks ---------------------------------------------------------------------
    def forward_start(self, sim: _Sim) -> None:
        root = self.groups[ROOT]
        self._unshard(sim.tape, root)
        self._wait_for_unshard(sim.tape, root, forward=True)

    def unit_forward(self, sim: _Sim, unit: int) -> None:
        g = self.groups[unit]
        self._unshard(sim.tape, g)
        self._wait_for_unshard(sim.tape, g, forward=True)

    def unit_forward_done(self, sim: _Sim, unit: int) -> None:
        g = self.groups[unit]
        k = g.reshard_after_forward
        if k is not True and k and g.is_unsharded:  # to_sharded_post_forward
            t = sim.tape
            t.op(f"FSDP reshard {g.name} to {k} ranks")
            g.post_forward = [
                t.new(
                    f"{p.name} post-forward shard", Component.unsharded_weights,
                    p.padded_numel // k * self.param_dtype.size,
                )
                for p in g.params
            ]
            self._reshard(t, g)
        elif k:
            self._reshard(sim.tape, g)

    def forward_end(self, sim: _Sim) -> None:
        if self.all_gather_state is not None:  # the root's _post_forward
            sim.tape.op("FSDP free the last all-gather output")
            sim.tape.free(self.all_gather_state)
            self.all_gather_state = None

    def backward_start(self, sim: _Sim) -> None:
        if self.layers:  # the root's pre-backward prefetches the last layer
            self._unshard(sim.tape, self.groups[self.layers[-1]])

    def unit_backward(self, sim: _Sim, unit: int) -> None:
        g = self.groups[unit]
        self._unshard(sim.tape, g)
        self._wait_for_unshard(sim.tape, g, forward=False)
        k = self.layers.index(unit)
        if k > 0:
            self._unshard(sim.tape, self.groups[self.layers[k - 1]])

    def unit_backward_done(self, sim: _Sim, unit: int) -> None:
        self._post_backward(sim, self.groups[unit])

    def backward_end(self, sim: _Sim) -> None:
        self._post_backward(sim, self.groups[ROOT])
        if self.reduce_scatter_states:  # _root_post_backward_final_callback
            sim.tape.op("FSDP final callback")
            sim.tape.free(*self.reduce_scatter_states)
            self.reduce_scatter_states = []


def attach(model: hf.Model, par: Parallel, precision: Precision) -> FsdpHooks:
    """The hooks of ``par``'s FSDP2 layout for ``model`` (its graph's leaves are the unsharded
    parameters, in ``model.parameters()`` order like ``param_rows``)."""
    groups = shard_groups(model.b, par.shard, par.reshards)
    by_name = {p.name: p for g in groups.values() for p in g.params}
    hooks = FsdpHooks(groups, par.shard, precision, par.offload is Offload.params)
    for leaf in model.param_list:
        by_name[leaf.name].leaf = leaf
        hooks.ordered.append(by_name[leaf.name])
    return hooks


def sharded_params(hooks: FsdpHooks) -> list[Tensor]:
    """Rank 0's shards as the optimizer sees them, in ``model.parameters()`` order."""
    out = []
    for p in hooks.ordered:
        t = Tensor(f"{p.name} shard", p.shard_numel, hooks.orig_dtype, leaf=True)
        t.trainable = True
        out.append(t)
    return out
