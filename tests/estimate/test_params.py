"""Parameter counts derived from the architecture, against published figures."""

from __future__ import annotations

from vramfit.config import ModelSpec
from vramfit.estimate.params import count_params


def test_gpt2_small_matches_the_published_count() -> None:
    # GPT-2 small with 1024 positions and tied embeddings: 124,439,808 (HF gpt2 safetensors)
    assert count_params(ModelSpec(arch="gpt2", layers=12, hidden=768)).total == 124_439_808


def test_llama2_7b_matches_the_published_count() -> None:
    # Llama-2-7B: 6,738,415,616 (HF meta-llama/Llama-2-7b-hf safetensors total)
    spec = ModelSpec(arch="llama", layers=32, hidden=4096, ffn=11008, vocab=32000)
    assert count_params(spec).total == 6_738_415_616


def test_llama3_8b_with_gqa_matches_the_published_count() -> None:
    # Meta-Llama-3-8B: 8,030,261,248 (HF safetensors total); 8 KV heads of 32
    spec = ModelSpec(
        arch="llama", layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256
    )
    assert count_params(spec).total == 8_030_261_248


def test_mixtral_total_and_active() -> None:
    # Mixtral-8x7B: 46,702,792,704 total; ~12.9B active with 2 of 8 experts (Jiang et al. 2024)
    spec = ModelSpec(
        arch="llama",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        ffn=14336,
        vocab=32000,
        experts=8,
        experts_per_token=2,
    )
    counts = count_params(spec)
    assert counts.total == 46_702_792_704
    assert 12.8e9 < counts.active < 13.0e9


def test_parts_sum_to_the_total() -> None:
    counts = count_params(ModelSpec(arch="gpt2", layers=12, hidden=768))
    assert sum(counts.parts.values()) == counts.total
    assert counts.lm_head == 0  # tied


def test_training_gradients_cover_every_parameter_including_all_experts() -> None:
    """At the optimizer step every parameter has a gradient: for MoE, every expert's (with
    thousands of tokens routed, each expert receives some), not only the active ones."""
    from vramfit.config import RunSpec, Workload
    from vramfit.estimate.core import estimate

    for spec in (
        ModelSpec(
            arch="llama",
            layers=2,
            hidden=256,
            heads=4,
            kv_heads=2,
            ffn=512,
            vocab=1000,
            experts=8,
            experts_per_token=2,
        ),
        ModelSpec(arch="gpt2", layers=2, hidden=256, vocab=1000),
        ModelSpec(arch="llama", layers=2, hidden=256, vocab=1000, tied=True),
    ):
        run = RunSpec(
            model=spec, workload=Workload(batch=2, seq=64, precision="fp32", optimizer="sgd")
        )
        from vramfit.estimate.profiles.reference import training_steps

        _, steady, _ = training_steps(spec, run.workload, 0)
        step = len(steady.points) - 1
        grads = steady.components_at(step)["gradients"]
        assert grads == 4 * count_params(spec).total
        assert estimate(run).params == count_params(spec).total
