"""Invariants of the default estimator, fuzzed with hypothesis."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vramfit.config import ModelSpec, RunSpec, Workload
from vramfit.estimate.core import Hardware, estimate
from vramfit.estimate.solve import solve_max

ARCHS = st.sampled_from(["gpt2", "llama"])


@st.composite
def runs(draw: st.DrawFn) -> RunSpec:
    heads = draw(st.sampled_from([2, 4, 8, 16]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4, 8, 16) if heads % h == 0]))
    model = ModelSpec(
        arch=draw(ARCHS),
        layers=draw(st.integers(1, 48)),
        hidden=heads * draw(st.sampled_from([32, 64, 128])),
        heads=heads,
        kv_heads=kv,
        vocab=draw(st.integers(100, 200_000)),
        max_positions=16384,  # GPT-2's learned table, long enough for every drawn context
    )
    mode = draw(st.sampled_from(["train", "infer"]))
    workload = Workload(
        mode=mode,
        batch=draw(st.integers(1, 64)),
        seq=draw(st.integers(1, 8192)),
        precision=draw(st.sampled_from(["fp32", "amp-fp16", "amp-bf16", "bf16", "fp16"])),
        optimizer=draw(
            st.sampled_from(
                ["adamw", "adamw-fused", "sgd", "sgd-momentum", "adam-8bit", "adafactor", "none"]
            )
        ),
        attention=draw(st.sampled_from(["flash", "eager"])),
        checkpointing=draw(st.sampled_from(["none", "selective", "full"])),
        gen_tokens=draw(st.integers(0, 2048)) if mode == "infer" else 0,
    )
    return RunSpec(model=model, workload=workload)


def _with(run: RunSpec, **changes: object) -> RunSpec:
    return run.model_copy(update={"workload": run.workload.model_copy(update=changes)})


@settings(max_examples=300, deadline=None)
@given(runs())
def test_breakdown_sums_to_total(run: RunSpec) -> None:
    est = estimate(run)
    assert sum(est.breakdown.values()) == est.total_bytes
    assert est.peak_allocated_bytes == max(est.phases.values())
    assert est.peak_allocated_bytes >= est.tensor_peak_bytes
    assert est.total_bytes > est.peak_allocated_bytes


@settings(max_examples=150, deadline=None)
@given(runs(), st.integers(1, 16), st.integers(1, 4096))
def test_memory_never_shrinks_when_batch_or_seq_grows(
    run: RunSpec, more_b: int, more_s: int
) -> None:
    w = run.workload
    base = estimate(run)
    for bigger in (
        estimate(_with(run, batch=w.batch + more_b)),
        estimate(_with(run, seq=w.seq + more_s)),
    ):
        # the tensors' own bytes never shrink; the allocator's view (rounding, cached segments)
        # is not monotone in PyTorch either, but never falls below what the smaller run's
        # tensors needed
        assert bigger.tensor_peak_bytes >= base.tensor_peak_bytes
        assert bigger.peak_allocated_bytes >= base.tensor_peak_bytes
        assert bigger.total_bytes >= base.tensor_peak_bytes + base.breakdown["cuda_context"]


@settings(max_examples=200, deadline=None)
@given(runs())
def test_checkpointing_never_increases_the_peak(run: RunSpec) -> None:
    none = estimate(_with(run, mode="train", checkpointing="none")).tensor_peak_bytes
    selective = estimate(_with(run, mode="train", checkpointing="selective")).tensor_peak_bytes
    full = estimate(_with(run, mode="train", checkpointing="full")).tensor_peak_bytes
    assert selective <= none
    assert full <= none


@settings(max_examples=200, deadline=None)
@given(runs())
def test_flash_never_exceeds_eager(run: RunSpec) -> None:
    flash = estimate(_with(run, attention="flash")).tensor_peak_bytes
    eager = estimate(_with(run, attention="eager")).tensor_peak_bytes
    assert flash <= eager


@settings(max_examples=40, deadline=None)
@given(runs(), st.integers(2, 200))
def test_solve_batch_is_exact_to_the_integer(run: RunSpec, gib: int) -> None:
    hw = Hardware(name="test", memory_bytes=gib * 2**30)
    solution = solve_max(run, hw, "batch")
    best, est = solution.value, solution.estimate
    if best == 0:
        assert estimate(_with(run, batch=1), hw).total_bytes > hw.memory_bytes
        return
    assert est is not None and est.total_bytes <= hw.memory_bytes
    if best == 10_000_000:  # the --batch bound: nothing larger may be asked for
        return
    assert solution.checked_to >= best
    if solution.largest:  # every value above the answer was estimated, or cannot fit
        assert best + 1 <= solution.checked_to or best + 1 > solution.bound
        assert estimate(_with(run, batch=best + 1), hw).total_bytes > hw.memory_bytes
