"""``vramfit measure --gpus N --tp T``'s code path on the CPU (no memory is measured): the
real DTensor plan, FSDP2 over it and the training loop run end to end under a fake process
group, so that a GPU run cannot die of a Python error (FSDP2's CPUOffloadPolicy too: its
shards and optimizer then stay on the CPU); what cannot be measured is refused in one line.
And FSDP2's integer ``reshard_after_forward``, held against the real FSDPParam state after
forward."""

from __future__ import annotations

import pytest

from vramfit.config import RunSpec
from vramfit.errors import VramfitError

TINY = {"arch": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128,
        "ffn": 176}


def _run(parallel: dict, model: dict | None = None, **workload: object) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": model or TINY,
            "workload": {"impl": "hf", "loop": "drops", "batch": 2, "seq": 16,
                         "optimizer": "adamw", **workload},
            "parallel": parallel,
        }
    )


@pytest.mark.parametrize(
    ("parallel", "workload"),
    [
        ({"gpus": 2, "tp": 2}, {"precision": "amp-bf16"}),
        ({"gpus": 4, "tp": 2, "sp": True, "fsdp": "full"},
         {"precision": "bf16", "checkpointing": "full"}),
        ({"gpus": 4, "fsdp": "full", "offload": "params"},
         {"precision": "amp-bf16", "checkpointing": "full"}),
    ],
    ids=["tp-amp", "fsdp-tp-sp-ckpt", "fsdp-cpu-offload-ckpt"],
)
def test_tp_measure_path_runs_on_cpu(parallel: dict, workload: dict) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch.distributed as dist

    from vramfit.measure.backend import CpuBackend
    from vramfit.measure.train import measure_train

    try:
        m = measure_train(_run(parallel, **workload), steps=2, backend=CpuBackend())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not m.oom
    assert [s["phase"] for s in m.steps[:3]] == ["forward", "backward", "optimizer"]
    assert any(n.startswith("communication is faked") for n in m.notes)


@pytest.mark.parametrize(
    ("parallel", "model", "message"),
    [
        ({"gpus": 4, "tp": 2, "ddp": True}, None, "measure runs FSDP2 full or shard-grad-op"),
        ({"gpus": 4, "tp": 2, "pp": 2}, None, "measure runs FSDP2 full or shard-grad-op"),
        ({"gpus": 4, "zero": 3}, None, "measure runs FSDP2 full or shard-grad-op"),
        ({"gpus": 4, "tp": 2, "fsdp": "full", "offload": "params"}, None,
         "measure runs --offload params without --tp"),
        ({"gpus": 2, "tp": 2},
         {"arch": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "vocab": 128},
         "measure --tp runs Llama-style models"),
    ],
)
def test_what_cannot_be_measured_is_refused(
    parallel: dict, model: dict | None, message: str
) -> None:
    from vramfit.measure.fsdp import check_fsdp_measurable

    with pytest.raises(VramfitError, match=message):
        check_fsdp_measurable(_run(parallel, model))


def test_cpu_offload_needs_an_optimizer_that_steps_cpu_tensors() -> None:
    from vramfit.measure.fsdp import check_fsdp_measurable

    run = _run({"gpus": 4, "fsdp": "full", "offload": "params"}, optimizer="adam-8bit")
    with pytest.raises(VramfitError, match="steps on the CPU: use a torch.optim optimizer"):
        check_fsdp_measurable(run)


@pytest.mark.parametrize("k", [2, 4])
def test_reshard_after_forward_to_k_ranks_keeps_what_fsdp2_keeps(k: int) -> None:
    """After forward, FSDP2 ``reshard_after_forward=K`` keeps each layer's 1/K post-forward
    shards (``FSDPParam._sharded_post_forward_param_data``): their bytes on the CPU against
    the post-forward shards the estimator replays."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch.distributed as dist

    from vramfit.estimate import fsdp
    from vramfit.estimate.graph import end_forward, run_forward
    from vramfit.estimate.profiles import hf
    from vramfit.estimate.timeline import Tape
    from vramfit.measure.fsdp import build_fsdp_model, decoder_layers

    run = _run({"gpus": 8, "fsdp": "full", "reshard_after_forward": k}, precision="amp-bf16")
    try:
        model = build_fsdp_model(torch, run.model.resolved(), run.workload, run.parallel, "cpu")
        ids = torch.randint(0, 128, (2, 16))
        model(input_ids=ids, labels=ids)
        real = sum(
            p._sharded_post_forward_param_data.untyped_storage().nbytes()
            for layer in decoder_layers(model)
            for p in layer._get_fsdp_state()._fsdp_param_group.fsdp_params
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    spec = run.model.resolved()
    graph, m, _, _ = hf.build(spec, fsdp.compute_workload(run.workload), grad=True, batch=2,
                              seq=16)
    hooks = fsdp.attach(m, run.parallel, run.workload.precision)
    tape = Tape()
    tape.op("start")
    end_forward(run_forward(graph, tape, hooks=hooks))
    timeline = tape.finish()
    kept = sum(
        a.n_bytes for a in timeline.allocations
        if a.name.endswith("post-forward shard") and (a.end is None or a.end >= timeline.last)
    )
    assert kept == real


@pytest.mark.parametrize(
    "parallel",
    [
        ({"gpus": 8, "fsdp": "full", "reshard_after_forward": 3}, "must divide the shard group"),
        ({"gpus": 8, "fsdp": "full", "reshard_after_forward": 0}, "must divide the shard group"),
        (
            {"gpus": 8, "tp": 2, "fsdp": "full", "reshard_after_forward": 2},
            "not possible with tp",
        ),
    ],
)
def test_an_integer_reshard_after_forward_must_divide_the_shard_group(
    parallel: tuple[dict, str],
) -> None:
    from pydantic import ValidationError

    layout, message = parallel
    with pytest.raises(ValidationError) as err:
        _run(layout)
    (error,) = err.value.errors()
    assert error["loc"] == ("parallel", "reshard_after_forward")
    assert message in error["msg"]


def test_reshard_after_forward_one_and_the_group_size_are_false_and_true() -> None:
    # fully_shard's _get_post_forward_mesh_info: 1 is False, the shard mesh size is True
    for k, same in ((1, False), (8, True)):
        layout = {"gpus": 8, "fsdp": "full"}
        assert _run({**layout, "reshard_after_forward": k}).parallel.reshards is same
