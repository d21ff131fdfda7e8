"""Reference GPT-2 and Llama decoders in plain torch, mirroring Hugging Face's modeling code.

One ``Decoder`` covers both families; the generic ``ModelSpec`` fields pick the parts
(``norm``: LayerNorm or RMSNorm, ``mlp``: GELU or SwiGLU, ``positions``: learned table or
RoPE, ``bias`` / ``qkv_bias``, ``head_dim``, GQA through ``kv_heads``). ``arch`` only decides
the q/k/v layout: GPT-2 uses one fused projection (HF ``c_attn``), Llama three
(``q_proj``/``k_proj``/``v_proj``); both hold the same parameters. No dropout anywhere.

Mirrors, with their sources:
- GPT-2 block: HF ``modeling_gpt2.py`` (``GPT2Block``: ln_1 -> attn -> residual, ln_2 -> MLP
  with ``gelu_new`` = tanh GELU -> residual; ``ln_f``; lm_head tied to ``wte``).
- Llama block: HF ``modeling_llama.py`` (``LlamaDecoderLayer``; ``rotate_half`` /
  ``apply_rotary_pos_emb``; ``repeat_kv``; ``LlamaMLP`` = down(silu(gate(x)) * up(x))).
- Loss: HF ``ForCausalLMLoss`` upcasts logits to fp32 before cross-entropy.

Choices where HF offers several (kept fixed so measurements are predictable):
- Eager attention: ``softmax(q @ k^T * scale)`` with no explicit dtype, then ``.to(v.dtype)``,
  as HF GPT-2's eager path does. Under autocast, softmax is on autocast's fp32 list, so the
  probabilities come out fp32 and are cast back; in pure bf16/fp16 they stay 16-bit.
  (HF Llama's eager path always upcasts softmax to fp32; we do not.)
- RoPE cos/sin are computed in fp32 with autocast off and cast to the compute dtype (the
  autocast dtype under AMP, else the weights' dtype), so rotated q/k stay in that dtype.
  (HF casts them to the hidden states' dtype, which is fp32 under AMP.)
- ``repeat_kv`` runs inside the attention core, as in HF's attention functions, so a
  selectively checkpointed core saves only the un-repeated K/V.
"""

from __future__ import annotations

import functools
from typing import Any

from vramfit.config import (
    Arch,
    Attention,
    Checkpointing,
    Mlp,
    ModelSpec,
    Norm,
    Positions,
    Workload,
)
from vramfit.errors import VramfitError
from vramfit.measure.backend import import_torch

ROPE_THETA = 10_000.0  # Llama / Llama-2 rope_theta (HF LlamaConfig default)
NORM_EPS = 1e-5  # GPT-2 layer_norm_epsilon; Llama-2 rms_norm_eps
INIT_STD = 0.02  # GPT-2 / Llama initializer_range


def check_measurable(spec: ModelSpec) -> None:
    """Raise VramfitError for architectures the reference models do not implement."""
    if spec.norms_per_layer != 2 or spec.experts > 1:
        raise VramfitError("measure supports dense models with 2 norms per layer", field="--preset")


@functools.cache
def _modules() -> Any:
    """Define the nn.Module classes on first use (torch is imported lazily)."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    class FallbackRMSNorm(nn.Module):
        """nn.RMSNorm for torch < 2.4: weight only (Zhang & Sennrich 2019)."""

        def __init__(self, hidden: int, eps: float) -> None:
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(hidden))

        def forward(self, x: Any) -> Any:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    rms_norm_class = getattr(nn, "RMSNorm", FallbackRMSNorm)
    norm_types = (nn.LayerNorm, rms_norm_class)

    def make_norm(spec: ModelSpec) -> Any:
        if spec.norm is Norm.layernorm:
            return nn.LayerNorm(spec.hidden, eps=NORM_EPS)  # weight + bias (GPT-2 ln_*)
        return rms_norm_class(spec.hidden, eps=NORM_EPS)

    def autocast_dtype(device_type: str) -> Any:
        try:
            if torch.is_autocast_enabled(device_type):
                return torch.get_autocast_dtype(device_type)
            return None
        except (TypeError, AttributeError):  # torch < 2.4: per-device functions
            if device_type == "cuda" and torch.is_autocast_enabled():
                return torch.get_autocast_gpu_dtype()
            if device_type == "cpu" and torch.is_autocast_cpu_enabled():
                return torch.get_autocast_cpu_dtype()
            return None

    def rotate_half(x: Any) -> Any:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def repeat_kv(x: Any, groups: int) -> Any:
        """(b, kv_heads, s, hd) -> (b, kv_heads * groups, s, hd), as HF ``repeat_kv``."""
        if groups == 1:
            return x
        b, kv_heads, s, hd = x.shape
        return x[:, :, None].expand(b, kv_heads, groups, s, hd).reshape(b, kv_heads * groups, s, hd)

    class SelfAttention(nn.Module):
        def __init__(self, spec: ModelSpec, workload: Workload) -> None:
            super().__init__()
            assert spec.heads and spec.kv_heads and spec.head_dim
            self.heads, self.kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
            self.groups = spec.heads // spec.kv_heads
            self.scale = spec.head_dim**-0.5
            self.eager = workload.attention is Attention.eager
            self.selective = workload.checkpointing is Checkpointing.selective
            q_width, kv_width = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
            qkv_bias = bool(spec.bias or spec.qkv_bias)
            self.fused = spec.arch is Arch.gpt2
            if self.fused:  # GPT-2 c_attn: one projection to q, k and v
                self.widths = [q_width, kv_width, kv_width]
                self.c_attn = nn.Linear(spec.hidden, q_width + 2 * kv_width, bias=qkv_bias)
            else:
                self.q_proj = nn.Linear(spec.hidden, q_width, bias=qkv_bias)
                self.k_proj = nn.Linear(spec.hidden, kv_width, bias=qkv_bias)
                self.v_proj = nn.Linear(spec.hidden, kv_width, bias=qkv_bias)
            self.o_proj = nn.Linear(q_width, spec.hidden, bias=bool(spec.bias))

        def core(self, q: Any, k: Any, v: Any, mask: Any, causal: bool) -> Any:
            """softmax(q k^T / sqrt(hd)) v over (b, heads, s, hd) tensors."""
            k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
            if not self.eager:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
            if causal:
                scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
            probs = F.softmax(scores, dim=-1).to(v.dtype)
            return torch.matmul(probs, v)

        def forward(self, x: Any, rope: Any, mask: Any, cache: Any = None, pos: int = 0) -> Any:
            b, s, _ = x.shape
            if self.fused:
                q, k, v = self.c_attn(x).split(self.widths, dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            if rope is not None:  # HF apply_rotary_pos_emb
                cos, sin = rope
                q = q * cos + rotate_half(q) * sin
                k = k * cos + rotate_half(k) * sin
            causal = True
            if cache is not None:  # static cache: (b, kv_heads, max_len, hd) per layer
                k_cache, v_cache = cache
                k_cache[:, :, pos : pos + s] = k
                v_cache[:, :, pos : pos + s] = v
                if pos > 0:
                    assert s == 1, "decode feeds one token at a time"
                    k, v = (
                        k_cache[:, :, : pos + s].to(q.dtype),
                        v_cache[:, :, : pos + s].to(q.dtype),
                    )
                    causal = False  # the one new token attends to every cached position
            if self.selective and self.training and torch.is_grad_enabled():
                out = checkpoint(self.core, q, k, v, mask, causal, use_reentrant=False)
            else:
                out = self.core(q, k, v, mask, causal)
            out = out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
            return self.o_proj(out)

    class GeluMlp(nn.Module):
        """GPT-2 MLP: c_fc -> GELU(tanh) -> c_proj."""

        def __init__(self, spec: ModelSpec) -> None:
            super().__init__()
            assert spec.ffn
            self.c_fc = nn.Linear(spec.hidden, spec.ffn, bias=bool(spec.bias))
            self.act = nn.GELU(approximate="tanh")
            self.c_proj = nn.Linear(spec.ffn, spec.hidden, bias=bool(spec.bias))

        def forward(self, x: Any) -> Any:
            return self.c_proj(self.act(self.c_fc(x)))

    class SwigluMlp(nn.Module):
        """Llama MLP: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

        def __init__(self, spec: ModelSpec) -> None:
            super().__init__()
            assert spec.ffn
            self.gate_proj = nn.Linear(spec.hidden, spec.ffn, bias=bool(spec.bias))
            self.up_proj = nn.Linear(spec.hidden, spec.ffn, bias=bool(spec.bias))
            self.down_proj = nn.Linear(spec.ffn, spec.hidden, bias=bool(spec.bias))

        def forward(self, x: Any) -> Any:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        """Pre-norm block: x + attn(norm_1(x)), then x + mlp(norm_2(x))."""

        def __init__(self, spec: ModelSpec, workload: Workload) -> None:
            super().__init__()
            self.norm_1 = make_norm(spec)
            self.attn = SelfAttention(spec, workload)
            self.norm_2 = make_norm(spec)
            self.mlp = GeluMlp(spec) if spec.mlp is Mlp.gelu else SwigluMlp(spec)

        def forward(self, x: Any, rope: Any, mask: Any, cache: Any = None, pos: int = 0) -> Any:
            x = x + self.attn(self.norm_1(x), rope, mask, cache, pos)
            return x + self.mlp(self.norm_2(x))

    class Decoder(nn.Module):
        """Embeddings -> blocks -> final norm -> lm_head."""

        def __init__(self, spec: ModelSpec, workload: Workload) -> None:
            super().__init__()
            assert spec.vocab and spec.head_dim
            self.spec = spec
            self.vocab = spec.vocab
            self.embed = nn.Embedding(spec.vocab, spec.hidden)
            self.learned = spec.positions is Positions.learned
            if self.learned:
                assert spec.max_positions
                self.positions = nn.Embedding(spec.max_positions, spec.hidden)
            self.blocks = nn.ModuleList(Block(spec, workload) for _ in range(spec.layers))
            self.norm_f = make_norm(spec)
            self.lm_head = nn.Linear(spec.hidden, spec.vocab, bias=False)
            if spec.tied:
                self.lm_head.weight = self.embed.weight
            self.eager = workload.attention is Attention.eager
            self.full_checkpoint = workload.checkpointing is Checkpointing.full

        def num_params(self) -> int:
            """Unique parameters (a tied lm_head counts once)."""
            return sum(p.numel() for p in self.parameters())

        def _rope(self, pos: int, s: int, device: Any, dtype: Any) -> Any:
            """HF LlamaRotaryEmbedding: cos/sin of position x inv_freq, computed in fp32."""
            hd = self.spec.head_dim
            with torch.autocast(device.type, enabled=False):
                steps = torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd
                inv_freq = 1.0 / (ROPE_THETA**steps)
                t = torch.arange(pos, pos + s, device=device, dtype=torch.float32)
                freqs = torch.outer(t, inv_freq)
                emb = torch.cat((freqs, freqs), dim=-1)
                return emb.cos().to(dtype), emb.sin().to(dtype)

        def forward(self, idx: Any, targets: Any = None, *, cache: Any = None, pos: int = 0) -> Any:
            """With ``targets``: the mean cross-entropy loss. Without: logits of the last
            position only, (b, 1, vocab), as HF ``generate`` computes them."""
            b, s = idx.shape
            x = self.embed(idx)
            if self.learned:
                x = x + self.positions(torch.arange(pos, pos + s, device=idx.device))
            rope = None
            if not self.learned:
                dtype = autocast_dtype(idx.device.type) or self.embed.weight.dtype
                rope = self._rope(pos, s, idx.device, dtype)
            mask = None
            if self.eager and pos == 0:  # built once per forward, shared by every layer
                mask = torch.ones(s, s, dtype=torch.bool, device=idx.device).triu(1)
            recompute = self.full_checkpoint and self.training and torch.is_grad_enabled()
            for i, block in enumerate(self.blocks):
                if recompute:
                    x = checkpoint(block, x, rope, mask, use_reentrant=False)
                else:
                    x = block(x, rope, mask, None if cache is None else cache[i], pos)
            x = self.norm_f(x)
            if targets is None:
                return self.lm_head(x[:, -1:])
            logits = self.lm_head(x)
            return F.cross_entropy(logits.float().view(-1, self.vocab), targets.view(-1))

    def init_weights(model: Any) -> None:
        """GPT-2 / Llama init: normal(0, 0.02) matrices and embeddings, zero biases, unit norms."""
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.normal_(0.0, INIT_STD)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
                if isinstance(module, norm_types):
                    module.weight.fill_(1.0)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()

    return type("Modules", (), {"Decoder": Decoder, "init_weights": staticmethod(init_weights)})


def build_model(spec: ModelSpec, workload: Workload, device: str, dtype: Any) -> Any:
    """Build the reference model for ``spec`` on ``device`` with weights in ``dtype``.

    Built on the meta device, cast, then materialised with ``to_empty`` and initialised in
    place, so a 7B model never needs fp32 host memory. A tied lm_head is re-tied to the
    embedding after materialising (``to_empty`` may give it its own storage).
    """
    torch = import_torch()
    spec = spec.resolved()
    check_measurable(spec)
    if spec.positions is Positions.rope and (spec.head_dim or 0) % 2:
        raise VramfitError("RoPE needs an even head_dim", field="head_dim")
    modules = _modules()
    with torch.device("meta"):
        model = modules.Decoder(spec, workload)
    model.to(dtype)
    model.to_empty(device=device)
    if spec.tied:
        model.lm_head.weight = model.embed.weight
        assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    modules.init_weights(model)
    return model
