"""The reference loop as a graph of ops (``profiles/reference.py``) against the hand-written
program (``training._Step``, ``inference.ForwardPass``) that ``--impl reference`` runs.

Where ``reference.unsupported`` says nothing, both must feed the caching allocator the same
requests: the same sizes in the same order, each freed between the same two requests. That
is what decides every byte the replay reports, so the test compares those event streams, and
the replay's peak and reserved bytes besides.
"""

from __future__ import annotations

import itertools

import pytest

from vramfit.config import RunSpec
from vramfit.estimate.inference import build_inference_timeline
from vramfit.estimate.overhead import cublas_workspace_bytes
from vramfit.estimate.profiles import reference
from vramfit.estimate.timeline import Timeline, replay
from vramfit.estimate.training import build_training_steps

WORKSPACE = cublas_workspace_bytes(None, None)

MODELS = {
    "llama": {"arch": "llama", "layers": 2, "hidden": 128, "heads": 4, "vocab": 1000},
    "llama-gqa-tied-bias": {
        "arch": "llama", "layers": 2, "hidden": 128, "heads": 4, "kv_heads": 2, "vocab": 999,
        "tied": True, "qkv_bias": True,
    },
    "gpt2": {"arch": "gpt2", "layers": 2, "hidden": 128, "heads": 4, "vocab": 1000},
    "moe": {
        "arch": "llama", "layers": 2, "hidden": 128, "heads": 4, "vocab": 1000, "experts": 4,
        "experts_per_token": 2, "expert_ffn": 96, "shared_experts": 1, "shared_expert_ffn": 64,
        "params": 1_234_567,  # a declared size scales every parameter's bytes
    },
    "moe-biased": {
        "arch": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "vocab": 500, "experts": 3,
        "experts_per_token": 2, "expert_ffn": 32,
    },
    "pythia-like": {
        "arch": "gpt2", "layers": 2, "hidden": 128, "heads": 4, "vocab": 1000,
        "positions": "rope", "tied": False,
    },
}
# amp-fp16 differs from amp-bf16 only in eager softmax's input copy
PRECISIONS = {"fp32": ("flash", "eager"), "bf16": ("flash", "eager"),
              "amp-bf16": ("flash", "eager"), "amp-fp16": ("eager",)}


def _events(timeline: Timeline) -> list[tuple]:
    """The requests the replay makes: ("alloc", sizes) in order, and between them the set of
    earlier requests freed (by ordinal: which tensor is freed matters, not only its size)."""
    allocs = sorted(range(len(timeline.allocations)), key=lambda k: timeline.allocations[k].start)
    ordinal = {k: j for j, k in enumerate(allocs)}
    n = len(timeline.points)
    starts: dict[int, list[int]] = {}
    ends: dict[int, list[int]] = {}
    for k, a in enumerate(timeline.allocations):
        starts.setdefault(a.start, []).append(k)
        if not a.persistent:
            assert a.end is not None
            ends.setdefault(a.end if a.end < n - 1 else n, []).append(ordinal[k])
    out: list[tuple] = []
    freed: list[int] = []
    for i in range(n + 1):
        made = starts.get(i, [])
        if made and freed:
            out.append(("free", tuple(sorted(freed))))
            freed = []
        for k in made:
            a = timeline.allocations[k]
            out.append(("persist" if a.persistent else "alloc", a.sizes))
        freed += ends.get(i, [])
    return out + ([("free", tuple(sorted(freed)))] if freed else [])


def _runs() -> list[tuple[str, RunSpec]]:
    runs = []
    cases = [(p, a) for p, attentions in PRECISIONS.items() for a in attentions]
    for (name, model), (precision, attention) in itertools.product(MODELS.items(), cases):
        for checkpointing in ("none", "selective", "full"):
            workload = {"impl": "reference", "batch": 2, "seq": 96, "precision": precision,
                        "attention": attention, "checkpointing": checkpointing}
            runs.append((f"{name}-{precision}-{attention}-{checkpointing}",
                         RunSpec(model=model, workload=workload)))
        for gen in (0, 3):
            workload = {"impl": "reference", "mode": "infer", "batch": 2, "seq": 96,
                        "precision": precision, "attention": attention, "gen_tokens": gen}
            runs.append((f"{name}-{precision}-{attention}-infer{gen}",
                         RunSpec(model=model, workload=workload)))
    return runs


RUNS = _runs()


@pytest.mark.parametrize("run", [r for _, r in RUNS], ids=[name for name, _ in RUNS])
def test_profile_makes_the_hand_written_programs_requests(run: RunSpec) -> None:
    spec, w = run.model.resolved(), run.workload
    assert reference.unsupported(spec, w) is None
    if w.mode.value == "train":
        old = build_training_steps(spec, w, WORKSPACE)
        new = reference.training_steps(spec, w, WORKSPACE)
        assert new[2] == old[2]  # block 0's bytes by part
        for a, b in zip(old[:2], new[:2], strict=True):
            assert _events(b) == _events(a)
        steps_old, steps_new = [old[0], old[1], old[1]], [new[0], new[1], new[1]]
    else:
        steps_old = [build_inference_timeline(spec, w, WORKSPACE)]
        steps_new = [reference.inference(spec, w, WORKSPACE)]
        assert _events(steps_new[0]) == _events(steps_old[0])
    r_old, r_new = replay(steps_old), replay(steps_new)
    assert (r_new.peak_allocated, r_new.reserved) == (r_old.peak_allocated, r_old.reserved)


@pytest.mark.parametrize(
    ("model", "workload", "reason"),
    [
        ({"arch": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2,
          "positions": "rope"}, {}, "grouped K/V"),
    ],
)
def test_unported_options_are_named(model: dict, workload: dict, reason: str) -> None:
    run = RunSpec(model=model, workload={"impl": "reference", **workload})
    why = reference.unsupported(run.model, run.workload)
    assert why is not None and reason in why
