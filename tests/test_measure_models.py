"""The reference torch models: exact parameter counts, and every variant runs on CPU."""

from __future__ import annotations

import math

import pytest

from vramfit.config import ModelSpec, Workload
from vramfit.errors import VramfitError
from vramfit.estimate.params import count_params

torch = pytest.importorskip("torch")

from vramfit.measure.models import build_model  # noqa: E402

# Published counts: GPT-2 small 124,439,808 (HF gpt2, tied lm_head); Llama-2-7B 6,738,415,616
# (HF meta-llama/Llama-2-7b-hf).
PUBLISHED = [
    (ModelSpec(arch="gpt2", layers=12, hidden=768), 124_439_808),
    (ModelSpec(arch="llama", layers=32, hidden=4096, ffn=11008), 6_738_415_616),
]

SPECS = {
    "gpt2-small": ModelSpec(arch="gpt2", layers=12, hidden=768),
    "llama2-7b": ModelSpec(arch="llama", layers=32, hidden=4096, ffn=11008),
    "gqa": ModelSpec(arch="llama", layers=4, hidden=1024, heads=16, kv_heads=4, ffn=2816),
    "tied-llama": ModelSpec(arch="llama", layers=2, hidden=256, tied=True, vocab=1000),
    "untied-gpt2": ModelSpec(arch="gpt2", layers=2, hidden=256, tied=False, vocab=1000),
    "qkv-bias": ModelSpec(arch="llama", layers=2, hidden=512, kv_heads=2, qkv_bias=True),
    "head-dim": ModelSpec(arch="llama", layers=2, hidden=512, heads=8, head_dim=96, kv_heads=4),
    "gpt2-no-bias": ModelSpec(arch="gpt2", layers=2, hidden=256, bias=False, qkv_bias=False),
    "mixed": ModelSpec(
        arch="llama", layers=2, hidden=256, norm="layernorm", mlp="gelu", bias=True, vocab=500
    ),
    "gpt2-rope": ModelSpec(arch="gpt2", layers=2, hidden=256, positions="rope", vocab=500),
}


def meta(spec: ModelSpec, workload: Workload | None = None):
    return build_model(spec, workload or Workload(impl="reference"), "meta", torch.float32)


@pytest.mark.parametrize(("spec", "published"), PUBLISHED)
def test_published_counts(spec: ModelSpec, published: int) -> None:
    assert meta(spec).num_params() == published


@pytest.mark.parametrize("name", SPECS)
def test_num_params_equals_count_params(name: str) -> None:
    spec = SPECS[name]
    assert meta(spec).num_params() == count_params(spec).total


def test_head_dim_sets_projection_widths() -> None:
    model = meta(SPECS["head-dim"])
    attn = model.blocks[0].attn
    assert tuple(attn.q_proj.weight.shape) == (8 * 96, 512)
    assert tuple(attn.k_proj.weight.shape) == (4 * 96, 512)
    assert tuple(attn.o_proj.weight.shape) == (512, 8 * 96)


def test_tied_lm_head_shares_storage_after_materialising() -> None:
    spec = ModelSpec(arch="gpt2", layers=1, hidden=32, heads=4, vocab=64, max_positions=32)
    model = build_model(spec, Workload(impl="reference"), "cpu", torch.float32)
    assert model.lm_head.weight is model.embed.weight
    untied = build_model(
        spec.model_copy(update={"tied": False}), Workload(impl="reference"), "cpu", torch.float32
    )
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_init_is_gpt2_style() -> None:
    spec = ModelSpec(arch="gpt2", layers=1, hidden=256, vocab=512, max_positions=64)
    model = build_model(spec, Workload(impl="reference"), "cpu", torch.float32)
    block = model.blocks[0]
    assert torch.equal(block.norm_1.weight, torch.ones(256))
    assert torch.equal(block.norm_1.bias, torch.zeros(256))
    assert torch.equal(block.attn.c_attn.bias, torch.zeros(3 * 256))
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"experts": 8, "experts_per_token": 2}, "measure supports dense models"),
        ({"norms_per_layer": 4}, "measure supports dense models"),
    ],
)
def test_unsupported_architectures_are_rejected(update: dict, message: str) -> None:
    spec = ModelSpec(arch="llama", layers=1, hidden=64, **update)
    with pytest.raises(VramfitError, match=message) as info:
        meta(spec)
    assert info.value.field == "--preset"


# --- tiny models on CPU -------------------------------------------------------------------

TINY = {
    "gpt2": ModelSpec(arch="gpt2", layers=2, hidden=32, heads=4, vocab=64, max_positions=32),
    "llama": ModelSpec(arch="llama", layers=2, hidden=32, heads=4, kv_heads=2, ffn=48, vocab=64),
}
BATCH, SEQ = 2, 12


def loss_and_grads(spec: ModelSpec, attention: str, checkpointing: str):
    workload = Workload(
        impl="reference", batch=BATCH, seq=SEQ, attention=attention, checkpointing=checkpointing
    )
    torch.manual_seed(0)
    model = build_model(spec, workload, "cpu", torch.float32)
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (BATCH, SEQ), generator=generator)
    y = torch.randint(0, 64, (BATCH, SEQ), generator=generator)
    loss = model(x, y)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.item(), grads


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
@pytest.mark.parametrize("attention", ["flash", "eager"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_backward_runs(arch: str, attention: str, checkpointing: str) -> None:
    loss, grads = loss_and_grads(TINY[arch], attention, checkpointing)
    assert math.isfinite(loss)
    assert loss == pytest.approx(math.log(64), rel=0.1)  # near-uniform logits at init
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("attention", ["flash", "eager"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpointing_changes_nothing_but_memory(arch: str, attention: str) -> None:
    loss, grads = loss_and_grads(TINY[arch], attention, "none")
    for checkpointing in ("selective", "full"):
        other_loss, other_grads = loss_and_grads(TINY[arch], attention, checkpointing)
        assert other_loss == pytest.approx(loss, abs=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_eager_and_flash_agree(arch: str) -> None:
    flash, _ = loss_and_grads(TINY[arch], "flash", "none")
    eager, _ = loss_and_grads(TINY[arch], "eager", "none")
    assert eager == pytest.approx(flash, abs=1e-5)


@pytest.mark.parametrize("attention", ["flash", "eager"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_decode_matches_full_forward(arch: str, attention: str) -> None:
    spec = TINY[arch].resolved()
    workload = Workload(
        impl="reference", mode="infer", batch=BATCH, seq=SEQ, attention=attention, gen_tokens=3
    )
    model = build_model(spec, workload, "cpu", torch.float32).eval()
    tokens = torch.randint(0, 64, (BATCH, SEQ + 3), generator=torch.Generator().manual_seed(2))
    shape = (BATCH, spec.kv_heads, SEQ + 3, spec.head_dim)
    cache = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(spec.layers)]
    with torch.inference_mode():
        logits = model(tokens[:, :SEQ], cache=cache, pos=0)
        torch.testing.assert_close(logits, model(tokens[:, :SEQ]))
        for t in range(SEQ, SEQ + 3):
            logits = model(tokens[:, t : t + 1], cache=cache, pos=t)
            expected = model(tokens[:, : t + 1])  # no cache: the whole prefix again
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert logits.shape == (BATCH, 1, 64)


def test_half_precision_forward_on_cpu() -> None:
    spec = TINY["llama"]
    model = build_model(spec, Workload(impl="reference", seq=SEQ), "cpu", torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    x = torch.randint(0, 64, (BATCH, SEQ))
    loss = model(x, x)
    assert loss.dtype == torch.float32  # logits upcast before cross-entropy
    assert math.isfinite(loss.item())


def _presets() -> list:
    from vramfit.presets import list_presets

    return list_presets()


@pytest.mark.parametrize("preset", _presets(), ids=lambda p: p.name)
def test_every_preset_builds_with_the_estimators_parameter_count(preset) -> None:
    """The torch model of every preset (on the meta device: no memory) has exactly the
    parameters the estimator counts; architectures measure does not build fail cleanly."""
    from vramfit.measure.models import check_measurable

    spec = preset.model.resolved()
    try:
        check_measurable(spec)
    except VramfitError as err:
        assert spec.experts > 1 or spec.norms_per_layer != 2
        assert str(err) == "--preset: measure supports dense models with 2 norms per layer"
        return
    assert meta(spec.model_copy(update={"params": None})).num_params() == count_params(spec).total
