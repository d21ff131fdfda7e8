"""The memory timeline of inference: prefill of the prompt, then token-by-token decode.

Under ``torch.inference_mode`` nothing is saved for backward, so the peak is the
weights, the KV cache and the largest working set of one block, plus what the caching
allocator holds of the blocks' intermediates. The KV cache holds
``2 * layers * batch * kv_heads * head_dim * tokens`` elements (keys and values; GQA
shares each K/V head among ``heads / kv_heads`` query heads: Ainslie et al. 2023).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vramfit.config import Arch, Attention, Mlp, ModelSpec, Positions, Workload
from vramfit.estimate.activations import FP32, INT64, attention_stats, norm_stats, shape_of
from vramfit.estimate.dtypes import Dtypes, dtypes_for, kv_bytes
from vramfit.estimate.overhead import CUBLASLT_WORKSPACE_BYTES
from vramfit.estimate.params import (
    ParamShape,
    count_params,
    param_tensors,
    projection_shapes,
    tied_copy_bytes,
)
from vramfit.estimate.timeline import Tape, Timeline


def kv_cache_bytes(spec: ModelSpec, workload: Workload) -> int:
    """Static KV cache for the prompt plus the generated tokens."""
    spec = spec.resolved()
    sh = shape_of(spec, workload)
    tokens = workload.seq + workload.gen_tokens
    if spec.sliding_window:
        # a sliding-window layer only ever attends to (and keeps) the last `window` tokens
        local = (
            spec.layers // spec.sliding_window_every
            if spec.sliding_window_every > 1
            else spec.layers
        )
        windowed = min(tokens, spec.sliding_window)
        per_token_layers = (spec.layers - local) * tokens + local * windowed
    else:
        per_token_layers = spec.layers * tokens
    return 2 * per_token_layers * sh.batch * sh.kv_width * kv_bytes(workload)


def build_inference_timeline(spec: ModelSpec, workload: Workload, workspace_bytes: int) -> Timeline:
    """Allocations of a prefill (and, with ``gen_tokens``, the last decode step), op by op.

    Under ``torch.inference_mode`` every tensor dies at its last use, so each block's
    intermediates come and go; the caching allocator keeps their segments, which is why the
    device holds more than the largest working set. The ops, their order and what each one
    allocates follow allocator traces of the reference model recorded with source lines
    (benchmarks/data/h200-traces/frames.json.gz, ``benchmarks/trace.py --frames``).
    """
    spec = spec.resolved()
    counts = count_params(spec)
    scale = (spec.params or counts.total) / counts.total
    dt = dtypes_for(workload.precision)
    tensors = param_tensors(spec)
    t = Tape(phase="prefill")

    t.op("build")
    t.persist(
        "weights", "weights", [round(e * scale * dt.weight) for e in tensors.all(spec.layers)]
    )
    t.temp("lm_head copy before tying", "weights", tied_copy_bytes(spec, scale, dt.weight))
    t.op("start")
    t.persist("input ids", "activations", [workload.batch * workload.seq * INT64])
    if workload.gen_tokens:
        per_tensor = kv_cache_bytes(spec, workload) // (2 * spec.layers)
        t.persist("KV cache", "kv_cache", [per_tensor] * (2 * spec.layers))

    pass_ = ForwardPass(t, spec, workload, scale, Workspaces(t, workspace_bytes))
    logits = pass_.forward(seq=workload.seq, cached=0)
    if workload.gen_tokens:
        # the last generated token attends to the longest cache: the largest decode step
        t.phase = "decode"
        t.op("next token")
        t.free(logits)
        logits = pass_.forward(seq=1, cached=workload.seq + workload.gen_tokens - 1)
    t.op("end")
    t.free(logits)
    return t.finish()


_ACT = "activations"
_CAST = "autocast_weight_copies"


class Workspaces:
    """The matmul libraries' workspaces, which the first matmul on each thread takes from the
    caching allocator after its output (labelled traces, benchmarks/data/h200-traces):
    cuBLAS's, and cuBLASLt's own 1 MiB at the first projection with a bias (addmm's fused
    epilogue). A step that starts with them already made (``active=False``) makes none."""

    def __init__(self, t: Tape, cublas_bytes: int, active: bool = True) -> None:
        self.t, self.cublas_bytes, self.active = t, cublas_bytes, active
        self.made: set[str] = set()

    def matmul(self, thread: str, biased: bool) -> None:
        """A matmul on ``thread`` ("" for the only one), of a projection with a bias or not."""
        if not self.active:
            return
        suffix = f" ({thread})" if thread else ""
        for name, size, needed in (
            (f"cuBLAS workspace{suffix}", self.cublas_bytes, True),
            (f"cuBLASLt workspace{suffix}", CUBLASLT_WORKSPACE_BYTES, biased),
        ):
            if needed and name not in self.made:
                self.t.persist(name, "cublas_workspace", [size])
                self.made.add(name)


def projection_forward(
    t: Tape,
    dt: Dtypes,
    name: str,
    shapes: list[ParamShape],
    scale: float,
    in_bytes: int,
    out_bytes: int,
    cast_input: bool,
    *,
    part: str = "",
    component: str = _ACT,
    output: bool = True,
) -> tuple[list[int | None], list[int | None], int | None, int | None]:
    """nn.Linear's forward: under autocast, 16-bit copies of its bias and weight, then of an
    fp32 input (``cast_input``, ``in_bytes`` once copied), made right to left as the C++
    wrapper evaluates its arguments, then the output (labelled trace of an AMP run:
    benchmarks/data/h200-traces/frames.json.gz). Returns the bias copies, the weight
    copies, the input copy and the output; what outlives the op is the caller's choice."""
    biases: list[int | None] = []
    weights: list[int | None] = []
    copy = None
    if dt.autocast:
        for shape in reversed(shapes):
            vector = len(shape) == 1
            key = t.new(
                f"{name} 16-bit {'bias' if vector else 'weight'}",
                _CAST,
                round(math.prod(shape) * scale * dt.compute),
            )
            (biases if vector else weights).append(key)
        if cast_input:
            copy = t.new(f"{name} 16-bit input", _ACT, in_bytes, part=part)
    out = t.new(name, component, out_bytes, part=part) if output else None
    return biases, weights, copy, out


class ForwardPass:
    """One forward pass of the reference model that saves nothing for backward, op by op.

    Under ``inference_mode`` (``training=False``) every tensor dies at its last use and
    autocast keeps no cast cache. The same program is the forward of a block under
    non-reentrant activation checkpointing (``training=True``): grad mode is on, so the
    kernels compute what backward would need (flash attention's logsumexp) and autocast
    caches its 16-bit weight copies until the forward ends (they are listed in ``kept``),
    but the checkpoint's hooks drop every saved tensor, so intermediates die as in
    inference (the labelled trace of a full-checkpoint run in
    benchmarks/data/h200-traces/frames2.json.gz shows the same order).
    """

    def __init__(
        self,
        t: Tape,
        spec: ModelSpec,
        workload: Workload,
        scale: float,
        workspaces: Workspaces,
        *,
        training: bool = False,
        thread: str = "",
    ) -> None:
        self.t, self.spec, self.w, self.scale = t, spec, workload, scale
        self.workspaces, self.thread = workspaces, thread
        self.training = training
        self.kept: list[int | None] = []  # autocast's cached weight copies (training)
        self.dt = dtypes_for(workload.precision)
        self.sh = shape_of(spec, workload)
        self.kv_elem = kv_bytes(workload)

    def linear(
        self,
        name: str,
        shapes: list[ParamShape],
        n_in: int,
        out: int,
        fp32_input: bool,
        component: str = _ACT,
    ) -> int | None:
        """A projection: under autocast, 16-bit copies of its bias, weight and (fp32) input,
        made right to left as the C++ wrapper evaluates its arguments, then the output; the
        copies die when it returns (inference_mode keeps no cast cache; with grad mode on,
        autocast caches the parameters' copies: ``kept``)."""
        t, dt = self.t, self.dt
        t.op(name)
        biases, weights, copy, key = projection_forward(
            t, dt, name, shapes, self.scale, n_in * dt.compute, out, fp32_input, component=component
        )
        self.workspaces.matmul(self.thread, biased=any(len(shape) == 1 for shape in shapes))
        if self.training:
            self.kept += biases + weights
            t.free(copy)
        else:
            t.free(*biases, *weights, copy)
        return key

    def norm(self, name: str, tokens: int) -> int | None:
        """LayerNorm / RMSNorm: the output (the residual's dtype) and per-row fp32 statistics
        that die with the op."""
        t = self.t
        t.op(name)
        out = t.new(name, _ACT, tokens * self.sh.hidden * self.dt.residual)
        for size in norm_stats(tokens, self.spec.norm):
            t.temp(f"{name} statistics", _ACT, size)
        return out

    def rope_tables(self, seq: int) -> list[int | None]:
        """The cos and sin tables of ``seq`` positions, as the reference model's ``_rope``
        computes them (HF LlamaRotaryEmbedding): the positions, their outer product with the
        inverse frequencies, that doubled, then cos and sin in fp32, each cast to the compute
        dtype (labelled trace, cpp-frames.json.gz). Returns [cos, sin]."""
        t, c = self.t, self.dt.compute
        hd = self.spec.head_dim or 0
        t.op("RoPE angles")
        temps = [
            t.new("RoPE positions", _ACT, seq * FP32),
            t.new("RoPE frequencies", _ACT, seq * hd // 2 * FP32),
            t.new("RoPE angles", _ACT, seq * hd * FP32),
        ]
        tables = []
        for name in ("cos", "sin"):
            t.op(f"RoPE {name}")
            table = t.new(f"RoPE {name}", _ACT, seq * hd * FP32)
            if c != FP32:
                t.free(table)
                table = t.new(f"RoPE {name} in the compute dtype", _ACT, seq * hd * c)
            tables.append(table)
        t.free(*temps)
        return tables

    def rope(self, name: str, x: int | None, size: int, part: str = "") -> int | None:
        """HF ``apply_rotary_pos_emb`` on a (b, heads, s, hd) tensor of ``size`` bytes:
        x * cos + rotate_half(x) * sin, rotate_half = cat(-x2, x1)."""
        t = self.t
        t.op(f"{name} * cos")
        x_cos = t.new(f"{name} * cos", _ACT, size)
        t.op(f"{name} rotate_half")
        neg = t.new(f"{name} -x2", _ACT, size // 2)
        half = t.new(f"{name} rotate_half", _ACT, size)
        t.free(neg)
        t.op(f"{name} rotate_half * sin")
        rot_sin = t.new(f"{name} rotate_half * sin", _ACT, size)
        t.free(half)
        t.op(f"{name} rotated")
        out = t.new(f"{name} rotated", _ACT, size, part=part)
        t.free(x_cos, rot_sin, x)
        return out

    def forward(self, seq: int, cached: int) -> int | None:
        """The whole model on ``seq`` new tokens after ``cached`` cached ones; returns the
        last position's logits."""
        t, spec, dt, sh, w = self.t, self.spec, self.dt, self.sh, self.w
        b, h, c, r = w.batch, sh.hidden, dt.compute, dt.residual
        n = b * seq
        rope = spec.positions is Positions.rope

        t.op("embeddings")
        if spec.positions is Positions.learned:
            tokens = t.new("token embeddings", _ACT, n * h * r)
            t.op("position embeddings")
            positions = t.new("position embeddings", _ACT, seq * h * r)
            t.op("embeddings sum")
            x = t.new("embedding output", _ACT, n * h * r)
            t.free(tokens, positions)
        else:
            x = t.new("embedding output", _ACT, n * h * r)
        tables = self.rope_tables(seq) if rope else []
        if w.attention is Attention.eager and not cached:  # the prompt's causal mask (bool)
            t.temp("causal mask ones", _ACT, seq * seq)
            tables.append(t.new("causal mask", _ACT, seq * seq))
        for i in range(spec.layers):
            x = self.block(i, x, seq, cached)
        normed = self.norm("final norm", n)
        t.free(x, *tables)
        # the last position only, as HF ``generate`` computes it
        logits = self.linear(
            "lm_head", [(sh.vocab, h)], b * h, b * sh.vocab * c, True, component="logits"
        )
        t.free(normed)
        return logits

    def block(
        self, i: int, x: int | None, seq: int, cached: int, keep_input: bool = False
    ) -> int | None:
        """Block ``i`` on ``seq`` new tokens after ``cached`` cached ones; returns its output.
        ``keep_input``: the block input outlives it (a checkpoint keeps it for backward)."""
        t, spec, dt, sh, w = self.t, self.spec, self.dt, self.sh, self.w
        b, h, c, r = w.batch, sh.hidden, dt.compute, dt.residual
        n = b * seq
        keys = cached + seq  # positions attention sees
        q_size, kv_size = n * sh.q_width * c, n * sh.kv_width * c
        fused = spec.arch is Arch.gpt2
        widened = sh.kv_heads < sh.heads
        rope = spec.positions is Positions.rope
        qkv_shapes = projection_shapes(spec, "qkv")
        per = len(qkv_shapes) // (1 if fused else 3)
        # MoE: the routed experts' casts are not modelled one by one (without grad mode each
        # lives only in its op); with it, autocast keeps them all until the forward ends
        up_shapes = projection_shapes(spec, "up") if spec.experts <= 1 else []
        half = len(up_shapes) // 2
        down_shapes = projection_shapes(spec, "down") if spec.experts <= 1 else []
        normed = self.norm(f"block {i} norm 1", n)
        if fused:
            qkv = self.linear(
                f"block {i} q/k/v",
                qkv_shapes,
                n * h,
                n * (sh.q_width + 2 * sh.kv_width) * c,
                True,
            )
            q = k = v = None  # views of qkv
            views = [qkv]
            if rope:  # Pythia: RoPE on the q and k views makes new tensors
                q = self.rope(f"block {i} q", None, q_size)
                k = self.rope(f"block {i} k", None, kv_size)
        else:
            q = self.linear(f"block {i} q", qkv_shapes[:per], n * h, q_size, True)
            k = self.linear(f"block {i} k", qkv_shapes[per : 2 * per], n * h, kv_size, True)
            v = self.linear(f"block {i} v", qkv_shapes[2 * per :], n * h, kv_size, True)
            if rope:
                q = self.rope(f"block {i} q", q, q_size)
                k = self.rope(f"block {i} k", k, kv_size)
            views = [q, k, v]
        # the new K/V are copied into the static cache; decode reads the cache back,
        # converted to the compute dtype when it is stored in another
        k_seen = v_seen = None
        seen = b * keys * sh.kv_width * c
        if cached and self.kv_elem != c:
            t.op(f"block {i} cached K/V to compute dtype")
            k_seen = t.new(f"block {i} cached k", _ACT, seen)
            v_seen = t.new(f"block {i} cached v", _ACT, seen)
            t.free(k, v)  # rebound to the converted cache
            views = [q, qkv] if fused else [q]
            views += [k_seen, v_seen]
        wide: list[int | None] = []
        if widened:  # repeat_kv: (b, kv_heads, t, hd) -> (b, heads, t, hd) copies
            t.op(f"block {i} repeat_kv")
            wide = [
                t.new(f"block {i} widened {x_}", _ACT, b * keys * sh.q_width * c) for x_ in "kv"
            ]
        # one decode token's q and the cache's K/V slices fold into bmm batches as views;
        # the prompt's (b, s, heads, hd) q/k/v do not (repeat_kv's output does)
        out = self.core(i, seq, keys, kv_copied=seq > 1 and not widened, wide=wide)
        o = self.linear(
            f"block {i} o", projection_shapes(spec, "o"), n * sh.q_width, n * h * c, False
        )
        t.free(out, *views, q, k, v, normed)
        t.op(f"block {i} residual 1")
        x_mid = t.new(f"block {i} residual 1", _ACT, n * h * r)
        t.free(o)

        normed = self.norm(f"block {i} norm 2", n)
        f = n * sh.active_ffn * c
        if spec.experts > 1 and self.training and dt.autocast:
            t.op(f"block {i} experts' 16-bit weights")
            for shape in projection_shapes(spec, "up") + projection_shapes(spec, "down"):
                copy = round(math.prod(shape) * self.scale * dt.compute)
                self.kept.append(t.new(f"block {i} expert 16-bit weights", _CAST, copy))
        if spec.mlp is Mlp.swiglu:
            gate = self.linear(f"block {i} MLP gate", up_shapes[:half], n * h, f, True)
            t.op(f"block {i} SiLU")
            act = t.new(f"block {i} SiLU", _ACT, f)
            t.free(gate)
            up = self.linear(f"block {i} MLP up", up_shapes[half:], n * h, f, True)
            t.op(f"block {i} gate * up")
            hidden = t.new(f"block {i} gate * up", _ACT, f)
            t.free(act, up)
        else:
            fc = self.linear(f"block {i} MLP fc", up_shapes, n * h, f, True)
            t.op(f"block {i} GELU")
            hidden = t.new(f"block {i} GELU", _ACT, f)
            t.free(fc)
        down = self.linear(f"block {i} MLP down", down_shapes, f // c, n * h * c, False)
        t.free(hidden, normed)
        t.op(f"block {i} residual 2")
        x_out = t.new(f"block {i} output", _ACT, n * h * r)
        t.free(down, x_mid, None if keep_input else x)
        return x_out

    def core(
        self, i: int, seq: int, keys: int, kv_copied: bool, wide: Sequence[int | None] = ()
    ) -> int | None:
        """softmax(q k^T * scale) v; returns the output as o_proj reads it. ``wide``:
        repeat_kv's K/V, made inside the core, die with its other locals."""
        t, dt, sh, w = self.t, self.dt, self.sh, self.w
        b, c = w.batch, dt.compute
        n = b * seq
        if w.attention is not Attention.eager:
            # SDPA's fused kernels read the strided q/k/v and return (b, s, heads, hd)
            # memory, which o_proj reads as is; with grad mode on they also return the
            # logsumexp that backward would need, which the checkpoint drops
            t.op(f"block {i} attention")
            lse = None
            if self.training:
                lse = t.new(f"block {i} logsumexp", _ACT, attention_stats(sh, w)[0])
            out = t.new(f"block {i} attention output", _ACT, n * sh.q_width * c)
            t.free(lse, *wide)
            return out
        scores = b * sh.heads * seq * keys
        # matmul folds (b, heads) into one batch dimension: the projections' (b, s, heads, hd)
        # memory is copied to (b, heads, s, hd) first (repeat_kv's output is already)
        t.op(f"block {i} q @ k^T")
        copies = []
        if seq > 1:
            copies.append(t.new(f"block {i} contiguous q", _ACT, n * sh.q_width * c))
        if kv_copied:
            copies.append(t.new(f"block {i} contiguous k", _ACT, b * keys * sh.kv_width * c))
        product = t.new(f"block {i} q @ k^T", _ACT, scores * c)
        t.free(*copies)
        t.op(f"block {i} scaled scores")
        scaled = t.new(f"block {i} scaled scores", _ACT, scores * c)
        t.free(product)
        if seq > 1:  # causal mask; a decode token attends to every cached position
            t.op(f"block {i} masked scores")
            masked = t.new(f"block {i} masked scores", _ACT, scores * c)
            t.free(scaled)
            scaled = masked
        t.op(f"block {i} softmax")
        # softmax is fp32 under autocast, bf16 input copied to fp32 first (Dtypes)
        upcast = t.new(f"block {i} fp32 scores", _ACT, scores * FP32) if dt.softmax_upcast else None
        probs = t.new(f"block {i} softmax", _ACT, scores * dt.softmax)
        t.free(upcast)
        if dt.softmax != c:
            t.op(f"block {i} probabilities to compute dtype")
            probs16 = t.new(f"block {i} 16-bit probabilities", _ACT, scores * c)
            t.free(probs)
            probs = probs16
        t.op(f"block {i} probs @ v")
        v_copy = (
            t.new(f"block {i} contiguous v", _ACT, b * keys * sh.kv_width * c)
            if kv_copied
            else None
        )
        pv = t.new(f"block {i} probs @ v", _ACT, n * sh.q_width * c)
        t.free(v_copy)
        t.op(f"block {i} attention returns")
        t.free(probs, scaled, *wide)  # the core's locals
        if seq == 1:
            return pv
        # (b, heads, s, hd) -> (b, s, heads * hd) for o_proj: a copy
        t.op(f"block {i} attention output")
        out = t.new(f"block {i} attention output", _ACT, n * sh.q_width * c)
        t.free(pv)
        return out
