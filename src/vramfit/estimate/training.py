"""The memory timeline of one training step, op by op: forward, backward, optimizer step.

Each op of the reference block (``vramfit.measure.models``, which follows Hugging Face's
GPT-2 / Llama modeling code) allocates its outputs and frees what nothing needs any more,
in the order PyTorch runs them: the forward keeps what autograd saves, the backward frees
each saved tensor once the node that saved it has run and creates activation gradients
and parameter gradients. The order matters, not only the sizes: PyTorch's caching
allocator (``vramfit.estimate.allocator``) places each request in the blocks freed before
it, so the same tensors in another order fragment memory differently. The order follows
allocator traces recorded on an H200 (benchmarks/data/h200-traces), labelled with the source
line of each request and, for the backward, with the autograd node and ATen op; replayed,
the program reproduces those traces' peak allocated bytes and, for most, their reserved
bytes exactly (tests/estimate/test_traces.py).

Activation checkpointing is PyTorch's non-reentrant ``torch.utils.checkpoint``: the
checkpointed region (a whole block, or attention's core when selective) runs first without
saving (the program it shares with inference, ``ForwardPass``), and backward reruns it, stopping
as soon as its last saved tensor exists.

What is saved follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", arXiv 2205.05198, section 4.1: ``s*b*h*(34 + 5*a*s/h)`` bytes per 16-bit
GPT layer with dropout), without dropout masks, with SwiGLU's three projections, GQA K/V
widened by ``repeat_kv``, fp32 norms and residuals under autocast, one 16-bit copy of the
normed input per projection under autocast (autocast does not cache casts of activations,
only of weights), and flash attention's O(s) logsumexp instead of the s x s probabilities
(Dao et al. 2022).

Steady state (``first_step=False``): optimizer state and both cuBLAS workspaces exist from
the start; ``zero_grad(set_to_none=True)`` runs before the forward, so gradients are born
during backward and live through the optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from vramfit.config import (
    Arch,
    Attention,
    Checkpointing,
    Mlp,
    ModelSpec,
    Norm,
    Optimizer,
    Positions,
    Workload,
)
from vramfit.estimate.activations import (
    FP32,
    INT64,
    Shape,
    attention_stats,
    norm_stats,
    shape_of,
)
from vramfit.estimate.dtypes import Dtypes, dtypes_for
from vramfit.estimate.inference import ForwardPass, Workspaces, projection_forward
from vramfit.estimate.kernels import H200, Multiprocessors, column_sum_scratch_bytes
from vramfit.estimate.params import (
    ParamShape,
    count_params,
    param_tensors,
    projection_shapes,
    tied_copy_bytes,
)
from vramfit.estimate.timeline import Tape, Timeline

# embedding_dense_backward (aten/src/ATen/native/cuda/Embedding.cu): up to 3072 indices it
# scatters directly; beyond, it sorts them and sums in partial segments of up to 10 rows
# (NROWS_PER_THREAD in EmbeddingBackwardKernel.cu).
EMBEDDING_DIRECT_MAX_INDICES = 3072
EMBEDDING_ROWS_PER_SEGMENT = 10

# 8-bit Adam keeps two uint8 states plus one fp32 absmax per 2048-value block (Dettmers et al.
# 2022, "8-bit Optimizers via Block-wise Quantization", section 2); tensors under 4096 values
# keep 32-bit states (bitsandbytes ``min_8bit_size``).
ADAM8BIT_BLOCK = 2048
ADAM8BIT_MIN_SIZE = 4096


def optimizer_state_tensors(
    optimizer: Optimizer, shapes: list[ParamShape], weight_bytes: int
) -> list[int]:
    """Bytes of each persistent optimizer-state tensor for parameters of ``shapes``."""
    out: list[int] = []
    for shape in shapes:
        elements = math.prod(shape)
        if optimizer in (Optimizer.adamw, Optimizer.adamw_fused):
            out += [elements * weight_bytes] * 2  # exp_avg, exp_avg_sq in the param dtype
        elif optimizer is Optimizer.sgd_momentum:
            out.append(elements * weight_bytes)  # momentum_buffer
        elif optimizer is Optimizer.adam_8bit:
            if elements < ADAM8BIT_MIN_SIZE:
                out += [elements * FP32] * 2
            else:  # uint8 state + fp32 absmax per block, for each of the two moments
                out += [elements + -(-elements // ADAM8BIT_BLOCK) * FP32] * 2
        elif optimizer is Optimizer.adafactor:
            # a row and a column second moment per matrix, a full variance per vector
            # (Shazeer & Stern 2018, section 3; torch.optim.Adafactor)
            if len(shape) == 2:
                out += [shape[0] * weight_bytes, shape[1] * weight_bytes]
            else:
                out.append(elements * weight_bytes)
    return out


def optimizer_step_temporaries(
    optimizer: Optimizer, param_elements: list[int], weight_bytes: int
) -> list[int]:
    """Tensors allocated only while ``optimizer.step()`` runs (bytes each).

    foreach AdamW materialises ``sqrt(exp_avg_sq)`` for every parameter at once
    (torch/optim/adam.py ``_multi_tensor_adam``: ``exp_avg_sq_sqrt = torch._foreach_sqrt``);
    the fused kernel updates in place. Adafactor builds a full-size variance estimate per
    parameter (torch/optim/_adafactor.py ``var_estimate = row_var @ col_var``), one parameter
    at a time: its ``foreach=None`` default selects the single-tensor implementation
    (measured: benchmarks/data/h200-validation). SGD updates in place.
    """
    if optimizer in (Optimizer.adamw, Optimizer.adafactor):
        return [e * weight_bytes for e in param_elements]
    return []


@dataclass
class _Saved:
    """Keys of one block's saved tensors, freed by the backward ops that use them."""

    x_in: int | None = None
    norm1: list[int | None] = field(default_factory=list)  # statistics
    norm1_out: int | None = None  # saved by q/k/v when they read it uncast
    qkv_saved: list[list[int | None]] = field(default_factory=list)  # per projection
    qkv: list[int | None] = field(default_factory=list)  # q, k, v as attention sees them
    narrow_kv: list[int | None] = field(default_factory=list)  # un-widened k, v (selective)
    core: list[int | None] = field(default_factory=list)  # lse / probabilities
    attn_out: int | None = None
    o_saved: list[int | None] = field(default_factory=list)
    x_mid: int | None = None
    norm2: list[int | None] = field(default_factory=list)
    norm2_out: int | None = None
    mlp_saved: list[list[int | None]] = field(default_factory=list)  # gate, up (or fc)
    mlp: list[int | None] = field(default_factory=list)  # intermediates
    down_saved: list[int | None] = field(default_factory=list)
    copies: list[int | None] = field(default_factory=list)  # eager: bmm's contiguous q/k/v
    extra: list[int | None] = field(default_factory=list)  # fused q/k/v under RoPE: c_attn's


class _Step:
    """One training step of the reference model, written as the ops PyTorch runs."""

    def __init__(
        self,
        spec: ModelSpec,
        workload: Workload,
        workspace_bytes: int,
        first_step: bool,
        mp: Multiprocessors = H200,
    ) -> None:
        self.spec = spec = spec.resolved()
        self.w = workload
        self.dt: Dtypes = dtypes_for(workload.precision)
        self.sh: Shape = shape_of(spec, workload)
        self.tensors = param_tensors(spec)
        counts = count_params(spec)
        self.scale = (spec.params or counts.total) / counts.total  # a declared --params
        self.workspace = workspace_bytes
        self.mp = mp
        self.first = first_step
        self.tape = Tape()
        self.fused_qkv = spec.arch is Arch.gpt2
        self.gated = spec.mlp is Mlp.swiglu
        self.rope = spec.positions is Positions.rope
        self.widened = self.sh.kv_heads < self.sh.heads
        self.eager = workload.attention is Attention.eager
        self.selective = workload.checkpointing is Checkpointing.selective
        self.full = workload.checkpointing is Checkpointing.full
        # what a checkpoint runs without saving: a block (full) or attention's core (selective)
        # the first step makes the workspaces; a steady one has them from its start
        self.ws = Workspaces(self.tape, workspace_bytes, active=first_step)
        self.unsaved = ForwardPass(
            self.tape, spec, workload, self.scale, self.ws, training=True, thread="forward"
        )
        self.thread = "forward"  # the autograd engine runs backward on its own thread
        self.mask: int | None = None  # eager attention's causal mask
        self.rope_tables: list[int | None] = []  # cos, sin
        self.weight_grads: list[int | None] = []  # the last projection's weight gradients
        self.sums: set[int | None] = set()  # input-gradient sums autograd made out of place
        self.block0_input: int | None = None
        self.bias_copies: list[int | None] = []  # autocast's cached bias copies: not saved

    # sizes ---------------------------------------------------------------------------------
    def params(self, shapes: Sequence[ParamShape], per_element: int) -> list[int]:
        return [round(math.prod(s) * self.scale * per_element) for s in shapes]

    def linear_shapes(self, kind: str) -> list[ParamShape]:
        return projection_shapes(self.spec, kind)

    def norm_shapes(self) -> list[ParamShape]:
        h = self.sh.hidden
        return [(h,), (h,)] if self.spec.norm is Norm.layernorm else [(h,)]

    # pieces ---------------------------------------------------------------------------------
    def project(
        self,
        name: str,
        shapes: list[ParamShape],
        in_bytes: int,
        out_bytes: int,
        cast_input: bool,
        part: str = "",
        component: str = "activations",
        output: bool = True,
    ) -> tuple[int | None, list[int | None]]:
        """A projection's forward (``projection_forward``), its matmul's workspaces, and
        what backward frees: the weight copy and the input copy (an uncast input is the
        caller's to free). Autocast's bias copy is not saved: it dies when the forward ends
        (``bias_copies``)."""
        biases, weights, copy, out = projection_forward(
            self.tape,
            self.dt,
            name,
            shapes,
            self.scale,
            in_bytes,
            out_bytes,
            cast_input,
            part=part,
            component=component,
            output=output,
        )
        self.bias_copies += biases
        if output:
            self.ws.matmul(self.thread, biased=any(len(shape) == 1 for shape in shapes))
        return out, [*weights, copy]

    def project_backward(
        self,
        name: str,
        shapes: list[ParamShape],
        in_bytes: int,
        saved: Sequence[int | None],
        g_out: int | None,
        fp32_input: bool = False,
        buffer: int | None = None,
    ) -> int | None:
        """A projection's backward; returns its input's gradient (in ``buffer`` when one is
        given: later gradients accumulate in place into the first).

        As the allocator traces show (fp32 GPT-2, benchmarks/data/h200-traces/frames2.json.gz;
        AMP Qwen2.5, traces2.json; AMP GPT-2 labelled down to the autograd node,
        cpp-frames.json.gz): addmm (a biased projection) makes the input's gradient, then
        the weight's; mm (unbiased) the weight's first. A bias gradient is a column sum over
        every token, made before the node frees what it saved (a fully checkpointed block
        frees them first). Then the node frees its saved tensors and, when nothing else
        reads it, its incoming gradient ``g_out``. Under autocast the 16-bit input gradient
        is then cast to fp32 when the input was fp32 (``fp32_input``), and last each
        16-bit parameter gradient is cast to its fp32 parameter's dtype."""
        t, dt = self.tape, self.dt
        grad = "activation_grads"
        vectors = [x for x in shapes if len(x) == 1]
        matrices = [x for x in shapes if len(x) != 1]
        # under autocast the first gradients are 16-bit temporaries, else the gradients
        w_dtype, w_component = (dt.compute, grad) if dt.autocast else (dt.weight, "gradients")
        prefix = "16-bit " if dt.autocast else ""

        def weight_grads() -> list[int | None]:
            keys = [
                t.new(f"{name} {prefix}weight gradient", w_component, size)
                for size in self.params(matrices, w_dtype)
            ]
            self.ws.matmul(self.thread, biased=False)  # backward's matmuls are plain mm
            self.weight_grads = keys
            return keys

        if vectors:
            gx = t.new(f"{name} input gradient", grad, in_bytes)
            firsts = weight_grads()
        else:
            firsts = weight_grads()
            gx = t.new(f"{name} input gradient", grad, in_bytes)
        if vectors and self.full:
            # a checkpointed block's saved tensors are the checkpoint's, handed to the node
            # when it unpacks them: they die with its locals, before the bias reduction
            # (fp32 GPT-2 and AMP Qwen2.5 full-checkpoint traces; without checkpointing the
            # node releases them after it, AMP GPT-2 trace: cpp-frames.json.gz)
            t.free(*saved)
            t.op(f"{name} bias gradient")
        for shape in vectors:
            firsts.append(
                t.new(
                    f"{name} {prefix}bias gradient", w_component, self.params([shape], w_dtype)[0]
                )
            )
            # the column sum's staging buffer (vramfit.estimate.kernels)
            scratch = column_sum_scratch_bytes(self.sh.tokens, shape[0], self.mp)
            t.temp(f"{name} bias gradient reduction", grad, scratch)
        t.free(*saved, g_out)
        if dt.autocast and fp32_input:
            t.op(f"{name} input gradient to fp32")
            g32 = t.new(f"{name} fp32 input gradient", grad, in_bytes * FP32 // dt.compute)
            t.free(gx)
            gx = g32
        if buffer is not None and (dt.autocast or buffer in self.sums):
            t.free(gx)  # accumulated in place into the first gradient to arrive
            gx = buffer
        elif buffer is not None:
            # without autocast the first gradient is a view of a matmul's output, which
            # autograd cannot add into: the sum is a new tensor (the labelled fp32 Llama
            # trace, cpp-frames.json.gz); a third gradient is added into that sum
            t.op(f"{name} input gradients summed")
            total = t.new(f"{name} summed input gradient", grad, in_bytes)
            t.free(buffer, gx)
            self.sums.add(total)
            gx = total
        if dt.autocast:  # each 16-bit gradient cast to its fp32 parameter's dtype in turn
            self.weight_grads = []
            for first, size in zip(firsts, self.params(matrices + vectors, dt.weight), strict=True):
                t.op(f"{name} fp32 gradient")
                self.weight_grads.append(t.new(f"{name} gradient", "gradients", size))
                t.free(first)
        return gx

    def rope_backward(
        self, name: str, g: int | None, size: int, tables: Sequence[int | None] = ()
    ) -> int | None:
        """The backward of ``x * cos + rotate_half(x) * sin`` for a gradient ``g`` of ``size``
        bytes: g * sin, the negated half and their concatenation (rotate_half's backward),
        then g * cos, accumulated in place into it (labelled trace, cpp-frames.json.gz)."""
        t, grad = self.tape, "activation_grads"
        t.op(f"{name} rotary backward")
        g_sin = t.new(f"{name} gradient * sin", grad, size)
        neg = t.new(f"{name} rotate_half gradient, negated half", grad, size // 2)
        out = t.new(f"{name} unrotated gradient", grad, size)
        t.free(g_sin, neg, *tables[1:])  # (cos, sin): sin's last use
        t.op(f"{name} rotary backward, cos")
        t.temp(f"{name} gradient * cos", grad, size)
        t.free(g, *tables[:1])
        return out

    def embedding_partial_sums(self, name: str, indices: int) -> None:
        """Past 3072 indices embedding_dense_backward sorts them and sums each row's
        gradients in fp32 partial segments, sized for the most there can be (n + n // 10),
        before scattering them (measured: 4096 tokens -> 4505 segments)."""
        if indices > EMBEDDING_DIRECT_MAX_INDICES:
            partials = indices + indices // EMBEDDING_ROWS_PER_SEGMENT
            self.tape.temp(
                f"{name} gradient partial sums",
                "activation_grads",
                partials * self.sh.hidden * FP32,
            )

    def param_grads(self, name: str, shapes: list[ParamShape]) -> None:
        """Gradients of parameters that are not projections (norms, position embeddings),
        live until the next zero_grad."""
        for size in self.params(shapes, self.dt.weight):
            self.tape.new(f"{name} gradient", "gradients", size)

    def norm_forward(self, name: str) -> tuple[int | None, list[int | None]]:
        """A norm: its output (fp32 under autocast) and saved statistics."""
        n, h, dt, t = self.sh.tokens, self.sh.hidden, self.dt, self.tape
        out = t.new(
            f"{name} output",
            "activations",
            n * h * (FP32 if dt.autocast else dt.compute),
            part="norm",
        )
        stats = [
            t.new(f"{name} statistics", "activations", s, part="norm")
            for s in norm_stats(n, self.spec.norm)
        ]
        return out, stats

    def core_forward(
        self, i: int, s: _Saved, narrow: list[int | None], recompute: bool = False
    ) -> int | None:
        """repeat_kv + attention, saving the widened K/V and the softmax statistics or
        probabilities; returns the attention output (nothing when ``recompute``).

        Under selective checkpointing the forward runs the core without saving
        (``ForwardPass``) and backward runs it again (``recompute``), keeping what it saves;
        non-reentrant checkpointing stops that rerun as soon as the last saved tensor exists
        (torch.utils.checkpoint ``_StopRecomputationError``): eager attention stops inside
        P @ V, whose inputs are saved before it computes; flash attention saves its own
        output, which stays in ``s.core``."""
        t, sh, dt = self.tape, self.sh, self.dt
        n, c = sh.tokens, dt.compute
        if self.selective and not recompute:
            wide = []
            if self.widened:
                t.op(f"block {i} repeat_kv")
                wide = [
                    t.new(f"block {i} widened {x}", "activations", n * sh.q_width * c) for x in "kv"
                ]
            return self.unsaved.core(i, sh.seq, sh.seq, kv_copied=not self.widened, wide=wide)
        s.qkv = list(s.qkv)
        if self.widened:
            t.op(f"block {i} repeat_kv")
            wide = [
                t.new(f"block {i} widened {x}", "activations", n * sh.q_width * c, part="attention")
                for x in "kv"
            ]
            s.qkv[1:] = wide
            if not self.selective:
                t.free(*narrow)  # Llama's narrow K/V die; GPT-2's are views of c_attn's output
        t.op(f"block {i} attention")
        if self.eager:
            # as the allocator traces show (benchmarks/data/h200-traces/frames2.json.gz):
            # matmul folds (b, heads) into one batch dimension, so q, and k and v unless
            # repeat_kv made them, are first copied to (b, heads, s, hd) memory and bmm saves
            # the copies; then q @ k^T, its scaled and masked copies, softmax (fp32 under
            # autocast; see Dtypes.softmax_upcast), which saves its output (Korthikanti's
            # 5as/h term), and the copy of P @ V that o_proj reads
            part = "attention"
            t.op(f"block {i} q @ k^T")
            copies = [t.new(f"block {i} contiguous q", "activations", n * sh.q_width * c, part)]
            if not self.widened:
                copies.append(
                    t.new(f"block {i} contiguous k", "activations", n * sh.kv_width * c, part)
                )
            product = t.new(f"block {i} q @ k^T", "activations", sh.scores * c)
            t.op(f"block {i} scaled scores")
            scaled = t.new(f"block {i} scaled scores", "activations", sh.scores * c)
            t.free(product)
            t.op(f"block {i} masked scores")
            masked = t.new(f"block {i} masked scores", "activations", sh.scores * c)
            t.free(scaled)
            t.op(f"block {i} softmax")
            upcast = None
            if dt.softmax_upcast:
                upcast = t.new(f"block {i} fp32 scores", "activations", sh.scores * FP32)
            probs = [t.new(f"block {i} softmax", "activations", sh.scores * dt.softmax, part)]
            t.free(upcast)
            if dt.autocast:  # .to(v.dtype), after softmax's fp32 input copy has died
                t.op(f"block {i} probabilities to compute dtype")
                probs.append(t.new(f"block {i} 16-bit softmax", "activations", sh.scores * c, part))
            t.op(f"block {i} probs @ v")
            if not self.widened:
                copies.append(
                    t.new(f"block {i} contiguous v", "activations", n * sh.kv_width * c, part)
                )
            s.copies, s.core = copies, probs
            if recompute:
                t.free(masked)  # the rerun stops here; its unsaved locals die
                return None
            pv = t.new(f"block {i} probs @ v", "activations", n * sh.q_width * c)
            t.op(f"block {i} attention returns")
            t.free(masked)
            t.op(f"block {i} attention output")
            out = t.new(f"block {i} attention output", "activations", n * sh.q_width * c, part=part)
            t.free(pv)
            return out
        lse = attention_stats(sh, self.w)[0]
        s.core = [t.new(f"block {i} logsumexp", "activations", lse, part="attention")]
        out = t.new(
            f"block {i} attention output", "activations", n * sh.q_width * c, part="attention"
        )
        if recompute:  # flash saves its output for its backward: the rerun keeps it
            s.core.append(out)
            return None
        return out

    def forward_block(
        self, i: int, x_in: int | None, recompute: bool = False
    ) -> tuple[int | None, _Saved]:
        """One block's forward, keeping what autograd saves. Returns the block output and
        what backward needs. ``recompute``: full checkpointing's rerun in backward, which
        stops when the MLP's down projection has saved its inputs (see ``core_forward``):
        no output is made."""
        t, sh, dt = self.tape, self.sh, self.dt
        n, h, c, r = sh.tokens, sh.hidden, dt.compute, dt.residual
        autocast = dt.autocast
        s = _Saved(x_in=x_in)

        t.op(f"block {i} norm 1")
        normed, s.norm1 = self.norm_forward(f"block {i} norm 1")
        qkv_shapes = self.linear_shapes("qkv")
        if self.fused_qkv:
            t.op(f"block {i} q/k/v projection")
            qkv, saved = self.project(
                f"block {i} q/k/v",
                qkv_shapes,
                n * h * c,
                n * (sh.q_width + 2 * sh.kv_width) * c,
                autocast,
                "attention",
            )
            s.qkv, s.qkv_saved = [qkv], [saved]
            narrow: list[int | None] = []
            if self.rope:  # Pythia: RoPE on the q and k views makes new tensors
                q = self.unsaved.rope(f"block {i} q", None, n * sh.q_width * c, "attention")
                k = self.unsaved.rope(f"block {i} k", None, n * sh.kv_width * c, "attention")
                s.qkv, s.extra, narrow = [q, k, qkv], [qkv], [k]
        else:
            per = len(qkv_shapes) // 3
            keys = []
            for j, (name, width) in enumerate(
                (("q", sh.q_width), ("k", sh.kv_width), ("v", sh.kv_width))
            ):
                t.op(f"block {i} {name} projection")
                key, saved = self.project(
                    f"block {i} {name}",
                    qkv_shapes[j * per : (j + 1) * per],
                    n * h * c,
                    n * width * c,
                    autocast,
                    "attention",
                )
                keys.append(key)
                s.qkv_saved.append(saved)
            q, k, v = keys
            if self.rope:  # HF apply_rotary_pos_emb; nothing of it is saved
                q = self.unsaved.rope(f"block {i} q", q, n * sh.q_width * c, "attention")
                k = self.unsaved.rope(f"block {i} k", k, n * sh.kv_width * c, "attention")
            s.qkv = [q, k, v]
            narrow = [k, v]
        s.narrow_kv = narrow
        s.attn_out = self.core_forward(i, s, narrow)
        t.op(f"block {i} output projection")
        proj, s.o_saved = self.project(
            f"block {i} output projection", self.linear_shapes("o"), 0, n * h * c, False
        )
        if s.copies:  # bmm saved its copies: the projections' own outputs die with the module
            t.free(s.qkv[0], *([] if self.widened else s.qkv[1:]), *s.extra)
        if autocast:  # the fp32 norm output dies when attention returns; its casts are saved
            t.free(normed)
        else:
            s.norm1_out = normed
        t.op(f"block {i} residual 1")
        s.x_mid = t.new(f"block {i} residual 1", "activations", n * h * r, part="norm")
        t.free(proj)

        t.op(f"block {i} norm 2")
        normed, s.norm2 = self.norm_forward(f"block {i} norm 2")
        s.norm2_out = None if autocast else normed
        up_shapes = self.linear_shapes("up")
        half = len(up_shapes) // 2
        f = n * sh.active_ffn * c
        router = None
        if self.spec.experts > 1:
            # router logits, their fp32 softmax and the top-k weights and indices
            e, k_ = self.spec.experts, self.spec.experts_per_token
            t.op(f"block {i} router")
            router = t.new(
                f"block {i} router",
                "activations",
                n * e * (c + FP32) + n * k_ * (FP32 + INT64),
                part="mlp",
            )
        parts = ((up_shapes[:half], "MLP gate"), (up_shapes[half:], "MLP up"))
        if not self.gated:
            parts = ((up_shapes, "MLP up"),)
        s.mlp = []
        for shapes, name in parts:
            t.op(f"block {i} {name} projection")
            key, saved = self.project(f"block {i} {name}", shapes, n * h * c, f, autocast, "mlp")
            s.mlp_saved.append(saved)
            s.mlp.append(key)
            if name != "MLP up" or not self.gated:
                t.op(f"block {i} MLP activation")
                s.mlp.append(t.new(f"block {i} MLP activation", "activations", f, part="mlp"))
        if self.gated:
            t.op(f"block {i} MLP gate * up")
            s.mlp.append(t.new(f"block {i} MLP gate * up", "activations", f, part="mlp"))
        s.mlp_saved[-1].append(router)
        t.op(f"block {i} MLP down projection")
        down, s.down_saved = self.project(
            f"block {i} MLP down",
            self.linear_shapes("down"),
            0,
            n * h * c,
            False,
            output=not recompute,  # the rerun stops once down_proj has saved its inputs
        )
        if autocast:  # the fp32 norm output dies when the MLP returns (or the rerun stops)
            t.free(normed)
        if recompute:
            return None, s
        t.op(f"block {i} residual 2")
        x_out = t.new(f"block {i} output", "activations", n * h * r, part="norm")
        t.free(down)
        return x_out, s

    def backward_block(self, i: int, g: int | None, s: _Saved) -> None:
        """One block's backward: ``g`` is the residual-stream gradient, accumulated in place."""
        t, sh, dt = self.tape, self.sh, self.dt
        n, h, c, r = sh.tokens, sh.hidden, dt.compute, dt.residual
        f = n * sh.active_ffn * c
        grad = "activation_grads"
        up_shapes = self.linear_shapes("up")
        half = len(up_shapes) // 2
        autocast = dt.autocast

        t.op(f"block {i} MLP down backward")
        # the residual add's backward casts the fp32 gradient to the 16-bit branch's dtype
        g16 = t.new(f"block {i} 16-bit output gradient", grad, n * h * c) if autocast else None
        g_act = self.project_backward(
            f"block {i} MLP down",
            self.linear_shapes("down"),
            f,
            saved=[*s.down_saved, s.mlp[-1]],
            g_out=g16,
        )
        if self.gated:
            gate, act, up, _ = s.mlp
            t.op(f"block {i} MLP gate * up backward")
            g_silu = t.new(f"block {i} SiLU gradient", grad, f)
            g_up = t.new(f"block {i} up gradient", grad, f)
            t.free(g_act, act, up)
            t.op(f"block {i} MLP up backward")
            buffer = self.project_backward(
                f"block {i} MLP up",
                up_shapes[half:],
                n * h * c,
                saved=s.mlp_saved[1],
                g_out=g_up,
                fp32_input=autocast,
            )
            t.op(f"block {i} MLP activation backward")
            g_gate = t.new(f"block {i} gate gradient", grad, f)
            t.free(g_silu, gate)
            t.op(f"block {i} MLP gate backward")
            buffer = self.project_backward(
                f"block {i} MLP gate",
                up_shapes[:half],
                n * h * c,
                saved=[*s.mlp_saved[0], s.norm2_out],
                g_out=g_gate,
                fp32_input=autocast,
                buffer=buffer,
            )
        else:
            first = s.mlp[0]
            t.op(f"block {i} MLP activation backward")
            g_fc = t.new(f"block {i} MLP hidden gradient", grad, f)
            t.free(g_act, first)
            t.op(f"block {i} MLP up backward")
            buffer = self.project_backward(
                f"block {i} MLP up",
                up_shapes,
                n * h * c,
                saved=[*s.mlp_saved[0], s.norm2_out],
                g_out=g_fc,
                fp32_input=autocast,
            )
        t.op(f"block {i} norm 2 backward")
        g_norm = t.new(f"block {i} norm 2 input gradient", grad, n * h * r)
        self.param_grads(f"block {i} norm 2", self.norm_shapes())
        t.free(buffer, s.x_mid, *s.norm2, g_norm)  # accumulated in place into g

        t.op(f"block {i} output projection backward")
        g16 = t.new(f"block {i} 16-bit attention gradient", grad, n * h * c) if autocast else None
        # o_proj saved its input: eager attention's output copy (flash's output is also
        # saved by flash's backward, which frees it)
        g_o = self.project_backward(
            f"block {i} output projection",
            self.linear_shapes("o"),
            n * sh.q_width * c,
            saved=[*s.o_saved, s.attn_out if self.eager else None],
            g_out=g16,
        )
        kv_seen = sh.q_width if self.widened else sh.kv_width
        if self.eager:
            # The order follows the allocator traces of eager runs (fp32 GPT-2 in
            # benchmarks/data/h200-traces/frames2.json.gz; AMP bf16 GPT-2 in traces.json).
            # P @ V's backward folds the gradient's (b, heads) dimensions into one: o_proj's
            # (b, s, heads, hd) input gradient is copied to (b, heads, s, hd) memory first
            t.op(f"block {i} attention gradient to heads")
            g_heads = t.new(f"block {i} attention gradient, heads first", grad, n * sh.q_width * c)
            t.free(g_o)
            if self.selective:  # the checkpointed core runs again when P @ V's node needs it
                t.op(f"block {i} attention recompute")
                self.core_forward(i, s, s.narrow_kv, recompute=True)
            t.op(f"block {i} attention P @ V backward")
            dv = t.new(f"block {i} v gradient", grad, n * kv_seen * c)
            g = t.new(f"block {i} probabilities gradient", grad, sh.scores * c)
            # bmm's saved inputs die with its node: V as it multiplied (a copy, or
            # repeat_kv's output) and under autocast the 16-bit probabilities; without
            # autocast those are the softmax output, which softmax's backward still needs
            v_seen = s.qkv[2] if self.widened else s.copies[-1]
            t.free(g_heads, v_seen, s.core[-1] if dt.autocast else None)
            if dt.autocast:  # the backward of the probabilities' cast to 16 bits
                t.op(f"block {i} probabilities gradient to fp32")
                g32 = t.new(f"block {i} fp32 probabilities gradient", grad, sh.scores * FP32)
                t.free(g)
                g = g32
            t.op(f"block {i} softmax backward")
            # the input's gradient, in the input's dtype (fp32 where softmax upcast its bf16
            # input, else the compute dtype), then grad * output, a temporary of the
            # output's size (_softmax_backward_data; labelled trace, cpp-frames.json.gz)
            in_bytes = FP32 if dt.softmax_upcast else c
            g_soft = t.new(f"block {i} scores gradient", grad, sh.scores * in_bytes)
            t.temp(f"block {i} softmax backward temporary", grad, sh.scores * dt.softmax)
            t.free(g, *s.core)
            if in_bytes != c:  # the backward of softmax's input upcast
                t.op(f"block {i} scores gradient to compute dtype")
                g16 = t.new(f"block {i} 16-bit scores gradient", grad, sh.scores * c)
                t.free(g_soft)
                g_soft = g16
            t.op(f"block {i} masked scores backward")
            g_masked = t.new(f"block {i} masked scores gradient", grad, sh.scores * c)
            # block 0's is the mask's last use (a checkpoint holds it to the end of the
            # checkpointed region's backward: the core's, or the whole block's)
            last_use = i == 0 and not (self.selective or self.full)
            t.free(g_soft, self.mask if last_use else None)
            t.op(f"block {i} scaling backward")
            g_scores = t.new(f"block {i} scaled scores gradient", grad, sh.scores * c)
            t.free(g_masked)
            t.op(f"block {i} Q @ K backward")
            # bmm's backward makes its second operand's gradient first (as for P @ V)
            dk = t.new(f"block {i} k gradient", grad, n * kv_seen * c)
            dq = t.new(f"block {i} q gradient", grad, n * sh.q_width * c)
            # bmm's saved q and k (copies, or repeat_kv's K) die with its node
            t.free(g_scores, *s.copies[:2], s.qkv[1] if self.widened else None)
            if i == 0 and self.selective:
                t.free(self.mask)
        else:
            if self.selective:  # the checkpointed core runs again when flash's node needs it
                t.op(f"block {i} attention recompute")
                self.core_forward(i, s, s.narrow_kv, recompute=True)
            t.op(f"block {i} attention backward")
            dq = t.new(f"block {i} q gradient", grad, n * sh.q_width * c)
            dk = t.new(f"block {i} k gradient", grad, n * kv_seen * c)
            dv = t.new(f"block {i} v gradient", grad, n * kv_seen * c)
            # then the kernel's scratch (labelled traces, cpp-frames.json.gz): the fused
            # kernels (cuDNN / flash, 16-bit) one workspace for the fp32 dq accumulator and
            # the softmax row sums (Dao 2023, FA2); memory-efficient attention (fp32) first
            # grad * out, its row sums and their copy, then the fp32 dq accumulator with
            # b * heads * s / 4 bytes more (measured: frames3/frames4.json.gz)
            rows = sh.batch * sh.heads * sh.seq * FP32
            if c == FP32:
                t.temp(f"block {i} attention backward grad * out", grad, n * sh.q_width * FP32)
                t.temp(f"block {i} attention backward row sums", grad, rows)
                sums = t.new(f"block {i} attention backward row sums copy", grad, rows)
                t.op(f"block {i} attention backward accumulator")
                t.temp(f"block {i} fp32 dq accumulator", grad, n * sh.q_width * FP32 + rows // 16)
                t.free(sums)
            else:
                t.temp(
                    f"block {i} attention backward workspace", grad, n * sh.q_width * FP32 + rows
                )
            t.free(g_o, *s.core, s.attn_out)
        # saved by attention (and, selective, by the checkpoint)
        t.free(*s.qkv, *s.narrow_kv, *s.copies, *s.extra)
        if self.widened:  # repeat_kv's backward sums each group: k, then v
            for name in "kv":
                t.op(f"block {i} repeat_kv {name} backward")
                narrow = t.new(f"block {i} narrow {name} gradient", grad, n * sh.kv_width * c)
                if name == "k":
                    t.free(dk)
                    dk = narrow
                else:
                    t.free(dv)
                    dv = narrow
        if self.rope:
            dk = self.rope_backward(f"block {i} k", dk, n * sh.kv_width * c)
            # the cos and sin tables die with block 0's last rotary backward
            last = self.rope_tables if i == 0 and not self.full else []
            dq = self.rope_backward(f"block {i} q", dq, n * sh.q_width * c, last)
        # the projections read (b, s, heads * hd) memory: a gradient laid out otherwise is
        # copied (reshape's backward): bmm's and cat's outputs are (b, heads, s, hd), and so
        # is repeat_kv's sum; flash returns (b, s, heads, hd), and a bmm gradient of K^T
        # transposed twice is a view (labelled traces, cpp-frames.json.gz)
        copied = {
            "v": self.eager or self.widened,
            "k": self.rope or self.widened,
            "q": self.eager or self.rope,
        }
        grads = {"q": dq, "k": dk, "v": dv}
        for name in "vkq":
            if copied[name]:
                t.op(f"block {i} {name} gradient to tokens first")
                width = sh.q_width if name == "q" else sh.kv_width
                key = t.new(f"block {i} {name} gradient, tokens first", grad, n * width * c)
                t.free(grads[name])
                grads[name] = key
        dq, dk, dv = grads["q"], grads["k"], grads["v"]
        qkv_shapes = self.linear_shapes("qkv")
        if self.fused_qkv:
            t.op(f"block {i} q/k/v split backward")
            d_qkv = t.new(f"block {i} q/k/v gradient", grad, n * (sh.q_width + 2 * sh.kv_width) * c)
            t.free(dq, dk, dv)
            t.op(f"block {i} q/k/v projection backward")
            buffer = self.project_backward(
                f"block {i} q/k/v",
                qkv_shapes,
                n * h * c,
                saved=[*s.qkv_saved[0], s.norm1_out],
                g_out=d_qkv,
                fp32_input=autocast,
            )
        else:
            buffer = None
            per = len(qkv_shapes) // 3
            for j, name, dx in ((2, "v", dv), (1, "k", dk), (0, "q", dq)):
                t.op(f"block {i} {name} projection backward")
                buffer = self.project_backward(
                    f"block {i} {name} projection",
                    qkv_shapes[j * per : (j + 1) * per],
                    n * h * c,
                    # the uncast norm output is saved by all three: q's backward is the last
                    saved=[*s.qkv_saved[j], s.norm1_out if name == "q" else None],
                    g_out=dx,
                    fp32_input=autocast,
                    buffer=buffer,
                )
        t.op(f"block {i} norm 1 backward")
        g_norm = t.new(f"block {i} norm 1 input gradient", grad, n * h * r)
        self.param_grads(f"block {i} norm 1", self.norm_shapes())
        t.free(buffer, s.x_in, *s.norm1, g_norm)  # accumulated in place into g
        if i == 0 and self.full:  # inputs of every checkpointed block, held to the last
            t.free(self.mask, *self.rope_tables)

    def build(self) -> Timeline:
        t, sh, dt, spec = self.tape, self.sh, self.dt, self.spec
        n, h, c, r, v = sh.tokens, sh.hidden, dt.compute, dt.residual, sh.vocab
        layers = spec.layers
        shapes = self.tensors.all_shapes(layers)
        optimizer = Optimizer(self.w.optimizer)

        t.op("build")
        t.persist("weights", "weights", self.params(shapes, dt.weight))
        if self.first:
            t.temp(
                "lm_head copy before tying", "weights", tied_copy_bytes(spec, self.scale, dt.weight)
            )
        t.op("start")
        t.persist("input ids and targets", "activations", [n * INT64, n * INT64])
        if not self.first:
            t.persist(
                "optimizer state",
                "optimizer_state",
                optimizer_state_tensors(optimizer, self.scaled_shapes(shapes), dt.weight),
            )
            # the workspaces the first step made: the forward thread's and the autograd
            # engine's, cuBLASLt's where a biased projection runs (backward: full recompute)
            made = Workspaces(t, self.workspace)
            biased = bool(self.spec.bias or self.spec.qkv_bias)
            made.matmul("forward", biased)
            made.matmul("backward", biased and self.full)
        t.op("embeddings")
        if spec.positions is Positions.learned:  # token and position embeddings, then the sum
            tokens = t.new("token embeddings", "activations", n * h * r)
            positions = t.new("position embeddings", "activations", sh.seq * h * r)
            t.op("embeddings sum")
            x = t.new("embedding output", "activations", n * h * r, part="norm")
            t.free(tokens, positions)
        else:
            x = t.new("embedding output", "activations", n * h * r, part="norm")

        # then the RoPE tables and eager attention's causal mask (a bool s x s matrix,
        # triu of a ones matrix), which every block's masked_fill keeps for backward
        t.op("RoPE tables and mask")
        rope = self.unsaved.rope_tables(sh.seq) if self.rope else []
        self.rope_tables = rope
        if self.eager:
            t.temp("causal mask ones", "activations", sh.seq * sh.seq)
            self.mask = t.new("causal mask", "activations", sh.seq * sh.seq)

        self.block0_input = x
        saved: list[_Saved] = []
        for i in range(layers):
            if self.full:  # the checkpoint keeps the block input only
                saved.append(_Saved(x_in=x))
                x = self.unsaved.block(i, x, sh.seq, 0, keep_input=True)
            else:
                x, s = self.forward_block(i, x)
                saved.append(s)

        t.op("final norm")
        norm_out, norm_stats_keys = self.norm_forward("final norm")
        t.op("lm_head")
        logits, head_saved = self.project(
            "lm_head",
            [self.tensors.lm_head],
            n * h * c,
            n * v * c,
            cast_input=dt.autocast,
            component="logits",
        )
        t.op("cross-entropy")
        upcast = t.new("fp32 logits", "logits", n * v * FP32) if c != FP32 else None
        log_probs = t.new("log_softmax output", "logits", n * v * FP32)
        # the logits and, under autocast, the fp32 norm output die when the model returns
        t.free(upcast, logits, norm_out if dt.autocast else None)
        # autocast caches every weight's 16-bit copy until its context exits, at the end of
        # the forward, even when checkpointing drops what the blocks saved
        t.free(*self.unsaved.kept, *self.bias_copies)

        t.phase = "backward"
        self.thread = "backward"
        t.op("loss backward")
        g_nll = t.new("loss gradient", "logits", n * v * FP32)
        t.op("log_softmax backward")
        g_logits = t.new("log_softmax gradient", "logits", n * v * FP32)
        t.free(g_nll, log_probs)
        if c != FP32:
            t.op("logits cast backward")
            g16 = t.new("16-bit logits gradient", "logits", n * v * c)
            t.free(g_logits)
            g_logits = g16
        # lm_head: a projection like the others (the embedding's gradient when tied)
        t.op("lm_head backward")
        gx = self.project_backward(
            "lm_head",
            [self.tensors.lm_head],
            n * h * c,
            saved=[*head_saved, None if dt.autocast else norm_out],
            g_out=g_logits,
            fp32_input=dt.autocast,
        )
        head_grads = self.weight_grads
        t.op("final norm backward")
        g = t.new("residual stream gradient", "activation_grads", n * h * r)
        self.param_grads("final norm", self.norm_shapes())
        t.free(gx, *norm_stats_keys, x)

        for i in reversed(range(layers)):
            s = saved[i]
            if self.full:  # the checkpointed block runs again, keeping what it saves
                t.op(f"block {i} recompute")
                _, s = self.forward_block(i, s.x_in, recompute=True)
                t.free(*self.bias_copies)  # the rerun's autocast context exits
            self.backward_block(i, g, s)
        t.op("embeddings backward")
        if spec.positions is Positions.learned:
            # positions first (the later node): the gradient summed over the batch, then
            # the embedding's dense gradient (labelled trace: cpp-frames.json.gz)
            summed = t.new(
                "position gradient summed over the batch", "activation_grads", sh.seq * h * r
            )
            self.param_grads("positions", list(self.tensors.embeddings[1:]))
            self.embedding_partial_sums("positions", sh.seq)
            t.free(summed)
            t.op("token embeddings backward")
        embed = [self.tensors.embeddings[0]]
        size = sum(self.params(embed, dt.weight))
        dense = t.new(
            "embedding gradient", "gradients" if not spec.tied else "activation_grads", size
        )
        self.embedding_partial_sums("embedding", n)
        t.free(g)
        if spec.tied:
            # the shared weight's two gradients meet in its node's input buffer. Under
            # autocast lm_head's (the fp32 cast) takes the embedding's in place; else it is
            # a transposed view of a matmul's output, and the sum is a new tensor (measured:
            # the fp32 Llama 3.2 3B trace, benchmarks/data/h200-traces/frames4.json.gz)
            if not dt.autocast:
                t.op("tied weight gradients summed")
                t.new("embedding + lm_head gradient", "gradients", size)
                t.free(*head_grads)
            t.free(dense)

        t.phase = "optimizer"
        t.op("optimizer step")
        if self.first:  # created lazily by the first step (torch.optim ``_init_group``)
            t.persist(
                "optimizer state",
                "optimizer_state",
                optimizer_state_tensors(optimizer, self.scaled_shapes(shapes), dt.weight),
            )
        temporaries = optimizer_step_temporaries(optimizer, self.params(shapes, 1), dt.weight)
        if optimizer is Optimizer.adafactor:
            # one parameter at a time: each temporary is freed before the next is made
            for j, size in enumerate(temporaries):
                if j:
                    t.op("optimizer step")
                t.temp("optimizer step temporary", "optimizer_temp", size)
        else:
            for size in temporaries:
                t.temp("optimizer step temporary", "optimizer_temp", size)
        return t.finish()

    def scaled_shapes(self, shapes: list[ParamShape]) -> list[ParamShape]:
        """Shapes scaled by a declared --params (first dimension), for optimizer state."""
        if self.scale == 1:
            return shapes
        return [(max(1, round(s[0] * self.scale)), *s[1:]) for s in shapes]

    def block_activation_bytes(self) -> dict[str, int]:
        """Bytes block 0 keeps from its forward to its backward, by part: what its forward
        made and backward still needs (its output counts, as the next block's input). Under
        full checkpointing a block keeps only its input."""
        if self.full:
            return {"norm": sum(self.tape.records[self.block0_input].sizes)}
        forward_end = max(
            i for i, (phase, _) in enumerate(self.tape.timeline.points) if phase == "forward"
        )
        parts: dict[str, int] = {}
        for record in self.tape.records:
            if (
                record.part
                and record.name.startswith("block 0 ")
                and record.start <= forward_end
                and (record.end is None or record.end > forward_end)
            ):
                parts[record.part] = parts.get(record.part, 0) + sum(record.sizes)
        return parts


def build_training_steps(
    spec: ModelSpec, workload: Workload, workspace_bytes: int, mp: Multiprocessors = H200
) -> tuple[Timeline, Timeline, dict[str, int]]:
    """The first training step, a steady-state step (see the module docstring), and what one
    block keeps between its forward and its backward, by part (norm, attention, MLP; a full
    checkpoint keeps only the block input). ``mp``: the GPU's multiprocessors, which size
    the reductions' scratch."""
    first = _Step(spec, workload, workspace_bytes, True, mp).build()
    step = _Step(spec, workload, workspace_bytes, False, mp)
    steady = step.build()
    return first, steady, step.block_activation_bytes()
