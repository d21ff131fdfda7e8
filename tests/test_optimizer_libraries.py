"""The hf schedule's optimizer state and step against the real optimizers, on the CPU.

A tiny Hugging Face model's parameters, stepped by the optimizer ``vramfit measure`` builds
for each ``--optimizer`` (``vramfit.measure.train._optimizer_factory``, the Trainer's class
and arguments): the state tensors it creates equal what the schedule persists, and the peak
of transformers' Adafactor step, measured op by op, equals the schedule's. bitsandbytes pages
nothing on the CPU (``get_state_buffer`` falls back), so the paged split itself cannot be
seen here: its total is checked. Skipped cleanly without torch, transformers or bitsandbytes.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vramfit.config import RunSpec  # noqa: E402
from vramfit.estimate import schedule  # noqa: E402
from vramfit.estimate.graph import Graph  # noqa: E402
from vramfit.estimate.profiles import hf  # noqa: E402
from vramfit.estimate.timeline import Tape  # noqa: E402
from vramfit.measure.train import _optimizer_factory, paged_bytes  # noqa: E402

# the embedding and lm_head have 2048 x 64 = 131,072 elements: paged on CUDA (>= 1e5)
TINY = {"arch": "llama", "layers": 1, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 2048,
        "ffn": 176}


def _run(optimizer: str, precision: str) -> RunSpec:
    return RunSpec.model_validate(
        {"model": TINY, "workload": {"impl": "hf", "loop": "drops", "precision": precision,
                                     "optimizer": optimizer, "batch": 1, "seq": 8}}
    )


def _real(run: RunSpec) -> tuple[Any, list[Any]]:
    from vramfit.measure.hf import hf_config

    torch.manual_seed(0)
    dtype = torch.bfloat16 if run.workload.precision.value == "bf16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(run.model.resolved(), run.workload), dtype=dtype
    )
    params = list(model.parameters())  # the tied weights counted once, as the optimizer sees
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU"
        opt = _optimizer_factory(torch, run.workload.optimizer)(params)
    return opt, params


def _profile(run: RunSpec) -> tuple[hf.Model, list[Any]]:
    b = hf.resolve(run.model)
    model = hf.Model(b, run.workload, Graph(grad=True), batch=1, seq=1, use_cache=False,
                     all_logits=True, spec=run.model)
    return model, [p for p in model.param_list if p.trainable]


def _step(opt: Any, params: list[Any]) -> None:
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


def _state_bytes(opt: Any, params: list[Any]) -> int:
    seen: dict[int, int] = {}
    for p in params:
        for value in opt.state[p].values():
            if torch.is_tensor(value):
                seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(seen.values())


# adam-8bit's state is held against bitsandbytes in tests/test_finetune_libraries.py
CASES = [("adafactor-hf", "fp32"), ("adafactor-hf", "bf16"), ("paged-adamw-8bit", "bf16"),
         ("paged-adamw-32bit", "fp32")]


@pytest.mark.parametrize(("optimizer", "precision"), CASES)
def test_state_equals_what_the_optimizer_creates(optimizer: str, precision: str) -> None:
    if optimizer != "adafactor-hf":
        pytest.importorskip("bitsandbytes")
    run = _run(optimizer, precision)
    opt, params = _real(run)
    _step(opt, params)
    model, tensors = _profile(run)
    device = sum(schedule._optimizer_state(run.workload.optimizer, model, tensors))
    managed = schedule.managed_state_bytes(run.model, run.workload)
    assert device + managed == _state_bytes(opt, params)
    assert paged_bytes() == 0  # nothing is paged on the CPU
    if optimizer.startswith("paged"):
        assert managed > 0  # on CUDA the embedding's and lm_head's two states are paged


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_adafactor_hf_step_peak(precision: str) -> None:
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from live_bytes import LiveBytes

    run = _run("adafactor-hf", precision)
    opt, params = _real(run)
    _step(opt, params)  # the state exists; the next step is measured
    for p in params:
        p.grad = torch.randn_like(p)
    tracker = LiveBytes()
    with tracker.mode:
        opt.step()
    model, tensors = _profile(run)
    tape = Tape()
    tape.op("optimizer step")
    schedule._adafactor_hf_step(tape, model, tensors)
    predicted = max(tape.finish().live_bytes())
    # besides the full-size fp32 tensors: row and column means and factors, 0-dim scalars
    small = 8 * (2048 + 176) * 4
    assert predicted <= tracker.peak <= predicted + small


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_the_trainer_gives_embeddings_32bit_states(optim: str, tmp_path: Any) -> None:
    """Trainer.create_optimizer with a bitsandbytes 8-bit optimizer registers
    ``{"optim_bits": 32}`` for every nn.Embedding: the state it really creates equals the
    schedule's for the Trainer loop (and is larger than a plain loop's 8-bit embedding)."""
    pytest.importorskip("bitsandbytes")
    run = RunSpec.model_validate(
        {"model": TINY, "workload": {"impl": "hf", "loop": "trainer", "precision": "bf16",
                                     "optimizer": optim, "batch": 1, "seq": 8}}
    )
    from vramfit.measure.hf import hf_config

    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(
        hf_config(run.model.resolved(), run.workload), dtype=torch.bfloat16
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), optim=optim, report_to=[], use_cpu=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=hf_model, args=args)
        opt = trainer.create_optimizer()
        params = list(hf_model.parameters())
        _step(opt, params)
    profile, tensors = _profile(run)
    device = sum(schedule._optimizer_state(run.workload.optimizer, profile, tensors))
    managed = schedule.managed_state_bytes(run.model, run.workload)
    assert device + managed == _state_bytes(opt, params)
    plain = _run(optim.replace("adamw_bnb_8bit", "adam-8bit").replace("_", "-"), "bf16")
    plain_model, plain_tensors = _profile(plain)
    plain_bytes = sum(schedule._optimizer_state(plain.workload.optimizer, plain_model,
                                                plain_tensors))
    plain_bytes += schedule.managed_state_bytes(plain.model, plain.workload)
    assert device + managed > plain_bytes
