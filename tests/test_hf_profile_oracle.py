"""The hf profile against the real transformers modules: what one block saves for backward.

Each case builds a tiny transformers model on the CPU, runs a training forward under
``torch.autograd.graph.saved_tensors_hooks`` and records every tensor autograd packs while
block 0 runs (parameters excluded: they are the model's, not the step's). The profile's graph
for the same configuration lists what block 0's nodes save. Both sides are compared as the
multiset of (elements, dtype) of distinct storages: count, sizes and dtypes must agree.
Eager attention and no dropout, where the CPU runs the same ops as CUDA (SDPA picks
device-specific kernels, and CPU dropout masks are float tensors).
"""

from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vramfit.config import RunSpec  # noqa: E402
from vramfit.estimate.profiles import hf  # noqa: E402

B, S = 2, 16
TINY = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128, "ffn": 176}
MODELS = {
    "gpt2": {"arch": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "vocab": 128,
             "max_positions": 64, "resid_dropout": 0, "embd_dropout": 0, "attention_dropout": 0},
    "llama": {"arch": "llama", **TINY},
    "qwen2": {"arch": "llama", "model_type": "qwen2", "qkv_bias": True, "tied": True, **TINY},
    "mistral": {"arch": "llama", "model_type": "mistral", **TINY},
    "phi3": {"arch": "llama", "model_type": "phi3", **TINY},
    "gemma2": {"arch": "llama", "model_type": "gemma2", "head_dim": 16, "tied": True,
               "norms_per_layer": 4, "sliding_window": 4096, "sliding_window_every": 2, **TINY},
}
DTYPES = {"fp32": (torch.float32, "fp32"), "bf16": (torch.bfloat16, "bf16")}
TORCH_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                     torch.int64: "int64", torch.bool: "bool", torch.uint8: "uint8"}
TORCH_DTYPES = {name: dtype for dtype, name in TORCH_DTYPE_NAMES.items()}


def _run(model_type: str, precision: str) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": MODELS[model_type],
            "workload": {"impl": "hf", "loop": "drops", "batch": B, "seq": S,
                         "precision": precision, "attention": "eager", "optimizer": "adamw"},
        }
    )


def _real_saved(run: RunSpec) -> Counter:
    """(elements, dtype) of each distinct storage autograd saves while block 0 runs."""
    from vramfit.measure.hf import hf_config

    spec = run.model.resolved()
    torch.manual_seed(0)
    cfg = hf_config(spec, run.workload)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model = model.to(DTYPES[run.workload.precision.value][0]).train()
    blocks = model.transformer.h if spec.model_type.value == "gpt2" else model.model.layers
    return _block0_saves(model, blocks[0], spec.vocab)


def _block0_saves(model: torch.nn.Module, block: torch.nn.Module, vocab: int) -> Counter:
    """Run one training forward and backward of ``model`` and count what autograd packs
    while ``block`` runs, parameters excluded. The parameters' storages are read at each
    pack: bitsandbytes' Linear4bit replaces a bias's data with a cast to the compute dtype
    in its first forward, and the freed fp32 storage's address is then reused."""
    active = {"on": False}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if active["on"] and ptr not in {p.untyped_storage().data_ptr() for p in model.parameters()}:
            seen[ptr] = (t.untyped_storage().nbytes() // t.element_size(),
                         TORCH_DTYPE_NAMES[t.dtype])
        return t

    block.register_forward_pre_hook(lambda *_: active.update(on=True))
    block.register_forward_hook(lambda *_: active.update(on=False))
    ids = torch.randint(0, vocab, (B, S))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return Counter(seen.values())


def _profile_saved(run: RunSpec) -> Counter:
    """The same, from the hf profile's graph: what block 0's nodes save."""
    graph, _, _, _ = hf.build(run.model, run.workload, grad=True, batch=B, seq=S)
    seen: dict[int, tuple[int, str]] = {}
    for node in graph.nodes:
        if not node.name.startswith("block 0 "):
            continue
        for t in node.saved:
            root = t.root
            if not root.leaf:
                seen[id(root)] = (root.numel, root.dtype.value)
    return Counter(seen.values())


@pytest.mark.parametrize("precision", sorted(DTYPES))
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_block_saves_what_transformers_saves(model_type: str, precision: str) -> None:
    run = _run(model_type, precision)
    real, predicted = _real_saved(run), _profile_saved(run)
    if model_type == "gpt2" and precision == "bf16":
        # the CPU's native_layer_norm keeps its per-row mean and rstd in the input's dtype;
        # CUDA's in fp32 (the H200 trace, benchmarks/data/h200-hf-ops), which the profile follows
        rows = real.pop((B * S, "bf16"), 0)
        real[(B * S, "fp32")] += rows
    assert predicted == real, (
        f"profile only: {predicted - real}; transformers only: {real - predicted}"
    )


WINDOWED = {  # sliding-window models: every layer sliding (Phi-3, Mistral), or alternating
    "phi3": {**MODELS["phi3"], "sliding_window": S},
    "mistral": {**MODELS["mistral"], "sliding_window": S},
    "gemma2": {**MODELS["gemma2"], "sliding_window": S},
}


def _sdpa_run(model_type: str, seq: int, precision: str = "bf16") -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": WINDOWED[model_type],
            "workload": {"impl": "hf", "loop": "drops", "batch": B, "seq": seq,
                         "precision": precision, "optimizer": "adamw"},
        }
    )


@pytest.mark.parametrize("seq", [S - 1, S, S + 3])
@pytest.mark.parametrize("model_type", sorted(WINDOWED))
def test_sdpa_gets_a_mask_where_the_profile_says(
    model_type: str, seq: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which layers transformers hands SDPA an explicit mask (the sliding window reached),
    and what SDPA keeps of it: a dense float copy of the (batch, 1, q, kv) mask per layer."""
    from transformers.integrations import sdpa_attention
    from transformers.modeling_utils import AttentionInterface

    from vramfit.measure.hf import hf_config

    run = _sdpa_run(model_type, seq)
    spec = run.model.resolved()
    masked: list[bool] = []

    def probe(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN003
        masked.append(attention_mask is not None)
        return sdpa_attention.sdpa_attention_forward(
            module, query, key, value, attention_mask, **kwargs
        )

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", probe)
    torch.manual_seed(0)
    cfg = hf_config(spec, run.workload)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = model.to(torch.bfloat16).train()
    saved: set[tuple[int, str]] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.add((t.untyped_storage().nbytes() // t.element_size(), TORCH_DTYPE_NAMES[t.dtype]))
        return t

    ids = torch.randint(0, spec.vocab, (B, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)

    graph, _, _, _ = hf.build(run.model, run.workload, grad=True, batch=B, seq=seq)
    converts = {node.name.split()[1] for node in graph.nodes
                if node.name.endswith(" attention mask to float")}
    predicted = [str(i) in converts for i in range(spec.layers)]
    assert predicted == masked
    assert ((B * seq * seq, "bf16") in saved) == any(masked)


def test_sdpa_ignores_gemma2_attention_softcapping() -> None:
    """transformers' SDPA path takes Gemma-2's ``softcap`` in ``**kwargs`` and drops it, so
    the profile caps the scores only in eager attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    q, k, v = (torch.randn(1, 2, 8, 4) * 30 for _ in range(3))
    capped, _ = sdpa_attention_forward(module, q, k, v, None, softcap=0.5, scaling=1.0)
    plain, _ = sdpa_attention_forward(module, q, k, v, None, scaling=1.0)
    assert torch.equal(capped, plain)
    for attention, capping in (("eager", True), ("sdpa", False)):
        workload = {"impl": "hf", "batch": B, "seq": S, "precision": "fp32", "attention":
                    "eager" if attention == "eager" else "flash", "optimizer": "adamw"}
        run = RunSpec.model_validate({"model": MODELS["gemma2"], "workload": workload})
        graph, _, _, _ = hf.build(run.model, run.workload, grad=True, batch=B, seq=S)
        assert any("tanh(scores)" in node.name for node in graph.nodes) is capping


ADAPTED = {  # peft's defaults where it has them, the fused projections for Phi-3
    "llama": None, "gemma2": None, "qwen2": None, "mistral": None,
    "phi3": ["qkv_proj", "o_proj"],
}


def _adapted_saved(run: RunSpec, targets: list[str] | str | None) -> Counter:
    """What block 0 saves in a real peft model: LoRA on bf16 weights, or QLoRA (bitsandbytes
    4-bit weights loaded by from_pretrained, prepare_model_for_kbit_training, then LoRA)."""
    import tempfile
    import warnings

    peft = pytest.importorskip("peft")
    from vramfit.measure.hf import hf_config

    spec = run.model.resolved()
    torch.manual_seed(0)
    cfg = hf_config(spec, run.workload)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    weights = TORCH_DTYPES[run.workload.precision.value]
    model = model.to(weights)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
        warnings.simplefilter("ignore")
        quant = run.workload.quant
        if quant is not None:
            pytest.importorskip("bitsandbytes")
            model.save_pretrained(folder)
            config = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant.kind.value,
                bnb_4bit_compute_dtype=TORCH_DTYPES[quant.compute_dtype.value],
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=config, dtype=weights, device_map="cpu",
                attn_implementation="eager",
            )
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))
    return _block0_saves(model.train(), model.base_model.model.model.layers[0], spec.vocab)


@pytest.mark.parametrize("quant", [None, "nf4", "fp4"])
@pytest.mark.parametrize("targets", ["default", "all-linear"])
@pytest.mark.parametrize("model_type", sorted(ADAPTED))
def test_adapted_block_saves_what_peft_and_bitsandbytes_save(
    model_type: str, targets: str, quant: str | None
) -> None:
    """LoRA adapters (fp32, their input cast and their own saves) and QLoRA's fp32 hidden
    states (kbit preparation) with its 4-bit linears (compute-dtype input, dequantized weight
    kept outside autograd's hooks): the same multiset as the real modules'."""
    chosen = ADAPTED[model_type] if targets == "default" else "all-linear"
    _assert_adapted_saves(model_type, chosen, quant)


@pytest.mark.parametrize(
    ("precision", "compute"), [("fp16", "fp16"), ("fp32", "bf16"), ("bf16", "fp16")]
)
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_qlora_block_saves_in_other_dtypes(model_type: str, precision: str, compute: str) -> None:
    """The same for fp16 and fp32 base weights and an fp16 compute dtype (a T4's QLoRA)."""
    _assert_adapted_saves(model_type, None, "nf4", precision=precision, compute=compute)


def _assert_adapted_saves(
    model_type: str,
    targets: list[str] | str | None,
    quant: str | None,
    *,
    precision: str = "bf16",
    compute: str = "bf16",
) -> None:
    """Rank-4 LoRA on ``targets`` (None: peft's default), over ``quant`` weights if any:
    block 0's saves in the profile equal the real modules'."""
    workload = {"impl": "hf", "loop": "drops", "batch": B, "seq": S, "precision": precision,
                "attention": "eager", "optimizer": "adamw",
                "lora": {"r": 4, **({"targets": targets} if targets else {})}}
    if quant:
        workload["quant"] = {"kind": quant, "compute_dtype": compute}
    run = RunSpec.model_validate({"model": MODELS[model_type], "workload": workload})
    real, predicted = _adapted_saved(run, targets), _profile_saved(run)
    assert predicted == real, (
        f"profile only: {predicted - real}; transformers only: {real - predicted}"
    )
