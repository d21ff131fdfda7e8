"""Suggestions: what to change when a run does not fit."""

from __future__ import annotations

from vramfit.config import ModelSpec, RunSpec, Workload
from vramfit.estimate.core import Hardware, estimate
from vramfit.estimate.solve import solve_max, suggestions

LLAMA3_8B = ModelSpec(
    arch="llama", layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256
)
H100 = Hardware(name="H100-SXM", memory_bytes=85520809984, compute_capability=(9, 0))


def test_every_suggestion_lowers_the_total_and_says_whether_it_fits() -> None:
    run = RunSpec(model=LLAMA3_8B, workload=Workload(batch=1, seq=4096))
    current = estimate(run, H100).total_bytes
    tips = suggestions(run, H100)
    assert tips
    for tip in tips:
        assert tip.total_bytes < current
        assert tip.fits == (tip.total_bytes <= H100.memory_bytes)


def test_a_combination_is_offered_when_no_single_change_fits() -> None:
    run = RunSpec(model=LLAMA3_8B, workload=Workload(impl="reference", batch=1, seq=4096))
    tips = suggestions(run, H100)
    assert not any(tip.fits for tip in tips[1:])  # no single change is enough here
    combined = tips[0]
    words = combined.change.split()
    assert combined.fits and len(words) >= 4  # two or more options together
    # applying the options it names gives the total it claims
    changes = {words[i].removeprefix("--"): words[i + 1] for i in range(0, len(words), 2)}
    changed = run.model_copy(
        update={"workload": Workload(**{**run.workload.model_dump(), **changes})}
    )
    assert estimate(changed, H100).total_bytes == combined.total_bytes


def test_solve_seq_is_exact() -> None:
    run = RunSpec(
        model=LLAMA3_8B,
        workload=Workload(batch=1, seq=1, precision="bf16", optimizer="adamw-fused"),
    )
    best, est = solve_max(run, H100, "seq")
    assert best > 0 and est is not None
    bigger = run.model_copy(update={"workload": run.workload.model_copy(update={"seq": best + 1})})
    assert estimate(bigger, H100).total_bytes > H100.memory_bytes


def test_suggesting_flash_attention_keeps_the_workload_a_valid_model() -> None:
    import warnings

    run = RunSpec(
        model=ModelSpec(arch="gpt2", layers=12, hidden=768),
        workload=Workload(batch=8, seq=1024, attention="eager"),
    )
    t4 = Hardware(name="T4", memory_bytes=16106127360, compute_capability=(7, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydantic warns when serialising a mistyped field
        tips = suggestions(run, t4)
        flash = next(tip for tip in tips if tip.change == "--attention flash")
        changed = run.model_copy(
            update={"workload": run.workload.model_copy(update={"attention": "flash"})}
        )
        assert (
            flash.total_bytes
            == estimate(
                RunSpec.model_validate(changed.model_dump(mode="json", warnings=False)), t4
            ).total_bytes
        )
