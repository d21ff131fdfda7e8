"""``vramfit measure --impl hf``'s code paths for int8 weights and the bitsandbytes /
transformers optimizers, run on the CPU with a tiny model: the model is saved, loaded back
with ``BitsAndBytesConfig(load_in_8bit=True)``, prepared for k-bit training and adapted, then
one step of the plain loop runs with each optimizer. The memory figures need CUDA; what is
checked here is that the code builds what the estimate describes. Skipped cleanly without
torch, transformers, peft or bitsandbytes.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from vramfit.config import RunSpec  # noqa: E402
from vramfit.measure.hf import build_hf_model, run_hf  # noqa: E402
from vramfit.measure.train import _optimizer_factory  # noqa: E402

TINY = {"arch": "llama", "layers": 1, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128,
        "ffn": 176}


def _run(**workload: Any) -> RunSpec:
    return RunSpec.model_validate(
        {"model": TINY, "workload": {"impl": "hf", "batch": 2, "seq": 8, "precision": "bf16",
                                     **workload}}
    )


def _phase(step: int, name: str) -> Any:
    return contextlib.nullcontext()


def test_int8_lora_plain_loop() -> None:
    # (the Trainer's loop with a paged optimizer ran here too, on the CPU backend, in 2.4 s;
    # the Trainer-name mapping it relies on is held in tests/test_finetune_libraries.py)
    run = _run(loop="drops", optimizer="paged-adamw-8bit", quant={"kind": "int8"}, lora={"r": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_hf_model(run.model, run.workload, "cpu", torch.bfloat16)
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj.base_layer, bnb.nn.Linear8bitLt)
        assert q_proj.base_layer.state.threshold == run.workload.quant.int8_threshold
        # prepare_model_for_kbit_training: every parameter but the int8 ones in fp32
        assert {p.dtype for p in model.parameters()} == {torch.int8, torch.float32}
        state: dict[str, Any] = {}
        make = _optimizer_factory(torch, run.workload.optimizer)
        run_hf(torch, model, run.workload, "cpu", make, _phase, 1, state)
    assert type(state["optimizer"]) is bnb.optim.AdamW and state["optimizer"].is_paged
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p in state["optimizer"].state for p in trainable)


def test_int8_generate() -> None:
    run = _run(mode="infer", gen_tokens=3, quant={"kind": "int8"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_hf_model(run.model, run.workload, "cpu", torch.bfloat16)
        state: dict[str, Any] = {}
        run_hf(torch, model, run.workload, "cpu", None, _phase, 1, state)
    assert state["out"].shape == (2, 8 + 3)

