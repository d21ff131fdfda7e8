"""vramfit.estimate.finetune against the real libraries, on the CPU.

peft's own parameter count of a Hugging Face model built from a published config.json on the
meta device; the tensors a real bitsandbytes QuantState / Int8Params holds after quantizing on
the CPU; the state a real bitsandbytes optimizer creates in ``step()``. Skipped cleanly when
torch, transformers, peft or bitsandbytes is absent.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from live_bytes import LiveBytes  # noqa: E402
from vramfit.config import (  # noqa: E402
    TRAINER_OPTIM,
    FinetuneSpec,
    Lora,
    ModelSpec,
    Optimizer,
    Quant,
    trainer_optim_name,
)
from vramfit.estimate.finetune import (  # noqa: E402
    StateOptimizer,
    lora_tensors,
    optimizer_state,
    optimizer_step_temporary_bytes,
    quantized_weight_tensors,
    trainable_and_total,
    weight_storage,
)
from vramfit.hf import spec_from_hf_config  # noqa: E402

HF = Path(__file__).resolve().parent / "fixtures" / "hf"

# published config.json files (tests/fixtures/hf) plus TinyLlama-1.1B's shape
TINYLLAMA = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
MODELS = [
    "Meta-Llama-3-8B",
    "Llama-2-7b-hf",
    "Mistral-7B-v0.1",
    "Qwen2.5-7B",
    "gemma-2b",
    "gemma-2-9b",
    "Phi-3-mini-4k-instruct",
    "gpt2",
    "TinyLlama",
]
EXPLICIT = {
    "phi3": ["qkv_proj", "down_proj"],
    "gpt2": ["c_proj"],  # attn.c_proj and mlp.c_proj both end with it
}
LLAMA_EXPLICIT = ["k_proj", "o_proj", "down_proj"]


def _config_dict(name: str, layers: int | None = None) -> dict[str, Any]:
    """The config of ``name``; with ``layers``, cut to that many decoder layers."""
    if name == "TinyLlama":
        data = dict(TINYLLAMA)
    else:
        data = json.loads((HF / name / "config.json").read_text())
    if layers is not None:
        data["n_layer" if data["model_type"] == "gpt2" else "num_hidden_layers"] = layers
    return data


# Adapters are per decoder layer and every layer of these models has the same linear
# shapes, so two layers hold all that peft's count depends on (and build ~15x faster on
# the meta device than 32); the published depths are checked by test_measure_models
LAYERS = 2
_META_MODELS: dict[str, Any] = {}


def _meta_model(name: str) -> Any:
    """A fresh copy of the Hugging Face model of ``name``, built on the meta device."""
    if name not in _META_MODELS:
        data = _config_dict(name, layers=LAYERS)
        config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
        with torch.device("meta"):
            _META_MODELS[name] = transformers.AutoModelForCausalLM.from_config(config)
    return copy.deepcopy(_META_MODELS[name])


def _spec(name: str, tmp_path: Path) -> ModelSpec:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_config_dict(name, layers=LAYERS)))
    return spec_from_hf_config(path)


def _peft(model: Any, r: int, targets: list[str] | str | None, meta: bool = False) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D: "Setting fan_in_fan_out to True"
        # low_cpu_mem_usage: the adapters are created on the meta device, not initialised
        return peft.get_peft_model(
            model, peft.LoraConfig(r=r, target_modules=targets), low_cpu_mem_usage=meta
        )


def _targets(model_type: str, kind: str) -> list[str] | str | None:
    if kind == "default":
        return None
    if kind == "all-linear":
        return "all-linear"
    return EXPLICIT.get(model_type, LLAMA_EXPLICIT)


@pytest.mark.parametrize("r", [8, 64])
@pytest.mark.parametrize("kind", ["default", "all-linear", "explicit"])
@pytest.mark.parametrize("name", MODELS)
def test_counts_and_adapter_shapes_equal_peft(name: str, kind: str, r: int, tmp_path: Path) -> None:
    model_type = _config_dict(name)["model_type"]
    targets = _targets(model_type, kind)
    lora = Lora(r=r, targets=targets, model_type=model_type)
    spec = _spec(name, tmp_path)
    if model_type == "phi3" and targets is None:
        # peft has no default for phi3 and refuses; so does the config
        with pytest.raises(ValueError, match="Please specify `target_modules`"):
            _peft(_meta_model(name), r, targets, meta=True)
        with pytest.raises(ValueError, match="no default target modules for model_type phi3"):
            FinetuneSpec(model=spec, lora=lora)
        return
    peft_model = _peft(_meta_model(name), r, targets, meta=True)
    assert trainable_and_total(spec, lora, None) == peft_model.get_nb_trainable_parameters()
    # every adapter, in model.parameters() order: (module path, layer, A shape, B shape)
    seen = []
    for full, param in peft_model.named_parameters():
        if ".lora_A." in full or ".lora_B." in full:
            module = full.split(".lora_")[0]
            layer = int(
                module.split(".h.")[-1].split(".")[0]
                if ".h." in module
                else module.split(".layers.")[-1].split(".")[0]
            )
            path = module.split(f".{layer}.", 1)[1]
            seen.append((path, layer, tuple(param.shape)))
    expected = []
    for path, layer, a, b in lora_tensors(spec, lora):
        expected += [(path, layer, a), (path, layer, b)]
    assert seen == expected


# A Llama with odd layer sizes, so that every rounding in the 4-bit packing shows: q, o
# 75 x 75 (5625 elements), k, v 15 x 75, gate, up, down 99 x 75.
ODD = {
    "hidden_size": 75,
    "intermediate_size": 99,
    "num_hidden_layers": 2,
    "num_attention_heads": 5,
    "num_key_value_heads": 1,
    "head_dim": 15,
    "vocab_size": 101,
    "tie_word_embeddings": False,
}
ODD_SPEC = ModelSpec(
    arch="llama", layers=2, hidden=75, heads=5, kv_heads=1, head_dim=15, ffn=99, vocab=101
)
# bitsandbytes' CPU quantize_4bit views the packed bytes as quant_storage
# (backends/default/ops.py), which needs a byte count divisible by its size: a wider storage
# than uint8 is tested on layers of 80 x 80, 16 x 80, 100 x 80 and 80 x 100.
EVEN = {**ODD, "hidden_size": 80, "intermediate_size": 100, "head_dim": 16}
EVEN_SPEC = ModelSpec(
    arch="llama", layers=2, hidden=80, heads=5, kv_heads=1, head_dim=16, ffn=100, vocab=101
)


def _checkpoint(folder: Path, config: dict[str, Any]) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**config), dtype=torch.bfloat16
    )
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("odd-llama"), ODD)


@pytest.fixture(scope="module")
def even_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("even-llama"), EVEN)


def _load_quantized(folder: Path, quant: Quant) -> Any:
    pytest.importorskip("bitsandbytes")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if quant.kind.value == "int8":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        storage = {"uint8": torch.uint8, "int8": torch.int8, **dtypes}[quant.quant_storage.value]
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.kind.value,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=dtypes[quant.compute_dtype.value],
            bnb_4bit_quant_storage=storage,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
        )


QUANTS = [
    Quant(kind="nf4"),
    Quant(kind="nf4", double_quant=True, compute_dtype="bf16"),
    Quant(kind="fp4", quant_storage="bf16"),
    Quant(kind="fp4", double_quant=True, quant_storage="fp32"),
    Quant(kind="int8"),
]


def _state_tensors(param: Any) -> list[tuple[str, int]]:
    """Every tensor behind one quantized weight, named as quantized_weight_tensors names them."""
    data = ("weight", param.data.numel() * param.data.element_size())
    if type(param).__name__ == "Int8Params":
        return [data, ("SCB", param.SCB.numel() * param.SCB.element_size())]
    qs = param.quant_state
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    tensors = [data, ("absmax", nbytes(qs.absmax))]
    if qs.nested:
        tensors += [
            ("nested_absmax", nbytes(qs.state2.absmax)),
            ("nested_code", nbytes(qs.state2.code)),
            ("offset", nbytes(qs.offset)),
        ]
    return tensors + [("code", nbytes(qs.code))]


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.model_dump_json())
def test_quantized_storage_equals_what_bitsandbytes_holds(
    odd_checkpoint: Path, even_checkpoint: Path, quant: Quant
) -> None:
    wide = quant.quant_storage.value not in ("uint8", "int8")
    spec = EVEN_SPEC if wide else ODD_SPEC
    model = _load_quantized(even_checkpoint if wide else odd_checkpoint, quant)
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if type(param).__name__ in ("Params4bit", "Int8Params"):
            module = modules[name.removesuffix(".weight")]
            shape = (module.out_features, module.in_features)
            assert _state_tensors(param) == quantized_weight_tensors(shape, quant), name
    # the whole model, after peft's kbit preparation and the adapters
    model = peft.prepare_model_for_kbit_training(model)
    lora = Lora(r=4, targets="all-linear")
    model = _peft(model, 4, "all-linear")
    real = sum(
        sum(b for _, b in _state_tensors(p))
        if type(p).__name__ in ("Params4bit", "Int8Params")
        else p.numel() * p.element_size()
        for p in model.parameters()
    )
    assert weight_storage(spec, lora, quant, prepared_for_kbit=True).total == real
    assert trainable_and_total(spec, lora, quant) == model.get_nb_trainable_parameters()


def test_kbit_preparation_casts_to_fp32_and_turns_on_checkpointing(even_checkpoint: Path) -> None:
    model = _load_quantized(even_checkpoint, Quant(kind="nf4", quant_storage="bf16"))
    assert not model.is_gradient_checkpointing
    model = peft.prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing
    for name, param in model.named_parameters():
        if type(param).__name__ == "Params4bit":
            assert param.dtype == torch.bfloat16  # the packed storage is left alone
        else:
            assert param.dtype == torch.float32, name
            assert not param.requires_grad


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (300, 70), (1024, 4097)])
def test_quantize_4bit_on_the_cpu(shape: tuple[int, int], blocksize: int) -> None:
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(shape, dtype=torch.bfloat16)
    for double_quant in (False, True):
        packed, state = bnb_functional.quantize_4bit(
            weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
        )
        param = type("P", (), {"data": packed, "quant_state": state})
        quant = Quant(kind="nf4", blocksize=blocksize, double_quant=double_quant)
        assert _state_tensors(param) == quantized_weight_tensors(shape, quant)


SHAPES = [(4095,), (4096,), (300, 70), (64, 1025), (100_000,)]


@pytest.mark.parametrize(
    ("factory", "optimizer"),
    [
        ("AdamW8bit", StateOptimizer.bnb_adamw_8bit),
        ("Adam8bit", StateOptimizer.bnb_adamw_8bit),
        ("PagedAdamW8bit", StateOptimizer.bnb_paged_adamw_8bit),
        ("PagedAdamW32bit", StateOptimizer.bnb_paged_adamw_32bit),
        ("AdamW32bit", StateOptimizer.bnb_paged_adamw_32bit),
    ],
)
def test_bitsandbytes_optimizer_state(factory: str, optimizer: StateOptimizer) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU"
        opt = getattr(bnb.optim, factory)(params)
        opt.step()
    real: list[tuple[int, str, int]] = []
    qmaps: dict[int, int] = {}
    for index, p in enumerate(params):
        for key, value in opt.state[p].items():
            if not torch.is_tensor(value):
                continue
            if key.startswith("qmap"):  # one map per optimizer, shared by every parameter
                qmaps[value.data_ptr()] = value.numel() * value.element_size()
            else:
                real.append((index, key, value.numel() * value.element_size()))
    if qmaps:
        real.append((-1, "qmap1+qmap2", sum(qmaps.values())))
    state = optimizer_state(list(SHAPES), optimizer)
    # on the CPU nothing is paged (get_state_buffer falls back): compare names and bytes
    assert sorted(real) == sorted((i, k, b) for i, k, b, _ in state.tensors)
    assert state.total == sum(b for _, _, b in real)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adafactor_state_as_the_trainer_builds_it(dtype: str) -> None:
    from transformers.optimization import Adafactor

    params = [torch.nn.Parameter(torch.randn(s, dtype=getattr(torch, dtype))) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False)
    opt.step()
    real = sorted(
        (index, key, value.numel() * value.element_size())
        for index, p in enumerate(params)
        for key, value in opt.state[p].items()
        if torch.is_tensor(value)
    )
    state = optimizer_state(list(SHAPES), StateOptimizer.adafactor)
    assert real == sorted((i, k, b) for i, k, b, _ in state.tensors)


# What each optimizer's Trainer name must build (trainer_optimizer.py), as (class, kwargs)
BUILT = {
    Optimizer.adamw: ("torch.AdamW", {}),
    Optimizer.adamw_fused: ("torch.AdamW", {"fused": True}),
    Optimizer.adam_8bit: ("bitsandbytes.AdamW", {"optim_bits": 8, "is_paged": False}),
    Optimizer.paged_adamw_8bit: ("bitsandbytes.AdamW", {"optim_bits": 8, "is_paged": True}),
    Optimizer.paged_adamw_32bit: ("bitsandbytes.AdamW", {"optim_bits": 32, "is_paged": True}),
    Optimizer.adafactor_hf: (
        "transformers.Adafactor", {"scale_parameter": False, "relative_step": False}
    ),
    Optimizer.sgd: ("torch.SGD", {}),
}


@pytest.mark.parametrize("name", sorted(TRAINER_OPTIM))
def test_trainer_optim_names_build_the_mapped_optimizer(name: str, tmp_path: Path) -> None:
    if "bnb" in name or "8bit" in name or "paged" in name:
        pytest.importorskip("bitsandbytes")
    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    assert name in {o.value for o in OptimizerNames}
    args = TrainingArguments(output_dir=str(tmp_path), optim=name, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    mapped = TRAINER_OPTIM[name]
    built, expected = BUILT[mapped]
    assert f"{cls.__module__.split('.')[0]}.{cls.__name__}" == built
    assert {k: kwargs[k] for k in expected} == expected
    for key in ("fused", "foreach"):  # adamw_torch: torch picks foreach on CUDA
        if mapped is Optimizer.adamw:
            assert key not in kwargs
    if mapped is Optimizer.adafactor_hf:
        assert kwargs.get("beta1") is None  # no exp_avg
    # the Trainer name measure --impl hf passes for this optimizer builds the same class
    back = TrainingArguments(
        output_dir=str(tmp_path), optim=trainer_optim_name(mapped), report_to=[]
    )
    assert Trainer.get_optimizer_cls_and_kwargs(back)[0] is cls


def test_adapters_are_fp32_on_a_bf16_model() -> None:
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**ODD), dtype=torch.bfloat16
    )
    model = _peft(model, 4, None)
    dtypes = {
        n.split(".lora_")[1].split(".")[0]: p.dtype
        for n, p in model.named_parameters()
        if ".lora_" in n
    }
    assert dtypes == {"A": torch.float32, "B": torch.float32}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adafactor_step_temporaries(dtype: str) -> None:
    """The largest transient of Adafactor.step, measured op by op on the CPU."""
    from transformers.optimization import Adafactor

    shapes = [(4095,), (64, 1025)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=getattr(torch, dtype))) for s in shapes]
    opt = Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False)
    for _ in range(2):  # the first step creates the state; the second is measured
        for p in params:
            p.grad = torch.randn_like(p)
        tracker = LiveBytes()
        with tracker.mode:
            opt.step()
    expected = optimizer_step_temporary_bytes(
        shapes, StateOptimizer.adafactor, param_bytes=torch.finfo(params[0].dtype).bits // 8
    )
    # besides the full-size fp32 tensors: row/column means and factors (64 + 1025 fp32 each,
    # a few at once) and 0-dim scalars
    small = 8 * (64 + 1025) * 4
    assert expected <= tracker.peak <= expected + small


GPT2_TINY = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 101, "n_positions": 32}


@pytest.mark.parametrize(
    "quant", [Quant(kind="nf4", double_quant=True), Quant(kind="int8")], ids=["nf4-dq", "int8"]
)
def test_gpt2_conv1d_and_tied_head_quantized(quant: Quant, tmp_path: Path) -> None:
    """GPT-2's Conv1D layers are quantized from their transposed weight; the tied lm_head
    (the embedding) is not quantized and is counted once."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(**GPT2_TINY), dtype=torch.bfloat16
    )
    model.save_pretrained(tmp_path)
    model = peft.prepare_model_for_kbit_training(_load_quantized(tmp_path, quant))
    lora = Lora(r=4, targets="all-linear")
    model = _peft(model, 4, "all-linear")
    real = sum(
        sum(b for _, b in _state_tensors(p))
        if type(p).__name__ in ("Params4bit", "Int8Params")
        else p.numel() * p.element_size()
        for p in model.parameters()
    )
    spec = ModelSpec(arch="gpt2", layers=2, hidden=64, heads=4, vocab=101, max_positions=32)
    assert weight_storage(spec, lora, quant, prepared_for_kbit=True).total == real
    assert trainable_and_total(spec, lora, quant) == model.get_nb_trainable_parameters()


def test_measuring_a_quantized_model_leaves_no_checkpoint_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``measure`` saves a random checkpoint to load it quantized, as users do; every such
    checkpoint is removed once loaded (a run of 7B cases otherwise fills the disk)."""
    pytest.importorskip("bitsandbytes")
    import tempfile

    from vramfit.config import RunSpec
    from vramfit.measure.hf import build_hf_model

    made: list[Path] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        made.append(Path(real_mkdtemp(dir=tmp_path)))
        return str(made[-1])

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    run = RunSpec.model_validate(
        {
            "model": {"arch": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2,
                      "vocab": 128, "ffn": 176},
            "workload": {"impl": "hf", "mode": "infer", "batch": 1, "seq": 8, "precision": "bf16",
                         "quant": {"kind": "nf4", "compute_dtype": "bf16"}},
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_hf_model(run.model.resolved(), run.workload, "cpu", torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(made) == 1 and not made[0].exists()


def test_from_pretrained_warmup_is_what_transformers_allocated() -> None:
    """The allocator warm-up of a quantized load: 1199.3 MiB measured on the H200 for a
    two-layer Gemma-2-2B in nf4 (benchmarks/data/h200-load-peak)."""
    from vramfit.config import RunSpec
    from vramfit.estimate.profiles import hf

    gemma = {"arch": "llama", "model_type": "gemma2", "layers": 2, "hidden": 2304, "heads": 8,
             "kv_heads": 4, "head_dim": 256, "ffn": 9216, "vocab": 256000, "tied": True,
             "norms_per_layer": 4, "sliding_window": 4096, "sliding_window_every": 2}
    workload = {"impl": "hf", "mode": "infer", "batch": 4, "seq": 1024, "precision": "bf16",
                "quant": {"kind": "nf4", "compute_dtype": "bf16"}}
    run = RunSpec.model_validate({"model": gemma, "workload": workload})
    _, model, _, _ = hf.build(run.model, run.workload, grad=False, batch=4, seq=1024)
    assert round(hf.warmup_bytes(model) / 2**20, 1) == 1199.3
