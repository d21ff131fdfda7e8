"""Rules of PyTorch and transformers the hf profile follows, checked on the real libraries
(CPU) and then in the profile's step programs. The first three were found by a blind H200 set
(benchmarks/data/h200-hf-validation3/README.md).

- autocast caches the 16-bit cast of a weight that requires grad under ``torch.no_grad`` (what
  ``generate`` runs in) as in grad mode, and not under ``torch.inference_mode``;
- autograd sums the two gradients of a tied weight out of place (a linear's weight gradient is
  a transposed view, and InputBuffer never adds into the incoming gradient);
- eager attention's masked scores are the local ``attn_weights`` until the statement that
  replaces them with the probabilities returns;
- ``torch.matmul`` folds a tokens-first tensor by copy only with batch and sequence above 1
  (the h200-qlora-load traces).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from vramfit.config import RunSpec  # noqa: E402
from vramfit.estimate.kernels import H200  # noqa: E402
from vramfit.estimate.overhead import cublas_workspace_bytes  # noqa: E402
from vramfit.estimate.profiles.reference import inference as reference_inference  # noqa: E402
from vramfit.estimate.schedule import hf_inference, hf_training_steps  # noqa: E402

WORKSPACE = cublas_workspace_bytes(None, (9, 0))
LLAMA = {"arch": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 100}


class _Ops(TorchDispatchMode):
    """The ATen ops run, with the shape of each one's (tensor) output."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
        self.ops.append((str(func), shape))
        return out


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_autocast_caches_weight_casts_under_no_grad_only(mode: str) -> None:
    weight = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(4, 32)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context, torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.linear(x, weight)
        ops = _Ops()
        with ops:
            torch.nn.functional.linear(x, weight)
    weight_casts = [op for op, shape in ops.ops if shape == (64, 32) and "to" in op]
    assert bool(weight_casts) is (mode == "inference_mode")


def _casts(timeline) -> list:  # noqa: ANN001
    return [a for a in timeline.allocations if a.component == "autocast_weight_copies"]


def test_generate_under_autocast_keeps_the_weight_casts_to_its_end() -> None:
    """The hf profile (no_grad) keeps every cast to the end of generate; the reference loop
    (inference_mode) casts again at each use and keeps none to the end."""
    run = RunSpec.model_validate(
        {"model": LLAMA, "workload": {"impl": "hf", "mode": "infer", "precision": "amp-bf16",
                                      "batch": 2, "seq": 32, "gen_tokens": 4}}
    )
    timeline = hf_inference(run.model.resolved(), run.workload, WORKSPACE)
    casts = _casts(timeline)
    assert len(casts) == 2 * 7 + 1  # each layer's seven linears and the lm_head
    assert all(a.end == len(timeline.points) - 1 for a in casts)
    reference = reference_inference(
        run.model.resolved(), run.workload.model_copy(update={"impl": "reference"}), WORKSPACE
    )
    last = len(reference.points) - 1
    assert _casts(reference) and all(a.end < last for a in _casts(reference))


def test_tied_gradients_are_summed_out_of_place() -> None:
    """(Under autocast the lm_head's gradient goes through the cast's backward, a new tensor
    that autograd may add into: pure bf16 here.)"""
    emb = torch.nn.Embedding(100, 16)
    logits = torch.nn.functional.linear(emb(torch.randint(0, 100, (2, 8))), emb.weight)
    ops = _Ops()
    with ops:
        logits.float().sum().backward()
    on_weight = [op for op, shape in ops.ops if shape == (100, 16)]
    assert "aten.add.Tensor" in on_weight and "aten.add_.Tensor" not in on_weight
    run = RunSpec.model_validate(
        {"model": {**LLAMA, "tied": True},
         "workload": {"impl": "hf", "precision": "bf16", "batch": 2, "seq": 32}}
    )
    first, _, _ = hf_training_steps(run.model.resolved(), run.workload, WORKSPACE, H200)
    sums = [name for _, name in first.points if name.startswith("gradients of model.")]
    assert sums == ["gradients of model.embed_tokens.weight summed"]


def test_eager_scores_live_until_the_probabilities_exist() -> None:
    run = RunSpec.model_validate(
        {"model": LLAMA, "workload": {"impl": "hf", "mode": "infer", "attention": "eager",
                                      "precision": "bf16", "batch": 1, "seq": 64}}
    )
    timeline = hf_inference(run.model.resolved(), run.workload, WORKSPACE)
    names = [name for _, name in timeline.points]
    for block in range(2):
        scores = next(a for a in timeline.allocations if a.name.endswith(
            f"layers.{block} masked scores"))
        probabilities = names.index(next(n for n in names if n.endswith(
            f"layers.{block} probabilities")))
        assert scores.end >= probabilities


@pytest.mark.parametrize(("batch", "seq"), [(1, 16), (2, 16), (2, 1)])
def test_matmul_folds_tokens_first_tensors_by_copy_only_where_the_profile_says(
    batch: int, seq: int
) -> None:
    """``torch.matmul`` of a tokens-first (transposed) q copies it when it folds (batch,
    heads), and so does the backward of ``matmul(probs, v).transpose(1, 2).contiguous()``:
    only with batch and sequence above 1. The hf profile's ``_folds_by_copy`` decides both
    copies (the scores' q, the attention output's gradient)."""
    from vramfit.estimate.profiles import hf

    heads, dim = 4, 8
    x = torch.randn(batch, seq, heads * dim, requires_grad=True)
    q = x.view(batch, seq, heads, dim).transpose(1, 2) * 2.0  # rotary keeps the layout
    forward = _Ops()
    with forward:
        torch.matmul(q, torch.randn(batch, heads, dim, seq))
    probs = torch.randn(batch, heads, seq, seq, requires_grad=True)
    v = torch.randn(batch, heads, seq, dim, requires_grad=True)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    backward = _Ops()
    with backward:
        out.backward(torch.ones_like(out))
    copies = [sum("clone" in op for op, _ in log.ops) for log in (forward, backward)]

    run = RunSpec.model_validate(
        {"model": LLAMA, "workload": {"impl": "hf", "batch": batch, "seq": seq}}
    )
    _, model, _, _ = hf.build(run.model.resolved(), run.workload, grad=True, batch=batch, seq=seq)
    assert copies == [int(model._folds_by_copy())] * 2
