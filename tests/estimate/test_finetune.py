"""LoRA / QLoRA parameters, storage and optimizer state without the libraries.

Golden numbers come from outside the code: peft's own printed lines (committed with the
script that produced them), and byte counts worked by hand from the bitsandbytes 0.50.2
source (file:line in each case). The same functions are checked against the real libraries
in tests/test_finetune_libraries.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from vramfit.config import FinetuneSpec, Lora, ModelSpec, Quant, validation_error
from vramfit.estimate.finetune import (
    StateOptimizer,
    block_linears,
    lora_tensors,
    optimizer_state,
    optimizer_step_temporary_bytes,
    quantized_weight_tensors,
    trainable_and_total,
    trainable_shapes,
    weight_storage,
)
from vramfit.hf import spec_from_hf_config

ROOT = Path(__file__).resolve().parents[2]
HF = ROOT / "tests" / "fixtures" / "hf"
GOLDEN = ROOT / "benchmarks" / "data" / "peft" / "print_trainable_parameters.txt"
LINE = re.compile(
    r"^(?P<folder>\S+) r=(?P<r>\d+) targets=(?P<targets>\S+) \| trainable params: "
    r"(?P<trainable>[\d,]+) \|\| all params: (?P<all>[\d,]+) \|\| trainable%: (?P<pct>[\d.]+)$"
)
LLAMA_3_8B = ModelSpec(
    arch="llama", layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256
)


def _golden() -> list[str]:
    return [line for line in GOLDEN.read_text().splitlines() if not line.startswith("#")]


@pytest.mark.parametrize("line", _golden())
def test_peft_printed_lines(line: str) -> None:
    """peft's print_trainable_parameters on published configs (benchmarks/peft_golden.py)."""
    m = LINE.match(line)
    assert m, line
    folder = HF / m["folder"]
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    targets = m["targets"]
    lora = Lora(
        r=int(m["r"]),
        model_type=model_type,
        targets=None
        if targets == "default"
        else ("all-linear" if targets == "all-linear" else targets.split(",")),
    )
    trainable, total = trainable_and_total(spec_from_hf_config(folder), lora, None)
    assert f"{trainable:,}" == m["trainable"]
    assert f"{total:,}" == m["all"]
    assert f"{100 * trainable / total:.4f}" == m["pct"]


def test_golden_file_covers_the_published_llama_lines() -> None:
    # peft's widely quoted line for Llama-2-7B with its default q_proj, v_proj at r=8
    assert any("4,194,304 || all params: 6,742,609,920" in line for line in _golden())
    assert any("3,407,872 || all params: 8,033,669,120" in line for line in _golden())


BAD = [
    ({"lora": {"targets": ["x_proj"]}}, "lora.targets", "'x_proj' is not a linear layer"),
    ({"lora": {"targets": ["lm_head"]}}, "lora.targets", "'lm_head' is not a linear layer"),
    ({"lora": {"r": 1025}}, "lora.r", "1025 exceeds min(in, out) = 1024 of self_attn.v_proj"),
    ({"lora": {"r": 0}}, "lora.r", "greater than or equal to 1"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout", "less than 1"),
    ({"lora": {"targets": []}}, "lora.targets", "at least one module name"),
    ({"lora": {"targets": "q_proj"}}, "lora.targets", "give a list of module names"),
    ({"lora": {"model_type": "phi3"}}, "lora.targets", "no default target modules"),
    ({"lora": {"model_type": "gpt2"}}, "lora.model_type", "does not match arch llama"),
    ({"lora": {"model_type": "falcon"}}, "lora.model_type", "Input should be"),
    ({"lora": {"rank": 8}}, "lora.rank", "unknown key"),
    ({"quant": {"kind": "int4"}}, "quant.kind", "Input should be"),
    ({"quant": {"kind": "int8", "double_quant": True}}, "quant.double_quant", "4-bit"),
    ({"quant": {"kind": "int8", "quant_storage": "bf16"}}, "quant.quant_storage", "4-bit"),
    ({"quant": {"kind": "int8", "compute_dtype": "bf16"}}, "quant.compute_dtype", "4-bit"),
    ({"quant": {"kind": "nf4", "int8_threshold": 0}}, "quant.int8_threshold", "int8 (LLM"),
    ({"quant": {"kind": "nf4", "blocksize": 48}}, "quant.blocksize", "must be one of"),
    ({"quant": {}}, "quant.kind", "Field required"),
]


def test_a_mixture_of_experts_is_refused() -> None:
    moe = {**LLAMA_3_8B.model_dump(), "experts": 8, "experts_per_token": 2}
    for extra in ({"lora": {}}, {"quant": {"kind": "nf4"}}):
        with pytest.raises(ValidationError) as info:
            FinetuneSpec.model_validate({"model": moe, **extra})
        assert str(validation_error(info.value)) == (
            "model.experts: LoRA and quantization are modelled for dense models only"
        )


@pytest.mark.parametrize(("extra", "field", "message"), BAD)
def test_bad_settings_name_their_field(extra: dict, field: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        FinetuneSpec.model_validate({"model": LLAMA_3_8B.model_dump(), **extra})
    assert isinstance(info.value, ValidationError)
    err = validation_error(info.value)
    assert err.field == field
    assert message in err.message


def test_gpt2_suffix_targets() -> None:
    gpt2 = ModelSpec(arch="gpt2", layers=12, hidden=768)
    paths = lambda targets: sorted({p for p, *_ in lora_tensors(gpt2, Lora(targets=targets))})  # noqa: E731
    assert paths(["c_proj"]) == ["attn.c_proj", "mlp.c_proj"]
    assert paths(["mlp.c_proj"]) == ["mlp.c_proj"]
    assert paths(None) == ["attn.c_attn"]  # peft's gpt2 default
    assert paths("all-linear") == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


# Worked by hand from bitsandbytes 0.50.2: backends/cuda/ops.py:391-392 (absmax: one fp32 per
# block; packed: (n + 1) // (itemsize * 2) elements of quant_storage), functional.py:936-951
# (double quant: quantize_blockwise(absmax - mean, blocksize=256) -> uint8 absmax, state2
# with fp32 absmax per 256 blocks and a copied 256-entry fp32 code, offset a 0-dim fp32),
# functional.py get_4bit_type (16 fp32), nn/modules.py Int8Params._quantize (int8 + SCB).
HAND = [
    # Llama-3-8B q_proj 4096 x 4096 = 16,777,216 elements, 262,144 blocks of 64
    (
        (4096, 4096),
        Quant(kind="nf4"),
        [("weight", 8_388_608), ("absmax", 1_048_576), ("code", 64)],
    ),
    (
        (4096, 4096),
        Quant(kind="nf4", double_quant=True),
        [
            ("weight", 8_388_608),
            ("absmax", 262_144),
            ("nested_absmax", 4_096),  # 262,144 / 256 = 1,024 fp32
            ("nested_code", 1_024),
            ("offset", 4),
            ("code", 64),
        ],
    ),
    # 75 x 75 = 5,625 elements in bf16 storage: 5,626 // 4 = 1,406 bf16 (the last code lost)
    (
        (75, 75),
        Quant(kind="fp4", quant_storage="bf16"),
        [("weight", 2_812), ("absmax", 88 * 4), ("code", 64)],
    ),
    # Llama-3-8B down_proj 4096 x 14336 in int8: 58,720,256 B + 4,096 fp32 row scales
    ((4096, 14336), Quant(kind="int8"), [("weight", 58_720_256), ("SCB", 16_384)]),
]


@pytest.mark.parametrize(("shape", "quant", "expected"), HAND)
def test_quantized_tensors_worked_by_hand(shape: tuple, quant: Quant, expected: list) -> None:
    assert quantized_weight_tensors(shape, quant) == expected


def test_bf16_storage_undercounts_in_peft() -> None:
    """peft counts a Params4bit as numel x 2 x itemsize: a 75 x 75 layer in bf16 storage holds
    1,406 elements, counted 5,624 (peft/peft_model.py get_nb_trainable_parameters)."""
    spec = ModelSpec(
        arch="llama", layers=1, hidden=75, heads=5, kv_heads=5, head_dim=15, ffn=75, vocab=1
    )
    plain = trainable_and_total(spec, None, None)[1]
    quant = trainable_and_total(spec, None, Quant(kind="nf4", quant_storage="bf16"))[1]
    assert plain - quant == 7  # seven 5,625-element layers, one element short each


def test_qlora_storage_of_llama_3_8b() -> None:
    """Llama-3-8B, nf4 + double quant, loaded in bf16 and prepared for k-bit training:
    6,979,321,856 linear weights at 0.5 B, the rest (embed + lm_head + norms = 1,050,939,392
    elements) cast to fp32, r=8 q,v adapters in fp32."""
    st_ = weight_storage(
        LLAMA_3_8B, Lora(), Quant(kind="nf4", double_quant=True), prepared_for_kbit=True
    )
    assert st_.linear_weights == 6_979_321_856 // 2
    assert st_.other == 4 * 1_050_939_392
    assert st_.adapters == 4 * 3_407_872
    # per layer: 7 quant states; 8 absmax bytes per 512 elements... worked per tensor above
    per_layer = sum(
        b
        for x in block_linears(LLAMA_3_8B)
        for n, b in quantized_weight_tensors(x.shape, Quant(kind="nf4", double_quant=True))
        if n != "weight"
    )
    assert st_.quant_state == 32 * per_layer
    assert st_.total == sum(st_.parts.values())


# bitsandbytes/optim/optimizer.py Optimizer2State.init_state: p.numel() < 4096 -> two fp32
# states; else uint8 states + fp32 absmax per 256; get_state_buffer pages only numel >= 1e5
def test_qlora_llama_3_8b_adamw_8bit_state() -> None:
    """r=8 q,v: 64 adapters' A and B; every A (8 x 4096) and B (4096 x 8 / 1024 x 8) has at
    least 4096 elements, so all states are 8-bit: 2 B per element + 2 fp32 absmax per 256."""
    shapes = trainable_shapes(LLAMA_3_8B, Lora())
    assert len(shapes) == 128 and sum(a * b for a, b in shapes) == 3_407_872
    state = optimizer_state(shapes, StateOptimizer.bnb_adamw_8bit)
    assert state.device == 2 * 3_407_872 + 2 * 4 * (3_407_872 // 256) + 2048


def test_optimizer_state_worked_by_hand() -> None:
    shapes = [(4096, 4096), (4095,)]
    eight = optimizer_state(shapes, StateOptimizer.bnb_adamw_8bit)
    assert eight.device == 2 * 16_777_216 + 2 * 65_536 * 4 + 2 * 4095 * 4 + 2048
    assert eight.paged == 0
    paged = optimizer_state(shapes, StateOptimizer.bnb_paged_adamw_8bit)
    assert paged.paged == 2 * 16_777_216
    assert paged.device == 2 * 65_536 * 4 + 2 * 4095 * 4 + 2048
    paged32 = optimizer_state([(99_999,), (100_000,)], StateOptimizer.bnb_paged_adamw_32bit)
    assert (paged32.device, paged32.paged) == (8 * 99_999, 8 * 100_000)
    # Adafactor: row (4096) + col (4096) fp32 + the 0-dim RMS; a vector keeps a full state
    ada = optimizer_state(shapes, StateOptimizer.adafactor)
    assert ada.device == (4096 + 4096) * 4 + 4 + 4095 * 4 + 4
    assert optimizer_step_temporary_bytes(shapes, StateOptimizer.adafactor) == 2 * 4 * 4096**2
    assert optimizer_step_temporary_bytes(shapes, StateOptimizer.bnb_adamw_8bit) == 0


# --- properties -------------------------------------------------------------------------------


@st.composite
def models(draw: st.DrawFn) -> tuple[ModelSpec, str]:
    model_type = draw(st.sampled_from(["llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2"]))
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4, 8) if heads % k == 0]))
    head_dim = draw(st.sampled_from([64, 128]))
    spec = ModelSpec.model_validate(
        {
            "arch": "gpt2" if model_type == "gpt2" else "llama",
            "layers": draw(st.integers(1, 8)),
            "hidden": heads * head_dim,
            "heads": heads,
            "kv_heads": kv if model_type != "gpt2" else heads,
            "head_dim": head_dim,
            "ffn": draw(st.integers(64, 4096)),
            "vocab": draw(st.integers(1, 50_000)),
        }
    )
    return spec, model_type


def _names(spec: ModelSpec, model_type: str) -> list[str]:
    return [x.name for x in block_linears(spec, Lora(model_type=model_type).model_type)]


@settings(max_examples=60, deadline=None)
@given(models(), st.data())
def test_lora_trains_fewer_parameters_than_full_fine_tuning(
    model: tuple, data: st.DataObject
) -> None:
    spec, model_type = model
    smallest = min(
        min(x.shape) for x in block_linears(spec, Lora(model_type=model_type).model_type)
    )
    r = data.draw(st.integers(1, max(1, smallest // 2)))
    trainable, total = trainable_and_total(
        spec, Lora(r=r, targets="all-linear", model_type=model_type), None
    )
    assert trainable < total - trainable


@settings(max_examples=60, deadline=None)
@given(models(), st.data())
def test_adding_targets_never_decreases_trainable(model: tuple, data: st.DataObject) -> None:
    spec, model_type = model
    names = _names(spec, model_type)
    more = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    fewer = data.draw(st.lists(st.sampled_from(more), min_size=1, unique=True))
    count = lambda t: trainable_and_total(spec, Lora(targets=t, model_type=model_type), None)[0]  # noqa: E731
    assert count(fewer) <= count(more)


@settings(max_examples=60, deadline=None)
@given(models())
def test_fewer_bits_never_increase_weight_bytes(model: tuple) -> None:
    spec, model_type = model
    lora = Lora(model_type=model_type, targets="all-linear")
    ladder = [
        weight_storage(spec, lora, None, base_bytes=4).total,
        weight_storage(spec, lora, None, base_bytes=2).total,
        weight_storage(spec, lora, Quant(kind="int8")).total,
        weight_storage(spec, lora, Quant(kind="nf4")).total,
    ]
    assert ladder == sorted(ladder, reverse=True)


# The QLoRA paper (Dettmers et al. 2023, arXiv 2305.14314, section 3, "Double Quantization"):
# NF4 with block 64 and fp32 constants costs 32/64 = 0.5 bits of constants per parameter;
# double quantization (8-bit constants, an fp32 constant per 256 of them) cuts that to
# 8/64 + 32/(64 * 256) = 0.127 bits, 0.373 bits less: 4.127 bits per parameter in all. Held on
# one Llama-3-8B-sized projection (4096 x 4096), where the per-weight constant tables (the
# 16-entry and 256-entry fp32 codes, the offset: ~1 KiB) are below 0.001 bits per parameter.
@pytest.mark.parametrize(
    ("double_quant", "published_bits"), [(False, 4.5), (True, 4.127)], ids=["nf4", "nf4-dq"]
)
def test_qlora_paper_bits_per_parameter(double_quant: bool, published_bits: float) -> None:
    shape = (4096, 4096)
    quant = Quant(kind="nf4", double_quant=double_quant)
    stored = sum(nbytes for _, nbytes in quantized_weight_tensors(shape, quant))
    bits = 8 * stored / (shape[0] * shape[1])
    assert bits == pytest.approx(published_bits, abs=0.001)


def test_qlora_paper_double_quant_saving() -> None:
    shape = (4096, 4096)
    plain, double = (
        sum(b for _, b in quantized_weight_tensors(shape, Quant(kind="nf4", double_quant=dq)))
        for dq in (False, True)
    )
    saved_bits = 8 * (plain - double) / (shape[0] * shape[1])
    assert saved_bits == pytest.approx(0.373, abs=0.001)  # "a reduction of 0.373 bits"
