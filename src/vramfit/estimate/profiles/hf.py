"""Hugging Face transformers (5.x) causal LMs as graphs of ops.

Each function below follows the modeling file of its ``model_type`` in transformers 5.17
(``transformers/models/<type>/modeling_<type>.py``) line by line at the level of ATen ops, as
the CUDA op traces of the real models show them (benchmarks/data/h200-hf-ops, recorded with
``benchmarks/hf_ops.py`` on an H200): what a CPU or textbook model misses is there, e.g.

- Llama's ``RMSNorm`` is Python (pow, mean, rsqrt, two multiplies): it saves the normalised
  input besides its output; ``LlamaRotaryEmbedding`` returns cos/sin in the hidden states'
  dtype, fp32 under autocast, so the rotated q and k are fp32 and SDPA casts them back;
- GPT-2's ``gelu_new`` is eight elementwise ops, four of whose outputs autograd saves, fp32 from
  ``pow`` on under autocast; its config has dropout 0.1 on the embeddings, the attention
  probabilities and both residual branches (bool masks, saved);
- outside the Trainer ``use_cache`` defaults to True even in training: a ``DynamicCache``
  ``cat``-copies every layer's K and V (in fp32 under autocast, as the cache's empty start
  tensor promotes them), and SDPA reads the copies;
- the loss (``loss/loss_utils.py::ForCausalLMLoss``) upcasts the logits to fp32 first;
- SDPA on an H200 with torch 2.11 runs cuDNN attention for 16-bit inputs without a mask,
  memory-efficient attention for fp32, and its math fallback (s x s scores) for fp32 with
  grouped K/V (``enable_gqa`` rules out the efficient kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vramfit.config import (
    Arch,
    Attention,
    Checkpointing,
    Loop,
    Lora,
    Mlp,
    ModelSpec,
    ModelType,
    PeftModelType,
    Positions,
    Workload,
)
from vramfit.estimate.dtypes import AUTOCAST_DTYPE, WEIGHT_DTYPE
from vramfit.estimate.graph import Backward, Component, DType, Graph, Tensor
from vramfit.estimate.ops import Ops


@dataclass(frozen=True)
class Block:
    """A fully resolved description of one HF model: every choice the ops depend on."""

    model_type: ModelType
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    learned_positions: int  # GPT-2's position table rows (0: rotary)
    qkv_bias: bool
    bias: bool  # every linear and norm has a bias (GPT-2)
    layernorm: bool  # LayerNorm (GPT-2) or RMSNorm
    mlp: str  # "gelu_new" (GPT-2), "swiglu" (Llama), "geglu" (Gemma)
    fused_qkv: bool  # one projection makes q, k, v (GPT-2 c_attn, Phi-3 qkv_proj)
    fused_gate_up: bool  # Phi-3 gate_up_proj
    conv1d: bool  # GPT-2's Conv1D (addmm, weight stored in x out)
    norms_per_layer: int
    gemma_norm: bool  # Gemma's RMSNorm: x * (1 + weight), computed in fp32
    embed_scale: bool  # Gemma multiplies the embeddings by sqrt(hidden)
    final_softcap: bool  # Gemma-2 caps the logits: tanh(logits / c) * c
    resid_dropout: float
    embd_dropout: float
    attention_dropout: float

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def resolve(spec: ModelSpec) -> Block:
    """The block description of ``spec`` (resolved first)."""
    spec = spec.resolved()
    mt = ModelType(spec.model_type)
    assert spec.heads and spec.kv_heads and spec.head_dim and spec.ffn and spec.vocab
    gemma = mt in (ModelType.gemma, ModelType.gemma2)
    mlp = "gelu_new" if spec.mlp is Mlp.gelu else ("geglu" if gemma else "swiglu")
    return Block(
        model_type=mt,
        layers=spec.layers,
        hidden=spec.hidden,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        ffn=spec.ffn,
        vocab=spec.vocab,
        tied=bool(spec.tied),
        learned_positions=(spec.max_positions or 0) if spec.positions is Positions.learned else 0,
        qkv_bias=bool(spec.bias or spec.qkv_bias),
        bias=bool(spec.bias),
        layernorm=spec.arch is Arch.gpt2,
        mlp=mlp,
        fused_qkv=spec.arch is Arch.gpt2 or mt is ModelType.phi3,
        fused_gate_up=mt is ModelType.phi3,
        conv1d=mt is ModelType.gpt2,
        norms_per_layer=spec.norms_per_layer,
        gemma_norm=gemma,
        embed_scale=gemma,
        final_softcap=mt is ModelType.gemma2,
        resid_dropout=spec.resid_dropout or 0.0,
        embd_dropout=spec.embd_dropout or 0.0,
        attention_dropout=spec.attention_dropout or 0.0,
    )


def hf_unsupported(spec: ModelSpec, workload: Workload | None = None) -> str | None:
    """Why the hf profile cannot describe ``spec`` (under ``workload``), or None when it can."""
    if workload is not None and workload.kv_dtype is not None:
        # transformers 5.17's caches keep K/V in the key states' dtype (DynamicCache, static);
        # its only quantized one, cache_implementation="quantized" (cache_utils.py
        # QuantizedCache), stores 2- or 4-bit K/V through optimum-quanto or HQQ with the last
        # residual_length=128 tokens unquantized: there is no 8-bit or other-dtype cache
        return (
            "transformers has no --kv-dtype cache (its cache_implementation='quantized' is "
            "2- or 4-bit through optimum-quanto or HQQ)"
        )
    spec = spec.resolved()
    mt = ModelType(spec.model_type)
    if spec.experts > 1:
        return "the hf profile does not describe mixture-of-experts models yet"
    if mt in (ModelType.gpt_neox, ModelType.falcon, ModelType.mixtral, ModelType.qwen2_moe):
        return f"the hf profile does not describe {mt.value} yet"
    if spec.arch is Arch.gpt2 and mt is not ModelType.gpt2:
        return f"the hf profile does not describe {mt.value} with a GPT-2 block"
    if mt is ModelType.gpt2 and spec.kv_heads != spec.heads:
        return "GPT-2 has no grouped K/V heads in transformers"
    if spec.positions is Positions.rope and mt is ModelType.gpt2:
        return "the hf profile does not describe GPT-2 with rotary positions"
    return None


def param_shapes(b: Block) -> list[tuple[str, int]]:
    """Every parameter as ``model.parameters()`` yields it: (name, elements)."""
    return [(name, math.prod(shape)) for name, shape in param_dims(b)]


def param_rows(b: Block) -> list[tuple[str, int, int]]:
    """(name, size of dim 0, elements) of every parameter: dim 0 is what FSDP2 shards (an
    ``nn.Linear`` weight is (out, in), GPT-2's ``Conv1D`` weight (in, out), an embedding
    (vocab, hidden))."""
    return [(name, shape[0], math.prod(shape)) for name, shape in param_dims(b)]


def param_dims(b: Block) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter as ``model.parameters()`` yields it: (name, shape). Linear weights are
    (out, in); GPT-2's Conv1D stores (in, out)."""
    h, q, kv, f = b.hidden, b.q_width, b.kv_width, b.ffn
    out: list[tuple[str, tuple[int, ...]]] = []

    def linear(name: str, n_in: int, n_out: int, bias: bool) -> None:
        out.append((f"{name}.weight", (n_in, n_out) if b.conv1d else (n_out, n_in)))
        if bias:
            out.append((f"{name}.bias", (n_out,)))

    def norm(name: str) -> None:
        out.append((f"{name}.weight", (h,)))
        if b.layernorm:
            out.append((f"{name}.bias", (h,)))

    if b.model_type is ModelType.gpt2:
        out.append(("transformer.wte.weight", (b.vocab, h)))
        out.append(("transformer.wpe.weight", (b.learned_positions, h)))
        for i in range(b.layers):
            p = f"transformer.h.{i}"
            norm(f"{p}.ln_1")
            linear(f"{p}.attn.c_attn", h, q + 2 * kv, b.qkv_bias)
            linear(f"{p}.attn.c_proj", q, h, b.bias)
            norm(f"{p}.ln_2")
            linear(f"{p}.mlp.c_fc", h, f, b.bias)
            linear(f"{p}.mlp.c_proj", f, h, b.bias)
        norm("transformer.ln_f")
    else:
        out.append(("model.embed_tokens.weight", (b.vocab, h)))
        for i in range(b.layers):
            p = f"model.layers.{i}"
            if b.fused_qkv:  # Phi3Attention registers o_proj before qkv_proj
                linear(f"{p}.self_attn.o_proj", q, h, b.bias)
                linear(f"{p}.self_attn.qkv_proj", h, q + 2 * kv, b.qkv_bias)
            else:
                for name, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                    linear(f"{p}.self_attn.{name}", h, width, b.qkv_bias)
                linear(f"{p}.self_attn.o_proj", q, h, b.bias)
            if b.fused_gate_up:
                linear(f"{p}.mlp.gate_up_proj", h, 2 * f, b.bias)
            else:
                linear(f"{p}.mlp.gate_proj", h, f, b.bias)
                linear(f"{p}.mlp.up_proj", h, f, b.bias)
            linear(f"{p}.mlp.down_proj", f, h, b.bias)
            names = ["input_layernorm", "post_attention_layernorm"]
            if b.norms_per_layer == 4:
                names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
            for name in names:
                norm(f"{p}.{name}")
        norm("model.norm")
    if not b.tied:
        out.append(("lm_head.weight", (b.vocab, h)))
    return out


# The projections tensor parallel splits by output column (ColwiseParallel); o_proj and
# down_proj are rowwise (vramfit.estimate.parallel).
_COLWISE = (".q_proj", ".k_proj", ".v_proj", ".gate_proj", ".up_proj")

PEFT_TYPE = {
    mt: PeftModelType(mt.value) for mt in ModelType if mt.value in PeftModelType._value2member_map_
}


def _block_path(name: str) -> str:
    """``self_attn.q_proj.weight`` of ``model.layers.3.self_attn.q_proj.weight``; "" outside
    the blocks."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h") and parts[i + 1].isdigit():
            return ".".join(parts[i + 2 :])
    return ""


def attention_kernel(b: Block, w: Workload, compute: DType) -> str:
    """Which SDPA kernel runs (H200, torch 2.11; the h200-hf-ops traces): cuDNN for 16-bit
    inputs, memory-efficient attention for fp32, the math fallback for fp32 with grouped K/V
    (``enable_gqa``, which the efficient kernel does not take); eager is HF's own code."""
    if w.attention is Attention.eager:
        return "eager"
    if compute is DType.fp32:
        return "math" if b.kv_heads < b.heads else "efficient"
    return "cudnn"


class Model:
    """Builds the graph of one forward of ``b`` (training: with the loss)."""

    def __init__(
        self,
        b: Block,
        w: Workload,
        g: Graph,
        *,
        batch: int,
        seq: int,
        cached: int = 0,
        use_cache: bool,
        all_logits: bool,
        batched_positions: bool = False,
        layer_cached: list[int] | None = None,
        spec: ModelSpec | None = None,
    ) -> None:
        self.b, self.w, self.g = b, w, g
        self.spec = spec
        self.batch, self.seq, self.cached = batch, seq, cached
        # tokens each layer's cache holds before this forward (a sliding layer stops growing)
        self.layer_cached = layer_cached or [cached] * b.layers
        self.windows = cache_windows(spec) if spec is not None else [None] * b.layers
        self.use_cache = use_cache
        self.all_logits = all_logits
        # generate() passes position_ids built from the attention mask, (batch, seq); a
        # plain forward leaves them None and the model uses cache_position.unsqueeze(0)
        self.positions = batch * seq if batched_positions else seq
        # generate() also passes an attention_mask (all ones here), which the masks and in
        self.attention_mask = batched_positions
        self.weight = WEIGHT_DTYPE[w.precision]
        self.ops = Ops(g, AUTOCAST_DTYPE.get(w.precision))
        self.training = g.grad
        self.checkpoint = g.grad and w.checkpointing is Checkpointing.full
        self.params: dict[str, Tensor] = {}
        self.param_list: list[Tensor] = []  # model.parameters() order, with quantized state
        self.lora = w.lora
        self.quant = w.quant
        self.lora_targets: set[str] = set()
        self.quantized: dict[str, tuple[int, int]] = {}  # module path -> (out, in)
        self.int8_outliers: dict[str, int] = {}  # block path -> outlier input columns
        if w.lora is not None or w.quant is not None:
            assert spec is not None
            self._finetune_params(spec)
        else:
            for name, numel in param_shapes(b):
                self.params[name] = g.leaf(name, numel, self.weight, requires_grad=True)
                self.param_list.append(self.params[name])
        if g.grad and w.quant is not None and w.checkpointing is Checkpointing.full:
            # prepare_model_for_kbit_training enables checkpointing with {} kwargs: reentrant
            # (peft/utils/other.py); the Trainer re-enables it non-reentrant
            g.reentrant = w.loop is not Loop.trainer
        # a non-reentrant recompute (transformers' default, use_reentrant=False) stops by
        # raising once the region's last saved tensor is packed: the decoder layer's frame,
        # with every local it still names (the MLP's input), lives to the stop (the hf2
        # Llama trace's recompute of its last layer)
        g.rerun_frame = True
        if b.tied:
            key = (
                "transformer.wte.weight"
                if b.model_type is ModelType.gpt2
                else ("model.embed_tokens.weight")
            )
            self.params["lm_head.weight"] = self.params[key]
        self.head = True  # the final norm, lm_head and loss run here (not a first PP stage)
        self.sp = 1  # sequence-parallel degree (tensor parallel with --sp)
        self.tp = 1  # tensor-parallel degree (the shapes are a rank's: parallel.tp_block)
        self._seq_sharded = False
        self.cache: list[Tensor] = []  # the DynamicCache's K/V tensors
        self.returned_weights: Tensor | None = None  # eager attention's probabilities
        self.past: list[tuple[Tensor, Tensor]] = []  # a decode step's cached K/V (inputs)

    def _finetune_params(self, spec: ModelSpec) -> None:
        """The parameters of a peft model on a (bitsandbytes-quantized) base: frozen base
        weights, quantized block linears (packed codes and their QuantState tensors), fp32
        LoRA A and B after each adapted layer's own parameters; under quantization in
        training, ``prepare_model_for_kbit_training`` has cast every other 16-bit parameter to
        fp32 (peft/utils/other.py)."""
        from vramfit.estimate.finetune import (
            block_linears,
            int8_outlier_columns,
            lora_target_shapes,
            quantized_weight_tensors,
        )

        b, g, w = self.b, self.g, self.w
        if w.quant is not None:
            self.int8_outliers = int8_outlier_columns(spec, w.quant.int8_outliers)
        lora = w.lora
        if lora is not None and lora.model_type is None:
            lora = Lora.model_validate(
                {**lora.model_dump(), "model_type": PEFT_TYPE.get(b.model_type)}
            )
        peft_type = lora.model_type if lora is not None else PEFT_TYPE.get(b.model_type)
        linears = {x.path: x.shape for x in block_linears(spec, peft_type)}
        if lora is not None:
            self.lora_targets = {x.path for x in lora_target_shapes(spec, lora)}
        quant = w.quant
        other = self.weight
        if quant is not None and g.grad and other.size == 2:
            other = DType.fp32
        full_finetune = lora is None
        for name, numel in param_shapes(b):
            path = _block_path(name)
            module = path.rsplit(".", 1)[0] if path else ""
            if quant is not None and module in linears and name.endswith(".weight"):
                shape = linears[module]
                for part, nbytes in quantized_weight_tensors(shape, quant):
                    t = g.leaf(f"{name} {part}", nbytes, DType.uint8, requires_grad=False)
                    self.param_list.append(t)
                    if part == "weight":
                        self.params[name] = t
                self.quantized[name.removesuffix(".weight")] = shape
            else:
                dtype = other if (quant is not None and module not in linears) else self.weight
                t = g.leaf(name, numel, dtype, requires_grad=full_finetune)
                self.params[name] = t
                self.param_list.append(t)
            if lora is not None and module in self.lora_targets and name.endswith(".weight"):
                out, n_in = linears[module]
                stem = name.removesuffix(".weight")
                for key, numel_ in (
                    (f"{stem}.lora_A", lora.r * n_in),
                    (f"{stem}.lora_B", out * lora.r),
                ):
                    t = g.leaf(key, numel_, DType.fp32, requires_grad=True)
                    self.params[key] = t
                    self.param_list.append(t)

    @property
    def n(self) -> int:
        """Tokens the current op sees: a sequence-parallel rank's norms and residuals see
        seq / sp of them."""
        return self.batch * self.seq // (self.sp if self._seq_sharded else 1)

    def gather(self, name: str, x: Tensor, part: str) -> Tensor:
        """Sequence parallel's all-gather before a colwise projection (DTensor
        ``PrepareModuleInput`` with ``Shard(1)`` in, ``Replicate`` out): a new full-sequence
        tensor, which the projections save. ``_c10d_functional`` gathers along dim 0 and
        ``torch.cat``s the chunks along dim 1 (``all_gather_single`` in
        torch/distributed/_functional_collectives.py): the dim-0 buffer is scratch of the
        output's size, unless the batch is 1 (``_chunked_cat_is_view``). The backward
        reduce-scatters the projections' summed gradient: ``reduce_scatter_single`` first
        ``cat``s its dim-1 chunks along dim 0, a full-size copy at any batch, beside the
        seq / sp result."""
        if self.sp == 1:
            return x
        full = x.numel * self.sp
        out = Tensor(f"{self.ops.prefix}{name} all-gather", full, x.dtype, part=part)

        def backward(bw: Backward) -> None:
            g = bw.out()
            bw.new(0, dtype=g.dtype if g else None)
            if g is not None:
                bw.temp("chunks along dim 0", full * g.dtype.size)

        scratch = [] if self._chunked_cat_is_view else [("output along dim 0", full * x.dtype.size)]
        self.g.node(
            f"{self.ops.prefix}{name} all-gather", [x], [out], backward=backward, scratch=scratch
        )
        return out

    @property
    def _chunked_cat_is_view(self) -> bool:
        """Whether an all-gather along the sequence (dim 1 of batch x seq x hidden) is the
        dim-0 buffer itself, viewed: ``_maybe_view_chunk_cat`` (torch/_utils.py) views it
        when every dim before the gather dim is 1, which a batch of 1 is; else it ``cat``s
        the chunks into a new tensor (measured: the 8B TP 4 + SP batch-1 trace gathers
        without a copy, the batch-4 ones with one)."""
        return self.batch == 1

    def scatter(self, name: str, x: Tensor) -> Tensor:
        """Sequence parallel's reduce-scatter after a rowwise projection (``output_layouts
        Shard(1)``): this rank's seq / sp rows, after a full-size ``cat`` of the dim-1
        chunks along dim 0 (scratch); the backward all-gathers the gradient (a full-size
        gradient and, unless the batch is 1, the dim-0 buffer it is ``cat`` from: see
        ``gather``). The embeddings'
        ``Replicate`` to ``Shard(1)`` is a local split (``Shard._split_tensor``), copied
        contiguous: no scratch. Without sequence parallel, ``RowwiseParallel``'s
        ``Partial`` to ``Replicate`` all-reduce: functional collectives reduce out of place
        (``_c10d_functional.all_reduce`` clones its input), a second tensor of the output's
        size; its backward passes the gradient on."""
        o = self.ops
        if self.sp == 1:
            if self.tp == 1 or name == "embeddings":
                return x
            out = Tensor(f"{o.prefix}{name} all-reduce", x.numel, x.dtype, part=x.part)
            self.g.node(
                f"{o.prefix}{name} all-reduce",
                [x],
                [out],
                backward=lambda bw: bw.alias(0, bw.out()),
            )
            return out
        local = "split" if name == "embeddings" else "reduce-scatter"
        out = Tensor(f"{o.prefix}{name} {local}", x.numel // self.sp, x.dtype, part=x.part)

        def backward(bw: Backward) -> None:
            g = bw.out()
            bw.new(0, dtype=g.dtype if g else None)
            if g is not None and not self._chunked_cat_is_view:
                bw.temp("all-gather output along dim 0", x.numel * g.dtype.size)

        scratch = [] if local == "split" else [("chunks along dim 0", x.numel * x.dtype.size)]
        self.g.node(f"{o.prefix}{name} {local}", [x], [out], backward=backward, scratch=scratch)
        return out

    def colwise_input(self, name: str, x: Tensor) -> Tensor:
        """``ColwiseParallel``'s input without sequence parallel: ``DTensor.from_local(x,
        Replicate)``, a view; in backward ``_FromTorchTensor`` redistributes the projection's
        ``Partial`` input gradient to ``Replicate``, an all-reduce that copies it (out of
        place), once per projection. With sequence parallel the projections share the one
        all-gathered DTensor, whose backward reduce-scatters their summed gradient."""
        if self.tp == 1 or self.sp > 1 or not name.endswith(_COLWISE):
            return x
        return self.ops.view(x, f"{name} input (Replicate)", copy_backward=True)

    def p(self, name: str) -> Tensor:
        return self.params[name]

    # pieces -------------------------------------------------------------------------------
    def rms_norm(self, prefix: str, x: Tensor) -> Tensor:
        """LlamaRMSNorm / GemmaRMSNorm (Python): x.to(fp32), pow(2).mean, rsqrt, x * rsqrt,
        then weight * that (Llama, in the input dtype) or that * (1 + weight) (Gemma, fp32,
        then cast back)."""
        o, n = self.ops, self.n
        x32 = o.cast(x, DType.fp32, f"{prefix} fp32 input")
        sq = o.pow(f"{prefix} x^2", x32, part="norm")
        var = o.mean(f"{prefix} variance", sq, n)
        var = o.add_scalar(f"{prefix} variance + eps", var)
        rstd = o.small(f"{prefix} rsqrt", var)
        normed = o.binary(f"{prefix} x * rsqrt", x32, rstd, "mul", part="norm")
        w = self.p(f"{prefix}.weight")
        if self.b.gemma_norm:
            w1 = o.add_scalar(f"{prefix} 1 + weight", o.cast(w, DType.fp32))
            out = o.binary(f"{prefix} output", normed, w1, "mul", part="norm")
            return o.cast(out, x.dtype, f"{prefix} output in input dtype", part="norm")
        low = o.cast(normed, x.dtype, f"{prefix} normed in input dtype", part="norm")
        out = o.binary(f"{prefix} output", w, low, "mul", part="norm")
        # `return self.weight * hidden_states.to(input_dtype)`: the local hidden_states (the
        # fp32 x * rsqrt) lives until the return (the hf2 Llama-3-8B bf16 trace)
        o.keep(normed)
        return out

    def norm(self, prefix: str, x: Tensor) -> Tensor:
        if self.tp > 1:
            # a replicated or SequenceParallel norm takes ``DTensor.from_local(x)``, a view
            # with its own autograd node: the norm's two gradients of x sum there, apart
            # from the residual's, which waits in x's input buffer until the view's
            # backward hands the sum over (_FromTorchTensor.backward returns it as it is)
            x = self.ops.view(x, f"{prefix} input (DTensor)")
        if self.b.layernorm:
            out = self.ops.layer_norm(
                prefix, x, self.p(f"{prefix}.weight"), self.p(f"{prefix}.bias"), self.n
            )
        else:
            out = self.rms_norm(prefix, x)
        # the caller's `hidden_states = self.norm(hidden_states)` names the input until the
        # norm returns (the final norm's, Gemma-2's post-attention and post-feedforward
        # norms'; the hf3 Adafactor trace, a CPU dispatch log of the real models' forwards)
        self.ops.keep(x)
        return out

    def linear(self, name: str, x: Tensor, width: int, bias: bool, part: str = "") -> Tensor:
        """A projection: nn.Linear / Conv1D, bitsandbytes' Linear4bit or Linear8bitLt when
        quantized, and a peft LoRA branch on top when adapted (peft/tuners/lora/layer.py
        Linear.forward, lora/bnb.py Linear8bitLt.forward and Linear4bit.forward)."""
        o = self.ops
        quant = self.quant
        x = self.colwise_input(name, x)
        if name in self.quantized and quant is not None:
            out_f, in_f = self.quantized[name]
            adapted = self.lora is not None and _block_path(name) in self.lora_targets
            if quant.kind.value == "int8":
                # peft's lora.Linear8bitLt adds to the base output without cloning it
                result = o.linear_8bit(
                    name,
                    x,
                    self.p(f"{name}.weight"),
                    out_f,
                    in_f,
                    threshold=quant.int8_threshold,
                    outlier_cols=self.int8_outliers.get(_block_path(name), 0),
                )
                adapted = False
            else:
                result = o.linear_4bit(
                    name,
                    x,
                    self.p(f"{name}.weight"),
                    out_f,
                    in_f,
                    compute=DType(quant.compute_dtype.value),
                    load=self.weight,
                    blocksize=quant.blocksize,
                    double_quant=quant.double_quant,
                )
            if adapted:  # peft's lora.Linear4bit: result = result.clone()
                result = o.copy(f"{name} result", result)
        else:
            result = o.linear(
                name,
                x,
                self.p(f"{name}.weight"),
                self.p(f"{name}.bias") if bias else None,
                width,
                part=part,
                conv1d=self.b.conv1d,
            )
        if self.lora is None or _block_path(name) not in self.lora_targets:
            return result
        lora = self.lora
        # `x = self._cast_input_dtype(x, lora_A.weight.dtype)`: the cast is the forward's
        # local x until it returns (the ft7 Phi-3 LoRA trace)
        cast = x32 = o.cast(x, DType.fp32, f"{name} adapter input")
        if self.training:
            x32 = o.dropout(f"{name} lora_dropout", x32, lora.dropout)
        a = o.linear(f"{name} lora_A", x32, self.p(f"{name}.lora_A"), None, lora.r)
        bb = o.linear(f"{name} lora_B", a, self.p(f"{name}.lora_B"), None, width)
        scaled = o.scalar(f"{name} lora scaling", bb)
        if name in self.quantized:  # lora/bnb.py casts the adapter output before the add
            scaled = o.cast(scaled, result.dtype, f"{name} lora output")
            out = o.binary(f"{name} + lora", result, scaled, "add", part=part)
        else:
            out = o.binary(f"{name} + lora", result, scaled, "add", part=part)
            out = o.cast(out, result.dtype, f"{name} output", part=part)
        o.keep(cast)
        return out

    def rope(self, name: str, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, rotate_half = cat(-x2, x1).
        mul saves cos / sin (not x); the halves are slices, whose backward is full size."""
        o = self.ops
        x_cos = o.binary(f"{name} * cos", x, cos, "mul")
        # rotate_half slices x1 = x[..., :d/2] first, then x2: x2's SliceBackward has the
        # higher sequence number, so autograd runs it (after -x2's) before x1's
        x1 = o.slice(x, x.numel // 2, f"{name} first half")
        x2 = o.slice(x, x.numel // 2, f"{name} second half")
        neg = o.unary(f"{name} -x2", x2)
        rot = o.cat(f"{name} rotate_half", [neg, x1])
        rot_sin = o.binary(f"{name} rotate_half * sin", rot, sin, "mul")
        return o.binary(f"{name} rotated", x_cos, rot_sin, "add", part="attention")

    def attention(
        self,
        i: int,
        prefix: str,
        x: Tensor,
        cos: Tensor | None,
        sin: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        b, o, n = self.b, self.ops, self.n
        fused_name = "attn.c_attn" if b.model_type is ModelType.gpt2 else "self_attn.qkv_proj"
        local: tuple[Tensor, ...] = ()  # the fused projection's output, when a local names it
        if b.fused_qkv:
            qkv = self.linear(
                f"{prefix}.{fused_name}", x, b.q_width + 2 * b.kv_width, b.qkv_bias, "attention"
            )
            rotary = cos is not None
            q = o.view(qkv, f"{prefix} q", numel=n * b.q_width, copy_backward=rotary)
            k = o.view(qkv, f"{prefix} k", numel=n * b.kv_width, copy_backward=rotary)
            v = o.view(qkv, f"{prefix} v", numel=n * b.kv_width)
            if b.model_type is ModelType.phi3:
                # Phi3Attention.forward's local ``qkv`` names the projection's output to its
                # return, after the cache has replaced the views of it (the hf3 Phi-3 trace:
                # the qkv_proj output live at the softmax's peak); GPT-2 splits the c_attn
                # output without naming it
                local = (qkv,)
        else:
            # `self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)`, then k's, then
            # v's: each view right after its projection, so autograd runs v_proj's backward
            # before k's view (the hf2 Llama-3-8B trace). The gradients come back heads first
            # and are copied (clone in ViewBackward0) for q and k (rotated) and for v when
            # something copied it heads first: the cache, eager's or SDPA's repeat of grouped
            # K/V (an explicit mask's repeat_kv, the math fallback's repeat_interleave: the
            # h200-qlora-load ft6 Llama-3-8B --cpp trace, ReshapeAliasBackward0's clone)
            q = self.linear(f"{prefix}.self_attn.q_proj", x, b.q_width, b.qkv_bias, "attention")
            kernel = attention_kernel(b, self.w, self.ops.autocast or q.dtype)
            copied_v = (
                self.use_cache
                or kernel in ("eager", "math")  # the math fallback runs only for grouped K/V
                or (b.kv_heads < b.heads and self.sdpa_masked(i))
            )
            q = o.view(q, f"{prefix} q heads", copy_backward=cos is not None)
            k = self.linear(f"{prefix}.self_attn.k_proj", x, b.kv_width, b.qkv_bias, "attention")
            k = o.view(k, f"{prefix} k heads", copy_backward=cos is not None)
            v = self.linear(f"{prefix}.self_attn.v_proj", x, b.kv_width, b.qkv_bias, "attention")
            v = o.view(v, f"{prefix} v heads", copy_backward=copied_v)
        if cos is not None and sin is not None:
            # apply_rotary_pos_emb(q, k, cos, sin) rotates q, then k; its arguments (the
            # caller's query_states / key_states too) hold the projections to its return
            unrotated = q, k
            q = self.rope(f"{prefix} q", q, cos, sin)
            if b.model_type is ModelType.phi3:
                # Phi-3's apply_rotary_pos_emb rotates the first rotary_dim features and
                # cat()s the rest back on, even when there is no rest: a heads-first copy
                q = o.cat(f"{prefix} q with pass-through", [q])
            k = self.rope(f"{prefix} k", k, cos, sin)
            if b.model_type is ModelType.phi3:
                k = o.cat(f"{prefix} k with pass-through", [k])
            o.keep(*unrotated)
        keys = self.seq + self.layer_cached[i]
        if self.use_cache:
            # DynamicLayer.update: cat(keys, new) along the sequence; its first keys are an
            # empty tensor in the key states' dtype, which promotes the values' cat. The
            # caller's key_states / value_states name the new ones until update returns
            # (`key_states, value_states = past_key_values.update(...)`; the hf1 Phi-3 trace)
            new = k, v
            kv = Component.kv_cache
            if self.cached:
                pk, pv = self.past[i]
                k = o.cat(f"{prefix} cached keys", [pk, k], component=kv)
                v = o.cat(f"{prefix} cached values", [pv, v], component=kv)
            else:
                # the cache's first keys and values are empty tensors in the keys' dtype
                empty = k.dtype
                k = o.cat(f"{prefix} cached keys", [k], component=kv)
                v = o.cat(f"{prefix} cached values", [v], empty_dtype=empty, component=kv)
            o.keep(*new)
            self.cache += [k, v]
        # the kernel SDPA picks follows the dtype q arrives in (after autocast's cast): fp32
        # when the hidden states are (a kbit-prepared model's Linear4bit casts back to them)
        compute = self.ops.autocast or q.dtype
        kernel = attention_kernel(b, self.w, compute)
        p_drop = b.attention_dropout if self.training else 0.0
        bool_mask = 0
        states = q, k, v, *local  # the attention forward's query/key/value_states, to its return
        if kernel != "eager" and self.sdpa_masked(i):
            # an explicit mask (see sdpa_masked): use_gqa_in_sdpa is then False, so
            # sdpa_attention_forward repeats K and V itself (repeat_kv copies) and SDPA runs a
            # kernel that takes a mask: memory-efficient attention for fp32, cuDNN's for 16 bits
            k, v = self.repeat_kv(prefix, k, v, keys)
            kernel = "efficient" if compute is DType.fp32 else "cudnn"
            bool_mask = self.batch * self.seq * keys
        if kernel in ("cudnn", "efficient", "flash"):
            out = o.sdpa(
                f"{prefix} attention",
                q,
                k,
                v,
                batch=self.batch,
                heads=b.heads,
                seq=self.seq,
                kernel=kernel,
                dropout=p_drop > 0,
                bool_mask=bool_mask,
                mask=mask if bool_mask else None,
            )
            if b.model_type is ModelType.phi3 and kernel == "cudnn":
                # cuDNN's output follows q's heads-first layout: transpose(1, 2)
                # .contiguous() copies it (the h200-hf-ops Phi-3 trace); the efficient
                # kernel writes (batch, seq, heads, dim), so the copy is a no-op (a
                # kbit-prepared Phi-3's fp32 queries, the h200-qlora-load ft9 trace)
                out = o.copy(f"{prefix} attention output", out, part="attention")
        elif kernel == "math":
            out = self.math_core(prefix, q, k, v, keys, p_drop)
        else:
            out = self.eager_core(prefix, q, k, v, keys, mask, p_drop=p_drop)
        name = "attn.c_proj" if b.model_type is ModelType.gpt2 else "self_attn.o_proj"
        # RowwiseParallel's output hook reduces o_proj's output as it returns, before the
        # attention forward's locals go (the 8B TP 4 + SP trace, tp-traces)
        out = self.scatter(
            f"{prefix} attention output", self.linear(f"{prefix}.{name}", out, b.hidden, b.bias)
        )
        if b.model_type is ModelType.gpt2:
            # GPT2Attention's own resid_dropout, before it returns (its query_states, a view
            # of the c_attn output, alive through it: the hf2 GPT-2 355M trace)
            out = o.dropout("residual dropout", out, b.resid_dropout if self.training else 0)
        o.keep(*states)
        return out

    def _bool_mask(self, name: str, keys: int, window: int | None) -> Tensor:
        """sdpa_mask's boolean mask (transformers/masking_utils.py, the non-vmap path), which
        eager_mask turns into an additive one with ``torch.where``: the mask function on
        broadcast aranges. ``and_masks`` ands its functions into a result one at a time, each
        ``&`` a new tensor and the last result and operand freed. The causal function and the
        sliding-window overlay index q and kv only: a (1, 1, q, kv) bool each. generate's
        attention_mask adds ``padding_mask_function`` (``padding_mask[batch_idx, kv_idx]``,
        (b, 1, 1, kv)), whose ``&`` makes the result (b, 1, q, kv). The result is expanded to
        the batch, a view."""
        g = self.g

        def index(fn: str) -> tuple[Tensor, int, int]:
            rows, cols = (self.batch, 1) if fn == "padding" else (1, self.seq)
            t = Tensor(f"{name}: {fn}", rows * cols * keys, DType.bool)
            g.node(f"{name}: {fn}", [], [t])
            return t, rows, cols

        def conj(fns: tuple) -> tuple[Tensor, int, int]:  # and_masks(*fns)
            result, rows, cols = None, 1, 1  # q_idx.new_ones((), dtype=torch.bool)
            for fn in fns:
                m, m_rows, m_cols = conj(fn) if isinstance(fn, tuple) else index(fn)
                rows, cols = max(rows, m_rows), max(cols, m_cols)
                out = Tensor(f"{name}: & {fn}", rows * cols * keys, DType.bool)
                g.node(f"{name}: & {fn}", [m] if result is None else [result, m], [out])
                result = out
            assert result is not None
            return result, rows, cols

        # causal_mask_function; sliding_window_causal_mask_function = and_masks(overlay, causal)
        function: str | tuple = "causal" if window is None else ("window", "causal")
        if self.attention_mask:
            function = (function, "padding")
        mask, _, _ = conj(function) if isinstance(function, tuple) else index(function)
        return mask

    def sdpa_masked(self, i: int) -> bool:
        """Whether layer ``i`` gets an explicit boolean mask under SDPA: transformers' sdpa_mask
        skips it for plain causal attention, but not once the keys reach a sliding layer's
        window (``_ignore_causal_mask_sdpa`` in transformers/masking_utils.py: kv_length >=
        local_attention_size)."""
        window = self.windows[i]
        return window is not None and self.seq + self.layer_cached[i] >= window

    def repeat_kv(self, prefix: str, k: Tensor, v: Tensor, keys: int) -> tuple[Tensor, Tensor]:
        """transformers' repeat_kv: grouped K and V expanded to every query head and
        reshaped, a copy each (none without grouping)."""
        b, o = self.b, self.ops
        if b.kv_heads >= b.heads:
            return k, v
        wide = self.batch * b.heads * keys * b.head_dim
        return (
            o.unary(f"{prefix} repeated k", k, numel=wide),
            o.unary(f"{prefix} repeated v", v, numel=wide),
        )

    def _folds_by_copy(self) -> bool:
        """Whether folding (batch, heads) of a tokens-first tensor into one batch dimension
        (``reshape`` in aten's matmul) copies it: it is a view only when the batch or the
        sequence is 1 (checked on the CPU; the h200-qlora-load Llama-3-8B trace at batch 1
        makes no copy, the ft1 TinyLlama trace at batch 4 does)."""
        return self.batch > 1 and self.seq > 1

    def _q_folds_by_copy(self) -> bool:
        """Whether ``torch.matmul(q, k^T)`` copies q: the projections' queries are
        ``view(...).transpose(1, 2)``, tokens first in memory, and stay so through rotary and
        scaling (elementwise ops keep their input's layout), so as ``_folds_by_copy``; Phi-3's
        pass-through ``cat`` makes q contiguous heads first: never a copy."""
        return self.b.model_type is not ModelType.phi3 and self._folds_by_copy()

    def _tokens_first(self, prefix: str, pv: Tensor) -> Tensor:
        """``attn_output.transpose(1, 2).contiguous()`` after ``torch.matmul(probs, v)``: a
        copy to tokens first, saved by o_proj. Its backward passes the gradient on as a
        transposed view (CloneBackward0, TransposeBackward0), which matmul's
        ``_unsafe_view`` backward reshapes to (batch x heads, seq, dim): a copy only where
        the fold is not a view (``_folds_by_copy``)."""
        o = self.ops
        copies = self._folds_by_copy()
        pv = o.view(pv, f"{prefix} attention output, heads first", copy_backward=copies)
        return o.copy(f"{prefix} attention output", pv, part="attention")

    def math_core(
        self, prefix: str, q: Tensor, k: Tensor, v: Tensor, keys: int, p_drop: float
    ) -> Tensor:
        """SDPA's math fallback, ``_scaled_dot_product_attention_math``
        (aten/src/ATen/native/transformers/attention.cpp), op by op as it runs on the GPU:
        ``query * sqrt(scale)``; for ``is_causal`` a ``ones(L, S, bool).tril()`` turned into
        an additive fp32 mask (``convert_boolean_attn_mask``); K and V expanded to every head
        (``repeat_interleave``: a copy each); ``key^T * sqrt(scale)``; ``matmul``, whose
        reshape may copy the strided query (``_q_folds_by_copy``); the mask added in place
        (``attn.add_``);
        ``_safe_softmax``, which also makes ``attn == -inf`` (a bool per score) and its
        all-rows reduction; ``matmul`` with V. The scaled query, the expanded K and V and the
        mask are C++ locals: they live to the function's return. No softcapping: transformers'
        sdpa_attention_forward takes Gemma-2's softcap in **kwargs and ignores it. Traced on
        an H200 in a kbit-prepared TinyLlama (fp32 queries, grouped K/V), forward and
        recompute alike."""
        b, o, g = self.b, self.ops, self.g
        scores = self.batch * b.heads * self.seq * keys
        q = o.scalar(f"{prefix} q * scale", q, part="attention")
        held = [q]
        if self.seq > 1:  # sdpa_attention_forward passes is_causal for q > 1 and no mask
            ones = Tensor(f"{prefix} causal ones", self.seq * keys, DType.bool)
            g.node(f"{o.prefix}{prefix} causal ones", [], [ones])
            tril = Tensor(f"{prefix} causal tril", self.seq * keys, DType.bool)
            g.node(f"{o.prefix}{prefix} causal tril", [ones], [tril])
            mask = Tensor(f"{prefix} causal mask", self.seq * keys, DType.fp32)
            # where(mask, 0, -inf): two 0-d scalar tensors beside it
            g.node(
                f"{o.prefix}{prefix} causal mask", [tril], [mask], scratch=[("0", 4), ("-inf", 4)]
            )
            held.append(mask)
        k, v = self.repeat_kv(prefix, k, v, keys)
        held += [k, v]
        kt = o.scalar(f"{prefix} k^T * scale", k)
        qc = q
        if self._q_folds_by_copy():
            qc = o.copy(f"{prefix} contiguous q", q, part="attention")
        s = o.bmm(f"{prefix} q @ k^T", qc, kt, scores)
        probs = o.softmax_into(f"{prefix} softmax", s, s.dtype)
        # _safe_softmax's masked rows: the scores stay live until it returns
        g.node(
            f"{o.prefix}{prefix} softmax == -inf rows",
            [s, probs],
            [],
            scratch=[("scores == -inf", scores), ("all rows", scores // keys), ("0", 4)],
        )
        probs = o.dropout(f"{prefix} attention dropout", probs, p_drop, part="attention")
        pv = o.bmm(f"{prefix} probs @ v", probs, v, self.n * b.q_width)
        o.keep(*held)
        return self._tokens_first(prefix, pv)

    def eager_core(
        self,
        prefix: str,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        keys: int,
        mask: Tensor | None,
        *,
        p_drop: float,
    ) -> Tensor:
        """HF's eager_attention_forward: repeat_kv copies, q @ k^T (bmm of contiguous
        copies), scaling, the additive mask, an fp32 softmax, P @ V, and the output copy back
        to tokens first."""
        b, o = self.b, self.ops
        scores = self.batch * b.heads * self.seq * keys
        k, v = self.repeat_kv(prefix, k, v, keys)
        key_states = k
        # torch.matmul(query, key_states.transpose(2, 3)) under autocast casts both operands
        # first, k then q (Ops.bmm); matmul then folds q to 3-D, with a contiguous copy when
        # ``_q_folds_by_copy`` (the rotated q is still tokens first); the casts are the op's
        # arguments until it returns (the hf2 Llama trace: both casts and q's copy live at
        # once through the bmm)
        k = o._autocast_low(k, "attention")
        q_low = o._autocast_low(q, "attention")
        q = q_low
        if self._q_folds_by_copy():
            q = o.copy(f"{prefix} contiguous q", q_low, part="attention")
        s = o.bmm(f"{prefix} q @ k^T", q, k, scores)
        o.keep(q_low)
        s = o.scalar(f"{prefix} scaled scores", s)
        if b.model_type is ModelType.gemma2:
            # eager_attention_forward's attn_logit_softcapping, tanh(s / c) * c
            s = o.scalar(f"{prefix} scores / softcap", s)
            s = o.unary(f"{prefix} tanh(scores)", s, saves="output", part="attention")
            s = o.scalar(f"{prefix} scores * softcap", s)
        if mask is not None:
            s = o.binary(f"{prefix} masked scores", s, mask, "add")
        # Llama-derived eager code asks for softmax(..., dtype=float32); GPT-2's does not, so
        # its probabilities stay in the scores' dtype unless autocast upcasts softmax
        gpt2 = b.model_type is ModelType.gpt2
        probs = o.softmax(f"{prefix} softmax", s, dtype=None if gpt2 else DType.fp32)
        # the scores are the local `attn_weights` until the statement that reassigns it
        # returns (h200-traces hf3 Phi-3 eager trace: the masked scores live through
        # softmax's fp32 copy and its output)
        if b.model_type is ModelType.gpt2:  # softmax(...), then .type(value.dtype)
            o.keep(s)
            probs = o.cast(probs, v.dtype, f"{prefix} probabilities", part="attention")
        else:  # softmax(..., dtype=float32).to(query.dtype)
            probs = o.cast(
                probs,
                q.dtype if not o.autocast else probs.dtype,
                f"{prefix} probabilities",
                part="attention",
            )
            o.keep(s)
        probs = o.dropout(f"{prefix} attention dropout", probs, p_drop, part="attention")
        # eager_attention_forward returns them: the layer's `_` holds them
        self.returned_weights = probs
        pv = o.bmm(f"{prefix} probs @ v", probs, v, self.n * b.q_width)
        out = self._tokens_first(prefix, pv)
        # eager_attention_forward's locals key_states / value_states (repeat_kv's copies) live
        # to its return: the repeated K through the softmax (a CPU dispatch log of Llama and
        # Phi-3 prefills at 128 tokens, tests/test_hf_inference_oracle.py)
        o.keep(key_states, v)
        return out

    def mlp(self, prefix: str, x: Tensor) -> Tensor:
        b, o, n = self.b, self.ops, self.n
        if b.mlp == "gelu_new":
            hdn = self.linear(f"{prefix}.mlp.c_fc", x, b.ffn, b.bias, "mlp")
            half = o.scalar(f"{prefix} 0.5 * x", hdn, part="mlp")
            cube = o.pow(f"{prefix} x^3", hdn, part="mlp")
            t = o.scalar(f"{prefix} 0.044715 * x^3", cube)
            t = o.binary(f"{prefix} x + 0.044715 * x^3", hdn, t, "add")
            t = o.scalar(f"{prefix} * sqrt(2 / pi)", t)
            t = o.unary(f"{prefix} tanh", t, saves="output", part="mlp")
            t = o.add_scalar(f"{prefix} 1 + tanh", t, part="mlp")
            # (1 + tanh) is saved by the product: add_scalar's output is the mul's input
            act = o.binary(f"{prefix} gelu", half, t, "mul", part="mlp")
            o.keep(hdn)  # NewGELUActivation's argument, to its return
            return self._down(prefix, "mlp.c_proj", act)
        if b.fused_gate_up:
            gu = self.linear(f"{prefix}.mlp.gate_up_proj", x, 2 * b.ffn, b.bias, "mlp")
            gate = o.view(gu, f"{prefix} gate", numel=n * b.ffn)
            up = o.view(gu, f"{prefix} up", numel=n * b.ffn)
            act = o.unary(f"{prefix} act", gate, saves="input", part="mlp")
            prod = o.binary(f"{prefix} up * act", up, act, "mul", part="mlp")
            # Phi3MLP.forward's local `gate`, a view of the fused output, holds it to the
            # return, through down_proj (the hf1 Phi-3 generate trace)
            out = self._down(prefix, "mlp.down_proj", prod)
            o.keep(gate)
            return out
        else:
            gate = self.linear(f"{prefix}.mlp.gate_proj", x, b.ffn, b.bias, "mlp")
            act = o.unary(f"{prefix} act", gate, saves="input", part="mlp")
            up = self.linear(f"{prefix}.mlp.up_proj", x, b.ffn, b.bias, "mlp")
            prod = o.binary(f"{prefix} act * up", act, up, "mul", part="mlp")
        return self._down(prefix, "mlp.down_proj", prod)

    def _down(self, prefix: str, name: str, x: Tensor) -> Tensor:
        """The MLP's output projection, reduced by RowwiseParallel's output hook as the
        projection returns (``scatter``)."""
        out = self.linear(f"{prefix}.{name}", x, self.b.hidden, self.b.bias)
        return self.scatter(f"{prefix} MLP output", out)

    def block(
        self, i: int, x: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        b, o = self.b, self.ops
        gpt2 = b.model_type is ModelType.gpt2
        prefix = f"transformer.h.{i}" if gpt2 else f"model.layers.{i}"
        o.prefix = f"block {i} "
        self.g.unit_begin(i)
        if self.checkpoint:
            self.g.checkpoint_begin()
        if i == 0:
            # sequence parallel: layer 0's PrepareModuleInput (Replicate to Shard(1)) splits
            # the embeddings in a forward pre-hook, which runs inside the layer's checkpoint
            # (GradientCheckpointingLayer.__call__ wraps the module call): the checkpoint
            # keeps the full embeddings as its input, and its recompute splits them again
            # (the CPU oracle, tests/test_tp_oracle.py)
            x = self.scatter("embeddings", x)
        self._seq_sharded = self.sp > 1
        layer_input = x
        self.returned_weights = None
        normed = self.norm(f"{prefix}.ln_1" if gpt2 else f"{prefix}.input_layernorm", x)
        self._seq_sharded = False
        gathered = self.gather(f"{prefix} attention input", normed, "attention")
        attn = self.attention(i, prefix, gathered, cos, sin, mask)
        self._seq_sharded = self.sp > 1
        if gathered is not normed:
            # sequence parallel gathers in the attention's input hook: the gathered tensor is
            # the attention forward's `hidden_states` argument, live until it returns (after
            # o_proj's reduce-scatter; the 8B TP 4 + SP trace, tp-traces)
            o.keep(gathered)
        if not gpt2:  # `hidden_states, _ = self.self_attn(hidden_states=hidden_states, ...)`
            o.keep(normed)
        if b.norms_per_layer == 4:
            attn = self.norm(f"{prefix}.post_attention_layernorm", attn)
        if not gpt2:  # Phi3DecoderLayer's resid_attn_dropout (GPT-2's is in its attention)
            attn = o.dropout("residual dropout", attn, b.resid_dropout if self.training else 0)
        attn_output = attn
        x = (
            o.binary("residual 1", attn, x, "add", part="norm")
            if gpt2
            else (o.binary("residual 1", x, attn, "add", part="norm"))
        )
        if gpt2:  # GPT2Block's `hidden_states = attn_output + residual`
            o.keep(normed)
        if b.norms_per_layer == 4:
            normed = self.norm(f"{prefix}.pre_feedforward_layernorm", x)
        else:
            normed = self.norm(
                f"{prefix}.ln_2" if gpt2 else f"{prefix}.post_attention_layernorm", x
            )
        self._seq_sharded = False
        gathered = self.gather(f"{prefix} MLP input", normed, "mlp")
        m = self.mlp(prefix, gathered)
        self._seq_sharded = self.sp > 1
        if gathered is not normed:  # the MLP forward's argument, as the attention's above
            o.keep(gathered)
        # the MLP's input is the layer's hidden_states until `hidden_states = self.mlp(...)`
        # rebinds it (the hf2 Llama trace: freed before the residual add), GPT-2's until
        # `hidden_states = residual + feed_forward_hidden_states`
        if not gpt2:
            o.keep(normed)
        if b.norms_per_layer == 4:
            m = self.norm(f"{prefix}.post_feedforward_layernorm", m)
        m = o.dropout("MLP dropout", m, b.resid_dropout if self.training else 0)
        out = o.binary("residual 2", x, m, "add", part="norm")
        self._seq_sharded = False
        if gpt2:
            o.keep(normed)
        # the model's loop (`hidden_states = decoder_layer(hidden_states, ...)`) holds the
        # layer's input until the layer returns; GPT2Block's `attn_output` is a local too
        o.keep(layer_input, *([attn_output] if gpt2 else []))
        if self.returned_weights is not None:  # `hidden_states, _ = self.self_attn(...)`
            o.keep(self.returned_weights)
        if self.checkpoint:
            self.g.checkpoint_end()
        self.g.unit_end()
        o.prefix = ""
        return out

    def forward(self, ids: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The model's forward; returns (logits, loss)."""
        b, o, g = self.b, self.ops, self.g
        n, h = self.n, b.hidden
        gpt2 = b.model_type is ModelType.gpt2
        emb_name = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
        x = o.embedding("embeddings", self.p(emb_name), ids, n, h)
        model_locals = [x]  # the base model's forward names them until it returns
        if self.lora is not None and self.checkpoint:
            # gradient_checkpointing_enable -> enable_input_require_grads: a forward hook
            # makes the embedding output require grad (modeling_utils.py)
            x.requires_grad = True
        if gpt2:
            pos = o.embedding(
                "position embeddings", self.p("transformer.wpe.weight"), ids, self.positions, h
            )
            model_locals.append(pos)
            x = o.binary("embeddings + positions", x, pos, "add", part="norm")
        if b.embed_scale:  # GemmaTextScaledWordEmbedding returns the scaled embeddings
            x = o.scalar("embeddings * sqrt(hidden)", x, part="norm")
            model_locals = [x]
        # create_causal_mask (and a sliding-window model's create_sliding_window_causal_mask)
        # runs before the rotary embedding in every modeling file here (LlamaModel.forward).
        # `mask`: each layer's attention_mask, eager's additive mask or SDPA's boolean one
        mask = None
        # q reaches attention in the autocast dtype, else in the hidden states' (see attention)
        kernel = attention_kernel(b, self.w, o.autocast or x.dtype)
        if kernel == "eager" and self.seq > 1:  # eager_mask: (b, 1, s, keys) additive
            keys = self.seq + self.cached
            # one mask per kind of layer, full attention first (causal_mask_mapping's order)
            kinds = sorted(set(self.windows), key=lambda window: window is not None)
            for n_mask, window in enumerate(kinds):
                kind = "causal mask" if window is None else "sliding window mask"
                where = Tensor(kind, self.batch * self.seq * keys, x.dtype)
                g.node(kind, [self._bool_mask(kind, keys, window)], [where])
                if n_mask == 0:
                    mask = where  # the blocks' (the other, Gemma-2's, is the same size)
                else:
                    model_locals.append(where)
        masked = [i for i in range(b.layers) if self.sdpa_masked(i)] if kernel != "eager" else []
        if masked:
            # sdpa_mask (masking_utils.py): the boolean mask itself, expanded to the batch
            keys = self.seq + self.layer_cached[masked[0]]
            # each masked layer's attention_mask argument (so a checkpointed layer keeps it
            # for its recompute: the hf5 Phi-3 Trainer trace, held into the backward)
            mask = self._bool_mask("sliding window mask", keys, self.windows[masked[0]])
        if gpt2:  # GPT2Model.forward: `hidden_states = self.drop(hidden_states)`, after the mask
            x = o.dropout("embedding dropout", x, b.embd_dropout if self.training else 0)
        cos = sin = None
        if not gpt2:  # LlamaRotaryEmbedding.forward: fp32 with autocast off, then x.dtype
            seq = self.positions
            hd = b.head_dim
            # freqs = inv_freq_expanded.float() @ position_ids_expanded.float(): a bmm, the
            # step's first matmul (cuBLAS makes its workspace here, after the output)
            freqs = Tensor("RoPE frequencies", seq * hd // 2, DType.fp32)
            bmm = g.node("RoPE inv_freq @ positions", [], [freqs], scratch=[("positions", seq * 4)])
            bmm.matmul = False
            ang = Tensor("RoPE angles", seq * hd, DType.fp32)
            g.node("RoPE angles", [freqs], [ang])  # emb = torch.cat((freqs, freqs), dim=-1)
            cos32 = o.unary("RoPE cos", o.unary("cos", ang))  # emb.cos() * attention_scaling
            sin32 = o.unary("RoPE sin", o.unary("sin", ang))
            cos, sin = o.cast(cos32, x.dtype, "cos"), o.cast(sin32, x.dtype, "sin")
            o.keep(freqs, ang, cos32, sin32)  # the rotary forward's locals, to its return
            model_locals += [cos, sin]
        # sequence parallel: the first layer splits the embedding's output to this rank's
        # rows (``block``), the final norm runs on them and lm_head gathers them back
        for i in range(b.layers):
            x = self.block(i, x, cos, sin, mask)
        if mask is not None:
            # the base model's local causal_mask, to its return (after the final norm; a
            # CPU dispatch log of the real models' forwards, tests/test_hf_inference_oracle.py)
            model_locals.append(mask)
        if not self.head:  # a first pipeline stage: its output goes to the next stage
            o.keep(*model_locals)
            return x, x
        self._seq_sharded = self.sp > 1
        x = self.norm("transformer.ln_f" if gpt2 else "model.norm", x)
        self._seq_sharded = False
        o.keep(*model_locals)
        hidden = x  # ForCausalLM's `hidden_states = outputs.last_hidden_state`, to its return
        x = self.gather("lm_head input", x, "")
        if not self.all_logits:
            x = o.slice(x, self.batch * h, "last position")
        logits = o.linear(
            "lm_head", x, self.p("lm_head.weight"), None, b.vocab, component=Component.logits
        )
        if b.final_softcap:
            logits = o.scalar("logits / softcap", logits)
            logits = o.unary("tanh(logits)", logits, saves="output")
            logits = o.scalar("logits * softcap", logits)
        for t_ in (logits,):
            t_.component = Component.logits
        if labels is None:
            o.keep(hidden)
            return logits, None
        o.prefix = ""
        # ForCausalLMLoss: logits.float(), labels padded and shifted, cross-entropy
        up = o.cast(logits, DType.fp32, "fp32 logits")
        up.component = Component.logits
        padded = Tensor("padded labels", self.batch * (self.seq + 1), DType.int64)
        g.node("pad labels", [labels], [padded])
        shifted = Tensor("shifted labels", n, DType.int64)
        g.node("shift labels", [padded], [shifted])
        loss = o.cross_entropy(up, shifted)
        o.keep(hidden)
        o.keep(logits)  # the model returns its logits: alive until the outputs are dropped
        return logits, loss


def warmup_bytes(model: Model) -> int:
    """What ``from_pretrained``'s ``caching_allocator_warmup`` allocates (and frees) before a
    quantized model loads (transformers 5.17, modeling_utils.py): ``get_total_byte_count``
    sums each parameter once (tied ones skipped) at the quantizer's element size, 0.5 or 1
    byte for a bitsandbytes-quantized weight and the load dtype's size otherwise, and
    ``torch.empty(byte_count // 2, dtype=float16)`` is made of it. Not modelled: its cap at
    the device's memory less 1.2 GiB, and its shrinking when reserved memory is free."""
    assert model.quant is not None
    per_weight = 1.0 if model.quant.kind.value == "int8" else 0.5
    count = 0.0
    for name, numel in param_shapes(model.b):
        quantized = name.removesuffix(".weight") in model.quantized and name.endswith(".weight")
        count += numel * (per_weight if quantized else model.weight.size)
    return 2 * int(count // 2)


def cache_windows(spec: ModelSpec) -> list[int | None]:
    """Each layer's sliding window (None: full attention). A config with ``sliding_window``
    and no ``layer_types`` makes every layer sliding; Gemma-2 alternates, sliding first
    (``get_layer_types_and_kwargs`` in transformers/cache_utils.py, Gemma2Config)."""
    every = spec.sliding_window_every
    return [
        spec.sliding_window if (every == 1 or (i + 1) % every) else None for i in range(spec.layers)
    ]


def cache_dtype(b: Block, w: Workload) -> DType:
    """The DynamicCache's dtype: the key states'. Under autocast a rotary model's keys are
    fp32 (cos/sin are the fp32 hidden states' dtype); GPT-2's are the matmul's 16 bits."""
    autocast = AUTOCAST_DTYPE.get(w.precision)
    if autocast is None:
        return WEIGHT_DTYPE[w.precision]
    return DType.fp32 if b.learned_positions == 0 else autocast


def build(
    spec: ModelSpec,
    w: Workload,
    *,
    grad: bool,
    batch: int,
    seq: int,
    cached: int = 0,
    all_logits: bool = True,
    use_cache: bool | None = None,
    generate: bool = False,
    layer_cached: list[int] | None = None,
    head: bool = True,
    sp: int = 1,
    tp: int = 1,
) -> tuple[Graph, Model, Tensor, Tensor | None]:
    """The graph of one forward of ``spec``: (graph, model, logits, loss or None). Without
    ``head`` (a first pipeline stage) the graph stops at the last block, whose output stands
    for both."""
    b = resolve(spec)
    # without grad, transformers runs under torch.no_grad (generate's decorator; an eval
    # forward as users and vramfit measure call it), not inference_mode
    g = Graph(grad=grad, inference_mode=False)
    if use_cache is None:  # the config default (True), which the Trainer turns off
        use_cache = not (grad and (w.loop is Loop.trainer or w.checkpointing is Checkpointing.full))
    m = Model(
        b,
        w,
        g,
        batch=batch,
        seq=seq,
        cached=cached,
        use_cache=use_cache,
        all_logits=all_logits,
        batched_positions=generate,
        layer_cached=layer_cached,
        spec=spec,
    )
    m.head = head
    m.sp = sp
    m.tp = tp
    ids = g.leaf(
        "input ids", batch * seq, DType.int64, requires_grad=False, component=Component.activations
    )
    labels = None
    if grad:
        labels = g.leaf(
            "labels", batch * seq, DType.int64, requires_grad=False, component=Component.activations
        )
    if cached:  # the DynamicCache as earlier steps left it: K and V per layer
        dt = cache_dtype(b, w)
        past = []
        for i in range(b.layers):
            pair = tuple(
                Tensor(
                    f"block {i} cached {x}",
                    batch * m.layer_cached[i] * b.kv_width,
                    dt,
                    component=Component.kv_cache,
                )
                for x in ("keys", "values")
            )
            m.past.append(pair)  # type: ignore[arg-type]
            past += pair
        g.node("KV cache so far", [], past)
    logits, loss = m.forward(ids, labels)
    return g, m, logits, loss
