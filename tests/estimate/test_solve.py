"""Suggestions: what to change when a run does not fit; the largest batch or seq that fits."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vramfit.cli import app
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
    # (at seq 4096, --precision bf16 alone fits: by the allocator's cache flushes)
    run = RunSpec(model=LLAMA3_8B, workload=Workload(impl="reference", batch=1, seq=6144))
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
    solution = solve_max(run, H100, "seq")
    best, est = solution.value, solution.estimate
    assert best > 0 and est is not None and est.total_bytes <= H100.memory_bytes
    assert solution.checked_to > best  # the value above it was estimated
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
        changed = RunSpec.model_validate(
            {"model": run.model, "workload": {**run.workload.model_dump(), "attention": "flash"}}
        )
        assert (
            flash.total_bytes
            == estimate(
                RunSpec.model_validate(changed.model_dump(mode="json", warnings=False)), t4
            ).total_bytes
        )


GPT2 = {"arch": "gpt2", "layers": 12, "hidden": 768}  # the gpt2 preset's shape (124M)


def _gpt2(batch: int) -> RunSpec:
    # the measured run is vramfit's reference loop (benchmarks/data/h200-validation)
    workload = {"impl": "reference", "batch": batch, "seq": 1024}
    return RunSpec.model_validate({"model": GPT2, "workload": workload})


def test_the_largest_batch_is_found_past_a_smaller_one_that_does_not_fit() -> None:
    # The device total is not monotone in the batch: measured on an H200, GPT-2 (seq 1024,
    # AMP bf16, AdamW) held 32.45 GiB at batch 26 and 28.49 GiB at batch 27, and the model
    # predicts the same step (README, "--solve"). On a 29 GiB device a
    # bisection stops at 24 (25 and 26 do not fit); 27 does.
    totals = {b: estimate(_gpt2(b)).total_bytes for b in range(24, 29)}
    assert totals[26] > totals[27]  # the non-monotone step the solver must see past
    gpu = Hardware(name="29 GiB", memory_bytes=29 << 30, compute_capability=(9, 0))
    solution = solve_max(_gpt2(1), gpu, "batch")
    assert solution.value == 27 and solution.largest
    assert {25, 26} <= set(solution.too_big)
    # brute force: 27 is the largest batch up to the bound that fits, and above the bound
    # the peak allocated bytes plus the CUDA context alone exceed the device
    fitting = [b for b in range(1, solution.bound + 1) if estimate(_gpt2(b), gpu).fits]
    assert max(fitting) == 27
    above = estimate(_gpt2(solution.bound + 1), gpu)
    assert above.peak_allocated_bytes + above.breakdown["cuda_context"] > gpu.memory_bytes


T4 = Hardware(name="T4", memory_bytes=16106127360, compute_capability=(7, 5))


def test_where_cache_flushes_decide_the_fit_the_search_does_not_step_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A long generation's batch on a T4: near the GPU's memory every run that fits does so by
    # the allocator's cache flushes (its total is the GPU's memory less a few MiB) and every
    # one that does not totals terabytes (what it would hold where nothing limits it).
    # Interpolated between those totals, the search moved one batch a step: 68 estimates
    tiny = ModelSpec(arch="llama", layers=1, hidden=256, heads=2, kv_heads=2, ffn=512, vocab=1024)
    run = RunSpec(
        model=tiny,
        workload=Workload(mode="infer", batch=1, seq=128, gen_tokens=1024, precision="bf16"),
    )
    estimates: list[int] = []

    def counted(r: RunSpec, hardware: Hardware | None = None) -> object:
        estimates.append(r.workload.batch)
        return estimate(r, hardware)

    monkeypatch.setattr("vramfit.estimate.solve.estimate", counted)
    solution = solve_max(run, T4, "batch")
    assert len(estimates) <= 40
    best = solution.estimate
    assert best is not None and best.fits and best.cache_flushes > 0
    assert solution.checked_to > solution.value  # the batch above it was estimated
    above = run.model_copy(
        update={"workload": run.workload.model_copy(update={"batch": solution.value + 1})}
    )
    assert not estimate(above, T4).fits


@pytest.mark.parametrize("gen_tokens", [0, 24])
def test_solve_seq_stops_at_the_learned_position_table(gen_tokens: int) -> None:
    # GPT-2 has 1024 learned positions: no seq beyond the table (less what is generated)
    # is a valid run, so the search must not try one
    workload = {"seq": 8, "mode": "infer" if gen_tokens else "train", "gen_tokens": gen_tokens}
    run = RunSpec.model_validate({"model": GPT2, "workload": workload})
    solution = solve_max(run, T4, "seq")
    assert solution.limit == 1024 - gen_tokens and solution.by_positions
    assert solution.value == 1024 - gen_tokens and solution.largest


def test_cli_solve_seq_with_learned_positions_is_not_a_traceback() -> None:
    result = CliRunner().invoke(
        app,
        ["estimate", "--arch", "gpt2", "--layers", "12", "--hidden", "768", "--gpu", "T4"]
        + ["--solve", "seq"],
        env={"COLUMNS": "100"},
    )
    assert result.exit_code == 0, result.output
    assert "Largest seq that fits on T4: 1024" in result.output
    assert "learned position table" in result.output


def test_cli_solve_json_says_what_is_proven() -> None:
    argv = ["estimate", "--arch", "gpt2", "--layers", "12", "--hidden", "768", "--gpu", "T4"]
    result = CliRunner().invoke(app, [*argv, "--solve", "seq", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert {k: doc[k] for k in ("solve", "value", "largest", "limit", "bound", "too_big")} == {
        "solve": "seq",
        "value": 1024,
        "largest": True,
        "limit": 1024,
        "bound": 1024,
        "too_big": [],
    }
    assert doc["checked_to"] >= doc["bound"] and doc["estimate"]["workload"]["seq"] == 1024


def test_under_the_allocators_own_limit_an_answer_that_runs_out_is_no_answer() -> None:
    # With allocator_limit_bytes (set_per_process_memory_fraction) a run can run out of memory
    # while its total where nothing limits the allocator is within the GPU: that is no fit
    # (the search took such runs for fits and answered a batch that runs out of memory)
    tiny = ModelSpec(arch="llama", layers=2, hidden=128, heads=2, kv_heads=1, ffn=512, vocab=1024)
    run = RunSpec(
        model=tiny,
        workload=Workload(mode="infer", batch=1, seq=64, gen_tokens=64, precision="bf16"),
    )
    gpu = Hardware(
        name="H200, 256 MiB for the allocator",
        memory_bytes=150_109_880_320,
        compute_capability=(9, 0),
        allocator_limit_bytes=1 << 28,
    )
    solution = solve_max(run, gpu, "batch")
    assert solution.estimate is not None and solution.estimate.fits
    above = run.model_copy(
        update={"workload": run.workload.model_copy(update={"batch": solution.value + 1})}
    )
    past = estimate(above, gpu)
    assert not past.fits and past.out_of_memory is not None
    assert all(not estimate(_batch(run, v), gpu).fits for v in solution.too_big)
    # and the bound is the allocator's: past it the peak alone outgrows the limit
    beyond = estimate(_batch(run, solution.bound + 1), gpu)
    assert beyond.peak_allocated_bytes > (gpu.allocator_limit_bytes or 0)
    assert estimate(_batch(run, solution.bound), gpu).peak_allocated_bytes <= (1 << 28)


def _batch(run: RunSpec, batch: int) -> RunSpec:
    return run.model_copy(update={"workload": run.workload.model_copy(update={"batch": batch})})
