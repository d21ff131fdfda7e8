"""measure_train's bookkeeping, OOM handling and error messages, on CPU (no GPU in CI)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from vramfit.config import ModelSpec, RunSpec, Workload
from vramfit.errors import VramfitError
from vramfit.estimate.params import count_params

torch = pytest.importorskip("torch")

from vramfit.measure import train as train_module  # noqa: E402
from vramfit.measure.backend import CpuBackend  # noqa: E402
from vramfit.measure.train import measure_train  # noqa: E402

TINY = ModelSpec(arch="llama", layers=2, hidden=32, heads=4, kv_heads=2, ffn=48, vocab=64)
TINY_GPT2 = ModelSpec(arch="gpt2", layers=2, hidden=32, heads=4, vocab=64, max_positions=32)


def run_of(spec: ModelSpec = TINY, **workload) -> RunSpec:
    workload = {"batch": 2, "seq": 8, "impl": "reference", **workload}
    return RunSpec(model=spec, workload=Workload(**workload))


class FakeBackend(CpuBackend):
    """Scripted counters: each read returns the next scripted value; one phase can OOM."""

    def __init__(
        self,
        *,
        peaks: list[int] = (),
        allocated: list[int] = (),
        info: list[tuple[int, int]] = ((900, 1000), (300, 1000)),
        oom_on_reset: int | None = None,
    ) -> None:
        self.peaks = list(peaks)
        self.allocated = list(allocated)
        self.info = list(info)
        self.oom_on_reset = oom_on_reset
        self.resets = 0
        self.emptied = 0

    def max_memory_allocated(self) -> int:
        return self.peaks.pop(0) if self.peaks else 0

    def memory_allocated(self) -> int:
        return self.allocated.pop(0) if self.allocated else 0

    def max_memory_reserved(self) -> int:
        return 5000 + self.resets  # grows, so the result must be the last value read

    def mem_get_info(self) -> tuple[int, int]:
        return self.info.pop(0) if len(self.info) > 1 else self.info[0]

    def reset_peak(self) -> None:
        self.resets += 1
        if self.resets == self.oom_on_reset:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def empty_cache(self) -> None:
        self.emptied += 1

    def name(self) -> str:
        return "Fake GPU"


def test_phases_are_the_max_over_steps() -> None:
    # Per step: forward, backward, optimizer (peak, end); the first allocated read is weights,
    # the first peak read the build's own.
    peaks = [120, 100, 150, 120, 130, 140, 200, 90, 160, 110]
    ends = [60, 40, 70, 80, 45, 75, 65, 50, 72]
    backend = FakeBackend(peaks=peaks, allocated=[33, *ends])
    result = measure_train(run_of(), steps=3, backend=backend)
    assert result.phases == {"forward": 130, "backward": 160, "optimizer": 200}
    assert result.phase_end == {"forward": 80, "backward": 50, "optimizer": 75}
    assert result.peak_allocated_bytes == 200
    assert result.weights_bytes == 33
    assert result.context_bytes == 100  # 1000 total - 900 free at CUDA init
    assert result.total_bytes == 700  # 1000 - 300 free after the last step
    assert result.device_total_bytes == 1000
    assert result.reserved_peak_bytes == 5009  # read after the 9th reset
    assert [(s["step"], s["phase"]) for s in result.steps] == [
        (step, phase) for step in (1, 2, 3) for phase in ("forward", "backward", "optimizer")
    ]
    assert result.steps[4] == {
        "step": 2,
        "phase": "backward",
        "peak_allocated_bytes": 140,
        "end_allocated_bytes": 45,
    }
    assert (result.oom, result.reached, result.device_name) == (False, None, "Fake GPU")
    assert result.params == count_params(TINY).total


def test_the_peak_counts_the_build() -> None:
    """A tied model built with from_config makes and frees an untied lm_head first: above
    every phase of a small run (Gemma-2's 256k vocabulary), it is the run's peak."""
    peaks = [300, 100, 150, 120, 130, 140, 200, 90, 160, 110]
    backend = FakeBackend(peaks=peaks, allocated=[33, 60, 40, 70, 80, 45, 75, 65, 50, 72])
    result = measure_train(run_of(), steps=3, backend=backend)
    assert result.phases == {"forward": 130, "backward": 160, "optimizer": 200}
    assert result.peak_allocated_bytes == 300


@pytest.mark.parametrize(
    ("oom_on_reset", "reached", "completed"),
    [(1, "step 1 forward", 0), (5, "step 2 backward", 4), (3, "step 1 optimizer", 2)],
)
def test_oom_is_a_result_not_an_exception(oom_on_reset: int, reached: str, completed: int) -> None:
    backend = FakeBackend(peaks=[10 * i for i in range(1, 20)], oom_on_reset=oom_on_reset)
    result = measure_train(run_of(), steps=3, backend=backend)
    assert result.oom is True
    assert result.reached == reached
    assert backend.emptied == 1
    finished = [s for s in result.steps if not s.get("oom")]
    assert len(finished) == completed
    assert set(result.phases) == {s["phase"] for s in finished}


def test_oom_while_building(monkeypatch: pytest.MonkeyPatch) -> None:
    def build_fails(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train_module, "build_model", build_fails)
    result = measure_train(run_of(), backend=FakeBackend())
    assert (result.oom, result.reached, result.weights_bytes, result.steps) == (
        True,
        "building the model",
        0,
        [],
    )


def test_other_errors_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def build_fails(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train_module, "build_model", build_fails)
    with pytest.raises(RuntimeError, match="a bug"):
        measure_train(run_of(), backend=FakeBackend())


@pytest.mark.parametrize("spec", [TINY, TINY_GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("precision", ["fp32", "amp-fp16", "amp-bf16", "bf16", "fp16"])
def test_every_precision_runs_on_cpu(spec: ModelSpec, precision: str) -> None:
    calls: list[tuple[str, int, int]] = []
    result = measure_train(
        run_of(spec, precision=precision),
        steps=2,
        backend=CpuBackend(),
        on_progress=lambda *call: calls.append(call),
    )
    assert result.oom is False
    assert set(result.phases) == {"forward", "backward", "optimizer"}
    assert calls[:3] == [("forward", 1, 2), ("backward", 1, 2), ("optimizer", 1, 2)]
    assert len(result.steps) == 6
    json.dumps(dataclasses.asdict(result))  # JSON-ready


@pytest.mark.parametrize(
    "optimizer", ["adamw", "adamw-fused", "sgd", "sgd-momentum", "adafactor", "none"]
)
def test_every_optimizer_runs_on_cpu(optimizer: str) -> None:
    result = measure_train(run_of(optimizer=optimizer), steps=1, backend=CpuBackend())
    expected = {"forward", "backward"} | ({"optimizer"} if optimizer != "none" else set())
    assert set(result.phases) == expected


@pytest.mark.parametrize(
    ("workload", "phases"),
    [
        ({"gen_tokens": 0}, {"prefill"}),
        ({"gen_tokens": 3}, {"kv_cache", "prefill", "decode"}),
        (
            {"gen_tokens": 3, "kv_dtype": "fp32", "precision": "bf16"},
            {"kv_cache", "prefill", "decode"},
        ),
        (
            {"gen_tokens": 2, "precision": "amp-bf16", "attention": "eager"},
            {"kv_cache", "prefill", "decode"},
        ),
    ],
)
def test_inference_phases(workload: dict, phases: set[str]) -> None:
    calls: list[tuple[str, int, int]] = []
    result = measure_train(
        run_of(TINY, mode="infer", **workload),
        backend=CpuBackend(),
        on_progress=lambda *call: calls.append(call),
    )
    assert set(result.phases) == phases
    decode_calls = [c for c in calls if c[0] == "decode"]
    assert decode_calls == [
        ("decode", t, workload["gen_tokens"]) for t in range(1, workload["gen_tokens"] + 1)
    ]


def test_no_torch_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(VramfitError) as info:
        measure_train(run_of())
    assert str(info.value) == "measure: torch is not installed; pip install 'vramfit[measure]'"


def test_adam_8bit_without_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    backend = FakeBackend()
    with pytest.raises(VramfitError) as info:
        measure_train(run_of(optimizer="adam-8bit"), backend=backend)
    assert str(info.value) == "--optimizer: adam-8bit needs bitsandbytes (pip install bitsandbytes)"
    assert backend.resets == 0  # refused before touching the device


def test_adafactor_needs_a_recent_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.optim, "Adafactor", raising=False)
    with pytest.raises(VramfitError, match="adafactor needs torch>=2.5") as info:
        measure_train(run_of(optimizer="adafactor"), backend=CpuBackend())
    assert info.value.field == "--optimizer"


@pytest.mark.parametrize(
    ("run", "field", "message"),
    [
        (
            run_of(ModelSpec(arch="llama", layers=1, hidden=64, experts=8, experts_per_token=2)),
            "--preset",
            "measure supports dense models with 2 norms per layer",
        ),
        (
            run_of(ModelSpec(arch="llama", layers=1, hidden=64, norms_per_layer=4)),
            "--preset",
            "measure supports dense models with 2 norms per layer",
        ),
        (
            run_of(mode="infer", gen_tokens=4, kv_dtype="fp8"),
            "--kv-dtype",
            "measure supports fp32, fp16 and bf16 KV caches",
        ),
    ],
)
def test_unsupported_runs_are_refused_cleanly(run: RunSpec, field: str, message: str) -> None:
    backend = FakeBackend()
    with pytest.raises(VramfitError) as info:
        measure_train(run, backend=backend)
    assert (info.value.field, info.value.message) == (field, message)
    assert backend.resets == 0


def test_steps_must_be_positive() -> None:
    with pytest.raises(VramfitError, match="at least 1"):
        measure_train(run_of(), steps=0, backend=CpuBackend())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_no_cuda_device() -> None:
    with pytest.raises(VramfitError) as info:
        measure_train(run_of())
    assert str(info.value) == "measure: no CUDA device available"


def test_result_records_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    result = measure_train(run_of(precision="amp-fp16"), steps=1, backend=CpuBackend())
    assert result.alloc_conf == "expandable_segments:True"
    assert result.torch_version == torch.__version__
    assert any("GradScaler" in note for note in result.notes)
