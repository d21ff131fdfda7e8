"""vramfit's reference loop (``vramfit.measure.models``) as a graph of ops.

The reference model is plain torch that mirrors Hugging Face's GPT-2 and Llama code with
fixed choices (module docstring of ``vramfit.measure.models``): ``nn.LayerNorm`` /
``nn.RMSNorm`` (one fused kernel each, saving the input and per-row fp32 statistics), a fused
q/k/v projection (GPT-2) or three, a learned position table or rotary tables computed in fp32
with autocast off and cast to the compute dtype, ``rotate_half`` through ``chunk`` (its
backward concatenates the halves' gradients), ``repeat_kv`` inside the attention core,
``F.scaled_dot_product_attention(is_causal=True)`` (FlashAttention-2 for 16-bit inputs,
memory-efficient attention for fp32) or eager attention with a bool mask, tanh GELU or
SwiGLU, no dropout, ``F.cross_entropy(logits.float(), targets)``; non-reentrant
checkpointing of each block (full) or of the attention core (selective); inference with a
static KV cache, its largest decode step being the last token's.

It replaced a hand-written program (a training step and an inference pass written op by
op, with a backward that mirrored the forward by hand) and makes exactly that program's
allocator requests, in the same order, for every option it read: the 127 committed H200
measurements predict byte-identically (benchmarks/data/accuracy.txt), and the labelled
allocator traces replay as before (tests/estimate/test_traces.py).

The order of allocations within an op follows that program, whose order followed the H200
allocator traces of the reference model (benchmarks/data/h200-traces): e.g.
``silu(gate) * up`` makes the gate's gradient first, where the shared ``Ops.binary`` (the
hf traces) makes the second operand's first.
"""

from __future__ import annotations

import math

from vramfit.config import (
    Arch,
    Attention,
    Checkpointing,
    Mlp,
    ModelSpec,
    Norm,
    Optimizer,
    Positions,
    Precision,
    Workload,
)
from vramfit.estimate.activations import shape_of
from vramfit.estimate.dtypes import AUTOCAST_DTYPE, WEIGHT_DTYPE, kv_bytes
from vramfit.estimate.graph import (
    Backward,
    Component,
    DType,
    Graph,
    Node,
    Tensor,
    end_forward,
    forward_and_backward,
    release_held,
    run_forward,
)
from vramfit.estimate.inference import Workspaces, kv_cache_bytes
from vramfit.estimate.kernels import H200, Multiprocessors, column_sum_scratch_bytes
from vramfit.estimate.ops import Ops, promote
from vramfit.estimate.params import (
    count_params,
    param_tensors,
    projection_shapes,
    tied_copy_bytes,
)
from vramfit.estimate.timeline import Span, Tape, Timeline
from vramfit.estimate.training import optimizer_state_tensors, optimizer_step_temporaries

MEM_EFF_LSE_PAD = 32  # memory-efficient attention pads its logsumexp to 32 queries
INT64 = 8


class RefOps(Ops):
    """The ops the reference model runs that the shared library has in another form."""

    def cast(self, x: Tensor, dtype: DType, name: str = "", *, part: str = "") -> Tensor:
        """``Ops.cast``; a parameter's copy is as large as the parameter (``--params``)."""
        out = super().cast(x, dtype, name, part=part)
        out.scale = x.scale
        return out

    def rms_norm(self, name: str, x: Tensor, w: Tensor, rows: int) -> Tensor:
        """``nn.RMSNorm`` (torch >= 2.4: ``F.rms_norm``, the fused ``_fused_rms_norm``
        kernel on CUDA, aten/src/ATen/native/layer_norm.cpp): the output in the input's
        dtype and a per-row fp32 rstd, saved with the input and the weight; backward makes
        the input's gradient, then the weight's."""
        out = self._t(name, x.numel, x.dtype, part="norm")
        rstd = self._t(f"{name} rstd", rows, DType.fp32, part="norm")

        def backward(bw: Backward) -> None:
            bw.new(0)
            bw.new(1)

        self.g.node(
            f"{self.prefix}{name}", [x, w], [out], saved=[x, w, rstd], hidden=[rstd],
            backward=backward,
        )
        return out

    def mul(self, name: str, a: Tensor, b: Tensor, *, part: str = "") -> Tensor:
        """``a * b`` of two same-shaped tensors whose backward makes ``a``'s gradient first
        (the reference program's order for SwiGLU's product)."""
        dtype = promote(a.dtype, b.dtype)
        out = self._t(name, max(a.numel, b.numel), dtype, part=part)
        saved = ([b] if a.requires_grad else []) + ([a] if b.requires_grad else [])

        def backward(bw: Backward) -> None:
            bw.new(0, numel=out.numel)
            bw.new(1, numel=out.numel)

        self.g.node(f"{self.prefix}{name}", [a, b], [out], saved=saved, backward=backward)
        return out

    def rope(self, name: str, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` and
        ``x1, x2 = x.chunk(2, -1)``: views whose backward (SplitBackward0) concatenates
        their gradients into one of ``x``'s size. The backward of the ``sin`` branch is one
        point of the reference program (its gradients made together), ``x`` is held by the
        Python expression until the sum exists."""
        x_cos = self.binary(f"{name} * cos", x, cos, "mul")
        half = x.numel // 2
        x1 = self._t(f"{name} first half", half, x.dtype, base=x)
        x2 = self._t(f"{name} second half", half, x.dtype, base=x)
        split = self.g.node(
            f"{self.prefix}{name} chunk", [x], [x1, x2],
            backward=lambda bw: bw.new(0), new_point=False,
        )
        neg = self.unary(f"{name} -x2", x2)
        neg_node = self.g.nodes[-1]
        rot = self._t(f"{name} rotate_half", x.numel, x.dtype)

        def cat_backward(bw: Backward) -> None:
            g = bw.out()
            bw.alias(0, g, view=True)
            bw.alias(1, g, view=True)

        cat = self.g.node(
            f"{self.prefix}{name} rotate_half", [neg, x1], [rot], backward=cat_backward,
            new_point=False,
        )
        rot_sin = self.binary(f"{name} rotate_half * sin", rot, sin, "mul")
        rot_sin_node = self.g.nodes[-1]
        out = self.binary(f"{name} rotated", x_cos, rot_sin, "add", part="attention")
        self.keep(x)
        for node in (split, cat, neg_node, rot_sin_node):
            node.backward_point = False
        return out

    def repeat_kv(self, name: str, k: Tensor, v: Tensor, numel: int) -> tuple[Tensor, Tensor]:
        """HF ``repeat_kv`` (expand + reshape: a copy) of K and V, made in one op of the
        reference program; each backward sums its groups, K's first."""
        wide_k = self._t(f"{name} widened k", numel, k.dtype, part="attention")
        wide_v = self._t(f"{name} widened v", numel, v.dtype, part="attention")
        nodes = [
            self.g.node(
                out.name, [x], [out], backward=lambda bw: bw.new(0),
                new_point=first,
            )
            for x, out, first in ((k, wide_k, True), (v, wide_v, False))
        ]
        nodes[0].seq, nodes[1].seq = nodes[1].seq, nodes[0].seq  # K's backward first
        return wide_k, wide_v

    def fused_attention(
        self, name: str, q: Tensor, k: Tensor, v: Tensor, *, batch: int, heads: int, seq: int
    ) -> Tensor:
        """``F.scaled_dot_product_attention(q, k, v, is_causal=True)``: FlashAttention-2 for
        16-bit inputs, memory-efficient attention for fp32 (its logsumexp padded to 32
        queries). It makes the logsumexp, then the output, and saves q, k, v, both.
        Backward: dq, dk, dv, then the kernel's scratch (the reference's labelled traces,
        benchmarks/data/h200-traces cpp-frames.json.gz): flash one workspace for the fp32
        dq accumulator and the softmax row sums (Dao 2023); memory-efficient attention
        grad * out, its row sums and their copy, then the fp32 dq accumulator with
        b * heads * s / 4 bytes more (frames3/frames4.json.gz)."""
        fp32 = q.dtype is DType.fp32
        padded = -(-seq // MEM_EFF_LSE_PAD) * MEM_EFF_LSE_PAD if fp32 else seq
        lse = self._t(f"{name} logsumexp", batch * heads * padded, DType.fp32, part="attention")
        out = self._t(f"{name} output", q.numel, q.dtype, part="attention")
        rows = batch * heads * seq * DType.fp32.size
        full = q.numel * DType.fp32.size

        def backward(bw: Backward) -> None:
            bw.new(0)
            bw.new(1)
            bw.new(2)
            if fp32:
                bw.temp("grad * out", full)
                bw.temp("row sums", rows)
                sums = bw.temp_alloc("row sums copy", rows)
                bw.sim.tape.op(f"{name} backward accumulator")
                bw.temp("fp32 dq accumulator", full + rows // 16)
                bw.free(sums)
            else:
                bw.temp("workspace", full + rows)

        # the statistics exist only with grad mode on (compute_log_sumexp)
        self.g.node(
            f"{self.prefix}{name}", [q, k, v], [lse, out] if self.g.grad else [out],
            saved=[q, k, v, out, lse], backward=backward,
        )
        return out

    def split(self, name: str, x: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
        """``x.split(widths, dim=-1)``: views; SplitBackward0 concatenates their gradients
        into one of ``x``'s size."""
        parts = tuple(
            self._t(f"{name} {j}", numel, x.dtype, base=x, part=x.part)
            for j, numel in enumerate(sizes)
        )
        self.g.node(
            f"{self.prefix}{name}", [x], list(parts), backward=lambda bw: bw.new(0),
            new_point=False,
        )
        return parts

    def add_broadcast(self, name: str, x: Tensor, y: Tensor) -> Tensor:
        """``x + y`` with ``y`` broadcast over the batch: backward passes the gradient to
        ``x`` and sums it over the batch for ``y`` (the reference program's order: that sum,
        then the position table's gradient, labelled trace cpp-frames.json.gz)."""
        out = self._t(name, x.numel, promote(x.dtype, y.dtype), part="norm")

        def backward(bw: Backward) -> None:
            bw.alias(0, bw.out())
            bw.new(1)

        self.g.node(f"{self.prefix}{name}", [x, y], [out], backward=backward)
        return out

    def masked_fill(self, name: str, x: Tensor, mask: Tensor, *, part: str = "") -> Tensor:
        """``x.masked_fill(mask, value)``: saves the mask; backward zeroes the masked
        positions of the gradient, a new tensor (derivatives.yaml ``masked_fill.Scalar``)."""
        out = self._t(name, x.numel, x.dtype, part=part)
        self.g.node(
            f"{self.prefix}{name}", [x, mask], [out], saved=[mask], backward=lambda bw: bw.new(0)
        )
        return out

    def softmax_to(self, name: str, x: Tensor, dtype: DType, *, copy_input: bool) -> Tensor:
        """``F.softmax(x, dim=-1)`` with its output in ``dtype`` (autocast's fp32 list): ATen
        runs 16-bit input with a half-to-float kernel, but copies bf16 input to fp32 first
        (``copy_input``: aten/src/ATen/native/SoftMax.cpp; measured on an H200,
        benchmarks/data/h200-validation2). Saves its output; backward makes the input's
        gradient and a temporary of the output's size (``_softmax_backward_data``)."""
        if copy_input:
            x = self.cast(x, dtype, f"{name} fp32 input")
        return self.softmax_into(name, x, dtype)

    def cross_entropy(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``F.cross_entropy``: log_softmax (saves its output), then nll_loss, whose 0-dim
        loss the reference program does not count."""
        logp = self._t("log_softmax", logits.numel, logits.dtype, component=Component.logits)
        self.g.node("log_softmax", [logits], [logp], saved=[logp], backward=lambda bw: bw.new(0))
        loss = self._t("loss", 0, DType.fp32, component=Component.logits)
        self.g.node(
            "nll_loss", [logp, targets], [loss], saved=[targets], backward=lambda bw: bw.new(0)
        )
        return loss


def _scale(spec: ModelSpec) -> float:
    """A declared ``--params`` scales every parameter (and its copies, gradients and
    optimizer state) by the declared over the implied count."""
    total = count_params(spec).total
    return (spec.params or total) / total


def _weights(shapes: list[tuple[int, ...]], scale: float, itemsize: int) -> list[int]:
    return [round(math.prod(s) * scale * itemsize) for s in shapes]


def _mark_view(node: Node, inputs: tuple[int, ...]) -> None:
    """The gradients that ``node`` makes for ``inputs`` are views (autograd cannot add into
    them in place)."""
    assert node.backward is not None
    rule = node.backward

    def backward(bw: Backward) -> None:
        rule(bw)
        for i, g in bw.results:
            if i in inputs:
                g.view = True

    node.backward = backward


class Model:
    """Builds the graph of one forward of the reference ``Decoder``: a training step's (with
    the loss), or without grad mode a prefill's or a decode step's (``seq`` new tokens after
    ``cached`` ones)."""

    def __init__(
        self, spec: ModelSpec, w: Workload, *, grad: bool = True, seq: int = 0, cached: int = 0
    ) -> None:
        self.spec = spec = spec.resolved()
        self.w = w
        assert spec.heads and spec.kv_heads and spec.head_dim and spec.ffn and spec.vocab
        self.batch, self.seq = w.batch, seq or w.seq
        self.cached = cached  # tokens the static KV cache holds before this forward
        self.keys = self.cached + self.seq
        self.n = w.batch * self.seq
        self.g = Graph(grad=grad)
        # torch.utils.checkpoint(block, ..., use_reentrant=False) around each block
        self.full = grad and w.checkpointing is Checkpointing.full
        self.eager = w.attention is Attention.eager
        self.mask: Tensor | None = None
        self.selective = grad and w.checkpointing is Checkpointing.selective
        g = self.g
        g.rerun_frame = g.recompute_at_entry = g.frame_dies_with_saved = True
        self.weight = WEIGHT_DTYPE[w.precision]
        self.ops = RefOps(self.g, AUTOCAST_DTYPE.get(w.precision))
        self.compute = self.ops.autocast or self.weight
        h, hd = spec.hidden, spec.head_dim
        self.q_width, self.kv_width = spec.heads * hd, spec.kv_heads * hd
        self.params: dict[str, Tensor] = {}
        self.fused = spec.arch is Arch.gpt2  # one c_attn projection makes q, k and v
        self.gated = spec.mlp is Mlp.swiglu
        self.learned = spec.positions is Positions.learned
        self.moe = spec.experts > 1
        self.vectors: set[str] = set()  # the experts' biases

        self.scale = _scale(spec)

        def leaf(name: str, numel: int) -> None:
            self.params[name] = self.g.leaf(name, numel, self.weight, requires_grad=True)
            self.params[name].scale = self.scale

        leaf("embed", spec.vocab * h)
        if self.learned:
            assert spec.max_positions
            leaf("positions", spec.max_positions * h)
        qkv_bias, bias = bool(spec.bias or spec.qkv_bias), bool(spec.bias)
        for i in range(spec.layers):
            p = f"blocks.{i}"
            widths = (("q", self.q_width), ("k", self.kv_width), ("v", self.kv_width))
            if self.fused:
                widths = (("qkv", self.q_width + 2 * self.kv_width),)
            for name, width in widths:
                leaf(f"{p}.{name}.weight", h * width)
                if qkv_bias:
                    leaf(f"{p}.{name}.bias", width)
            mlp = (("gate", h, spec.ffn),) if self.gated else ()
            dense = (*mlp, ("up", h, spec.ffn), ("down", spec.ffn, h))
            if self.moe:  # every expert's projections, and the router's, as one each way
                for kind in ("up", "down"):
                    for j, shape in enumerate(projection_shapes(spec, kind)):
                        leaf(f"{p}.moe.{kind}.{j}", math.prod(shape))
                        if len(shape) == 1:
                            self.vectors.add(f"{p}.moe.{kind}.{j}")
                dense = ()
            for name, n_in, n_out in (("o", self.q_width, h), *dense):
                leaf(f"{p}.{name}.weight", n_in * n_out)
                if bias:
                    leaf(f"{p}.{name}.bias", n_out)
            for name in ("norm_1", "norm_2"):
                self._norm_leaves(f"{p}.{name}")
        self._norm_leaves("norm_f")
        if spec.tied:
            self.params["lm_head.weight"] = self.params["embed"]
        else:
            leaf("lm_head.weight", spec.vocab * h)
        self.ids = self.g.leaf(
            "input ids", self.n, DType.int64, requires_grad=False, component=Component.activations
        )
        self.position_ids = self.g.leaf(  # arange(s): not counted by the reference program
            "position ids", 0, DType.int64, requires_grad=False, component=Component.activations
        )
        self.targets = self.g.leaf(
            "targets", self.n, DType.int64, requires_grad=False, component=Component.activations
        )

    def _norm_leaves(self, prefix: str) -> None:
        h = self.spec.hidden
        names = ("weight", "bias") if self.spec.norm is Norm.layernorm else ("weight",)
        for name in names:
            key = f"{prefix}.{name}"
            self.params[key] = self.g.leaf(key, h, self.weight, requires_grad=True)
            self.params[key].scale = self.scale

    def p(self, name: str) -> Tensor:
        return self.params[name]

    def norm(self, name: str, prefix: str, x: Tensor) -> Tensor:
        w = self.p(f"{prefix}.weight")
        if self.spec.norm is Norm.layernorm:  # nn.LayerNorm: native_layer_norm
            return self.ops.layer_norm(name, x, w, self.p(f"{prefix}.bias"), self.n)
        return self.ops.rms_norm(name, x, w, self.n)

    def linear(self, name: str, prefix: str, x: Tensor, width: int, part: str = "") -> Tensor:
        bias = f"{prefix}.bias"
        return self.ops.linear(
            name, x, self.p(f"{prefix}.weight"), self.params.get(bias), width, part=part
        )

    def rope_tables(self) -> tuple[Tensor, Tensor]:
        """``Decoder._rope``: positions, their outer product with the inverse frequencies,
        that doubled, then cos and sin in fp32, each cast to the compute dtype; the three
        fp32 temporaries live until sin exists (labelled trace, cpp-frames.json.gz)."""
        o, g = self.ops, self.g
        seq, hd = self.seq, self.spec.head_dim or 0
        temps = [
            Tensor("RoPE positions", seq, DType.fp32),
            Tensor("RoPE frequencies", seq * hd // 2, DType.fp32),
            Tensor("RoPE angles", seq * hd, DType.fp32),
        ]
        g.node("RoPE angles", [], temps)
        tables = []
        for name in ("cos", "sin"):
            table = Tensor(f"RoPE {name}", seq * hd, DType.fp32)
            g.node(f"RoPE {name}", [temps[2]], [table])
            tables.append(o.cast(table, self.compute, f"RoPE {name} in the compute dtype"))
        o.keep(*temps)
        return tables[0], tables[1]

    def block(self, i: int, x: Tensor, cos: Tensor | None, sin: Tensor | None) -> Tensor:
        o, spec, n = self.ops, self.spec, self.n
        p = f"blocks.{i}"
        o.prefix = f"block {i} "
        if self.full:
            self.g.checkpoint_begin()
        normed = self.norm("norm 1", f"{p}.norm_1", x)
        if self.fused:
            width = self.q_width + 2 * self.kv_width
            qkv = self.linear("q/k/v", f"{p}.qkv", normed, width, "attention")
            kv = n * self.kv_width
            q, k, v = o.split("q/k/v split", qkv, (n * self.q_width, kv, kv))
        else:
            q = self.linear("q", f"{p}.q", normed, self.q_width, "attention")
            k = self.linear("k", f"{p}.k", normed, self.kv_width, "attention")
            v = self.linear("v", f"{p}.v", normed, self.kv_width, "attention")
        widened = spec.kv_heads < spec.heads
        rope = cos is not None and sin is not None
        # view + transpose to heads first: a gradient that comes back laid out otherwise is
        # copied by the view's backward (rotary's cat, repeat_kv's sum, eager's bmm)
        q = o.view(q, "q heads", copy_backward=rope or self.eager)
        k = o.view(k, "k heads", copy_backward=rope or widened)
        v = o.view(v, "v heads", copy_backward=widened or self.eager)
        if cos is not None and sin is not None:
            q = o.rope("q", q, cos, sin)
            k = o.rope("k", k, cos, sin)
        rotated = (q, k, v)
        held: list[Tensor] = []
        if self.cached:  # decode reads the static cache back, as stored or converted
            kv = self.batch * self.keys * self.kv_width
            c = self.compute
            if kv_bytes(self.w) != c.size:
                k = self.ops._t("cached k", kv, c)
                v = self.ops._t("cached v", kv, c)
                self.g.node(f"{o.prefix}cached K/V to compute dtype", [], [k, v])
                o.keep(*rotated[1:])  # the new K/V, written to the cache, are rebound
                held = [k, v]
            else:
                k = self.g.leaf("cached k", kv, c, requires_grad=False)
                v = self.g.leaf("cached v", kv, c, requires_grad=False)
        if self.selective:  # checkpoint(self.core, q, k, v, mask, ...): repeat_kv + attention
            self.g.checkpoint_begin()
        if widened:
            k, v = o.repeat_kv("repeat_kv", k, v, self.batch * self.keys * self.q_width)
        if self.eager:
            att = self.eager_core(q, k, v, copied=not widened)
        else:
            att = o.fused_attention(
                "attention", q, k, v, batch=self.batch, heads=spec.heads, seq=self.seq
            )
            attention = self.g.nodes[-1]
            if self.fused and rope and widened:
                # rotary made new q and k, repeat_kv new K/V: nothing reads c_attn's output
                # any more, but the program that saves keeps it to attention's backward
                attention.saved.append(qkv)
            if self.selective:
                # the reference program frees the first run's output with the kernel's
                # backward, after the rerun's (its selective traces' order)
                attention.kept.append(att)
                self.g.checkpoint_end()
        if self.selective:  # the program that does not save tags no part
            att.part = ""
        proj = self.linear("output projection", f"{p}.o", att, spec.hidden)
        o.keep(normed)  # attn's argument: alive until it returns
        # attn's locals q, k, v live until it returns, but the program that saves drops the
        # un-widened K/V at repeat_kv; the one that does not (a checkpoint's first run)
        # keeps them too (the reference program's two orders)
        # (the cache's converted K/V replace the new ones)
        kept = rotated if not (widened and self.g.grad) and not held else rotated[:1]
        if self.fused:  # c_attn's output, which q/k/v view (eager: until attn returns)
            kept += (qkv,)
        o.keep(*kept, *held)
        if self.full and widened:
            o.keep(*rotated[1:])
            self.g.nodes[-1].rerun = False
        x_mid = o.binary("residual 1", x, proj, "add", part="norm")
        normed = self.norm("norm 2", f"{p}.norm_2", x_mid)
        assert spec.ffn
        if self.moe and self.full:
            down = self.experts_first_run(i, normed)
            self.experts(i, normed, down)
        elif self.moe:
            down = self.experts(i, normed)
        elif self.gated:  # down(silu(gate(x)) * up(x))
            gate = self.linear("MLP gate", f"{p}.gate", normed, spec.ffn, "mlp")
            act = o.unary("MLP activation", gate, saves="input", part="mlp")
            up = self.linear("MLP up", f"{p}.up", normed, spec.ffn, "mlp")
            hidden = o.mul("MLP gate * up", act, up, part="mlp")
        else:  # c_proj(GELU(c_fc(x))), nn.GELU(approximate="tanh"): one kernel, saves its input
            up = self.linear("MLP up", f"{p}.up", normed, spec.ffn, "mlp")
            hidden = o.unary("MLP activation", up, saves="input", part="mlp")
        if not self.moe:
            down = self.linear("MLP down", f"{p}.down", hidden, spec.hidden)
        o.keep(normed)
        out = o.binary("output", x_mid, down, "add", part="norm")
        o.keep(x)  # the decoder's loop holds the block's input until it returns
        if self.full:
            self.g.checkpoint_end()
        o.prefix = ""
        return out

    def experts_first_run(self, i: int, x: Tensor) -> Tensor:
        """A checkpointed MoE block's first run, as the reference program has it: under
        autocast every expert's 16-bit copy in one op (kept to autocast's exit), then the
        dense MLP without weights or router; the recompute runs ``experts``."""
        o, g, spec, n, p = self.ops, self.g, self.spec, self.n, f"blocks.{i}"
        first: list[Node] = []
        if o.autocast:
            for j, kind in enumerate(("up", "down")):
                for m in range(len(projection_shapes(spec, kind))):
                    w = self.p(f"{p}.moe.{kind}.{m}")
                    copy = o._t(f"{w.name} to {o.autocast.value}", w.numel, o.autocast,
                                component=Component.autocast_weight_copies)
                    copy.scale = w.scale
                    first.append(g.node(
                        f"{o.prefix}experts' 16-bit weights", [w], [copy], cast_cache=True,
                        new_point=not (j or m),
                    ))
        width = n * shape_of(spec, self.w).active_ffn

        def op(name: str, x: Tensor, numel: int, part: str = "", matmul: bool = False) -> Tensor:
            xi = o._autocast_low(x, part) if matmul else x
            if xi is not x:  # its cast
                first.append(g.nodes[-1])
            out = o._t(name, numel, xi.dtype, part=part)
            node = g.node(f"{o.prefix}{name}", [xi], [out])
            if matmul:
                node.matmul = False
            first.append(node)
            return out

        if self.gated:
            gate = op("MLP gate", x, width, "mlp", matmul=True)
            act = op("MLP activation", gate, width, "mlp")
            up = op("MLP up", x, width, "mlp", matmul=True)
            out = o._t("MLP gate * up", width, up.dtype, part="mlp")
            first.append(g.node(f"{o.prefix}MLP gate * up", [act, up], [out]))
            hidden = out
        else:
            up = op("MLP up", x, width, "mlp", matmul=True)
            hidden = op("MLP activation", up, width, "mlp")
        down = op("MLP down", hidden, n * spec.hidden, matmul=True)
        for node in first:
            node.rerun = False
        return down

    def experts(self, i: int, x: Tensor, down: Tensor | None = None) -> Tensor:
        """The reference program's mixture-of-experts MLP: a dense MLP as wide as the
        experts a token passes through (``active_ffn``), whose projections hold every
        expert's weights (and the router's): in training their 16-bit copies and gradients
        are all made, and the router's logits, fp32 softmax and top-k weights and indices
        are one tensor that the up projection keeps for backward; inference casts no
        expert and has no router."""
        o, spec, n, p = self.ops, self.spec, self.n, f"blocks.{i}"
        ups = [self.p(f"{p}.moe.up.{j}") for j in range(len(projection_shapes(spec, "up")))]
        downs = [
            self.p(f"{p}.moe.down.{j}") for j in range(len(projection_shapes(spec, "down")))
        ]
        if not self.g.grad:
            ups, downs = [], []
        start = len(self.g.nodes)
        width = n * shape_of(spec, self.w).active_ffn
        router: list[Tensor] = []
        if self.g.grad:
            e, k = spec.experts, spec.experts_per_token
            nbytes = n * e * (self.compute.size + 4) + n * k * (4 + INT64)
            router = [o._t("router", nbytes, DType.uint8, part="mlp")]
            self.g.node(f"{o.prefix}router", [x], router)
        half = len(ups) // 2
        if self.gated:
            gate = self.multi_linear("MLP gate", x, ups[:half], width, "mlp")
            act = o.unary("MLP activation", gate, saves="input", part="mlp")
            up = self.multi_linear("MLP up", x, ups[half:], width, "mlp", router)
            hidden = o.mul("MLP gate * up", act, up, part="mlp")
        else:
            up = self.multi_linear("MLP up", x, ups, width, "mlp", router)
            hidden = o.unary("MLP activation", up, saves="input", part="mlp")
        out = self.multi_linear("MLP down", hidden, downs, n * spec.hidden)
        if down is None:
            return out
        # the recompute's own nodes; its down projection stands for the first run's, whose
        # output the block returns (the recompute stops before making it)
        for node in self.g.nodes[start:]:
            node.first_run = False
        node = self.g.nodes[-1]
        node.outputs = [down]
        down.requires_grad = out.requires_grad
        return down

    def multi_linear(
        self,
        name: str,
        x: Tensor,
        weights: list[Tensor],
        numel: int,
        part: str = "",
        extra_saved: list[Tensor] | None = None,
    ) -> Tensor:
        """A projection by several weights at once (the experts' matrices and biases): under
        autocast each one's 16-bit copy (right to left; the biases' are not saved) and the
        input's. Backward as ``project_backward`` wrote it: unbiased, every matrix's gradient
        then the input's (a view); biased, the input's first, then the matrices', then each
        bias's with its column-sum scratch (after the saved tensors die in a checkpointed
        block); the 16-bit gradients are cast to fp32 matrices first."""
        o = self.ops
        vector = [w.name in self.vectors for w in weights]
        ws = weights
        xi = x
        if o.autocast:
            casts: list[tuple[Tensor, Node]] = []
            for w in reversed(weights):  # made right to left
                casts.append((o.cast(w, o.autocast), self.g.nodes[-1]))
            casts.reverse()
            ws = [c for c, _ in casts]
            xi = o._autocast_low(x, part)
            if any(vector):  # matrices' casts run backward first, then the biases'
                nodes = [nd for _, nd in casts]
                seqs = sorted((nd.seq for nd in nodes), reverse=True)
                order = [nd for nd, v in zip(nodes, vector, strict=True) if not v]
                order += [nd for nd, v in zip(nodes, vector, strict=True) if v]
                for nd, seq in zip(order, seqs, strict=True):
                    nd.seq = seq
        out = o._t(name, numel, xi.dtype if o.autocast else promote(xi.dtype, self.weight),
                   part=part)
        matrices = [1 + j for j, v in enumerate(vector) if not v]
        vectors = [1 + j for j, v in enumerate(vector) if v]
        rows = self.n

        def backward(bw: Backward) -> None:
            g = bw.out()
            dtype = g.dtype if g else out.dtype
            if vectors:
                bw.new(0, dtype=dtype, view=True)
            for j in matrices:
                bw.new(j, dtype=dtype)
            bw.sim.matmul("backward", False)
            if not vectors:
                bw.new(0, dtype=dtype, view=True)
                return
            sim = bw.sim
            if bw.node.region is not None:
                # the checkpoint's unpacked tensors die with the node's locals, before the
                # bias reduction (fp32 GPT-2 and AMP Qwen2.5 full-checkpoint traces)
                for t in sim.saved_refs.pop(id(bw.node), []):
                    sim.unref(t)
                sim.tape.op(f"{bw.node.name} bias gradient")
            for j in vectors:
                bw.new(j, dtype=dtype)
                cols = bw.node.inputs[j].numel
                bw.temp("bias gradient reduction", column_sum_scratch_bytes(rows, cols, sim.mp))

        saved = [xi, *(w for w, v in zip(ws, vector, strict=True) if not v), *(extra_saved or [])]
        node = self.g.node(
            f"{o.prefix}{name}", [xi, *ws, *(extra_saved or [])], [out], saved=saved,
            backward=backward,
        )
        node.matmul = any(vector)
        return out

    def eager_core(self, q: Tensor, k: Tensor, v: Tensor, *, copied: bool) -> Tensor:
        """``softmax(q @ k^T * scale).masked_fill(...)`` then ``@ v``, as the reference's
        ``SelfAttention.core`` runs it (allocator traces of eager runs,
        benchmarks/data/h200-traces/frames2.json.gz, traces.json): matmul folds (b, heads)
        into one batch dimension, so q, and k and v unless repeat_kv made them, are copied
        to (b, heads, s, hd) memory, which bmm saves; the scores' scaled and masked copies;
        softmax (fp32 under autocast) saves its output; under autocast ``.to(v.dtype)``
        makes the 16-bit probabilities that multiply V; the output is copied back to
        tokens first for o_proj, which saves it."""
        o, spec = self.ops, self.spec
        scores = self.batch * spec.heads * self.seq * self.keys
        # one decode token's q and the cache's K/V fold into bmm batches as views
        prompt = self.seq > 1 or self.g.grad
        copied = copied and prompt
        qc = o.copy("contiguous q", q, part="attention") if prompt else q
        kc = o.copy("contiguous k", k, part="attention") if copied else k
        product = o.bmm("q @ k^T", qc, kc, scores)
        masked = scaled = o.scalar("scaled scores", product)
        if prompt:  # a decode token attends to every cached position
            assert self.mask is not None
            masked = o.masked_fill("masked scores", scaled, self.mask)
        upcast = o.autocast is not None
        probs = o.softmax_to(
            "softmax",
            masked,
            DType.fp32 if upcast else masked.dtype,
            copy_input=self.w.precision is Precision.amp_bf16,
        )
        probs = o.cast(probs, v.dtype, "16-bit probabilities", part="attention")
        vc = o.copy("contiguous v", v, part="attention") if copied else v
        pv = o.bmm("probs @ v", probs, vc, self.n * self.q_width)
        # core's locals (`scores`, repeat_kv's K and V) live until it returns
        o.keep(masked, *([] if copied else [k, v]))
        if self.selective:
            self.g.checkpoint_end()
        if not prompt:
            return pv
        return o.unary("attention output", pv, part="attention")

    def forward(self) -> tuple[Tensor | None, Tensor]:
        """The loss (None without grad mode), and the logits (held by the forward until it
        returns; without grad mode, the last position's, as ``generate`` computes them)."""
        o, spec = self.ops, self.spec
        assert spec.vocab
        x = o.embedding("embedding output", self.p("embed"), self.ids, self.n, spec.hidden)
        tied_plain = spec.tied and o.autocast is None and self.g.grad
        if tied_plain:
            # the tied weight's two gradients meet in its input buffer; without autocast the
            # sum is a new tensor (measured: the fp32 Llama 3.2 3B trace,
            # benchmarks/data/h200-traces/frames4.json.gz)
            _mark_view(self.g.nodes[-1], (0,))
        if self.learned:  # x + positions(arange(s)): broadcast over the batch
            pos = o.embedding(
                "position embeddings", self.p("positions"), self.position_ids, self.seq,
                spec.hidden,
            )
            x = o.add_broadcast("embeddings sum", x, pos)
        cos = sin = None
        if not self.learned:
            cos, sin = self.rope_tables()
        if self.eager and not self.cached:  # ones(s, s, dtype=bool).triu(1), for every block
            self.mask = Tensor("causal mask", self.seq * self.seq, DType.bool)
            self.g.node(
                "causal mask", [], [self.mask], scratch=[("ones", self.seq * self.seq)],
                # else made with the rotary tables' (or, inference, the embeddings') last op
                new_point=self.learned and self.g.grad,
            )
        for i in range(spec.layers):
            x = self.block(i, x, cos, sin)
        normed = self.norm("final norm", "norm_f", x)
        if not self.g.grad:  # self.lm_head(x[:, -1:]); forward's locals live until then
            o.keep(*(t for t in (cos, sin, self.mask) if t is not None))
            last = o.view(normed, "last position", numel=self.batch * spec.hidden)
            logits = o.linear(
                "lm_head", last, self.p("lm_head.weight"), None, spec.vocab,
                component=Component.logits,
            )
            o.keep(normed)
            return None, logits
        logits = o.linear(
            "lm_head", normed, self.p("lm_head.weight"), None, spec.vocab,
            component=Component.logits,
        )
        if tied_plain:
            _mark_view(self.g.nodes[-1], (1,))
        up = o.cast(logits, DType.fp32, "fp32 logits")
        up.component = Component.logits
        loss = o.cross_entropy(up, self.targets)
        o.keep(normed, logits)
        return loss, logits


def training_steps(
    spec: ModelSpec, w: Workload, workspace_bytes: int, mp: Multiprocessors = H200
) -> tuple[Timeline, Timeline, dict[str, int]]:
    """The first and a steady training step of the reference loop (``vramfit measure
    --train`` runs one first and two steady ones), and what block 0 keeps from its forward
    to its backward, by part (a fully checkpointed block keeps only its input).

    The first step creates the optimizer state lazily (torch.optim ``_init_group``) and the
    cuBLAS workspaces at its first matmul on each thread; a steady one has them from its
    start, and ``zero_grad(set_to_none=True)`` has freed the gradients before it."""
    spec = spec.resolved()
    model = Model(spec, w)
    loss, _ = model.forward()
    weight = model.weight.size
    shapes = param_tensors(spec).all_shapes(spec.layers)
    optimizer = Optimizer(w.optimizer)
    scale = model.scale
    state_shapes = shapes
    if scale != 1:  # the optimizer state of the declared size: first dimensions scaled
        state_shapes = [(max(1, round(s[0] * scale)), *s[1:]) for s in shapes]
    state = optimizer_state_tensors(optimizer, state_shapes, weight)
    n = w.batch * w.seq
    biased = bool(spec.bias or spec.qkv_bias)
    steps = []
    block_bytes: dict[str, int] = {}
    span: Span | None = None  # the first step's forward and backward
    forward_end = 0
    for first in (True, False):
        t = Tape()
        t.op("build")
        t.persist("weights", Component.weights, _weights(shapes, scale, weight))
        if first:
            t.temp(
                "lm_head copy before tying", Component.weights,
                tied_copy_bytes(spec, scale, weight),
            )
        t.op("start")
        t.persist("input ids and targets", Component.activations, [n * INT64, n * INT64])
        if not first:
            t.persist("optimizer state", Component.optimizer_state, state)
            made = Workspaces(t, workspace_bytes)
            made.matmul("forward", biased)
            made.matmul("backward", biased and model.full)
        span, _, end = forward_and_backward(
            model.g, loss, t, span, first=first, workspace_bytes=workspace_bytes, mp=mp
        )
        forward_end = forward_end if end is None else end
        t.phase = "optimizer"
        t.op("optimizer step")
        if first:  # created lazily by the first step (torch.optim ``_init_group``)
            t.persist("optimizer state", Component.optimizer_state, state)
        temporaries = optimizer_step_temporaries(optimizer, _weights(shapes, scale, 1), weight)
        for j, nbytes in enumerate(temporaries):
            if j and optimizer is Optimizer.adafactor:  # one parameter at a time
                t.op("optimizer step")
            t.temp("optimizer step temporary", Component.optimizer_temp, nbytes)
        steps.append(t.finish())
        if not first:
            block_bytes = t.block_bytes(forward_end)
            if model.full:  # a checkpointed block keeps only its input
                block_bytes = {"norm": n * spec.hidden * weight}
    return steps[0], steps[1], block_bytes


class _OneThread(Workspaces):
    """Inference runs every matmul on the caller's thread: one set of workspaces."""

    def matmul(self, thread: str, biased: bool) -> None:
        super().matmul("", biased)


def inference(spec: ModelSpec, w: Workload, workspace_bytes: int) -> Timeline:
    """A prefill of the prompt under ``inference_mode`` (every tensor dies at its last use,
    autocast caches nothing) and, with ``gen_tokens``, the largest decode step: the last
    token against the full static cache (``vramfit measure``'s generate loop)."""
    spec = spec.resolved()
    t = Tape(phase="prefill")
    weight = WEIGHT_DTYPE[w.precision].size
    shapes = param_tensors(spec).all_shapes(spec.layers)
    t.op("build")
    scale = _scale(spec)
    t.persist("weights", Component.weights, _weights(shapes, scale, weight))
    t.temp("lm_head copy before tying", Component.weights, tied_copy_bytes(spec, scale, weight))
    t.op("start")
    t.persist("input ids", Component.activations, [w.batch * w.seq * INT64])
    gen = w.gen_tokens or 0
    if gen:
        per_tensor = kv_cache_bytes(spec, w) // (2 * spec.layers)
        t.persist("KV cache", Component.kv_cache, [per_tensor] * (2 * spec.layers))
    ws = _OneThread(t, workspace_bytes)
    prefill = Model(spec, w, grad=False)
    _, logits = prefill.forward()
    prefill.g.hold(logits, "step")
    sim = run_forward(prefill.g, t, workspaces=ws)
    end_forward(sim)
    if gen:
        t.phase = "decode"
        t.op("next token")
        release_held(sim, "step")
        step = Model(spec, w, grad=False, seq=1, cached=w.seq + gen - 1)
        _, logits = step.forward()
        step.g.hold(logits, "step")
        sim = run_forward(step.g, t, workspaces=ws)
        end_forward(sim)
    t.op("end")
    release_held(sim, "step")
    return t.finish()
