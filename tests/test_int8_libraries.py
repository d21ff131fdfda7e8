"""LLM.int8() (bitsandbytes ``Linear8bitLt``) against the real libraries, on the CPU.

What autograd keeps for a LoRA model on an int8 base, loaded as users load it
(``BitsAndBytesConfig(load_in_8bit=True)`` from a saved checkpoint, then peft's
``prepare_model_for_kbit_training`` and ``get_peft_model``): every tensor the saved-tensor
hooks see while block 0 runs, plus what ``MatMul8bitLt`` keeps outside them
(``ctx.tensors``, a plain attribute). On the CPU ``bnb.matmul`` routes training to
``MatMul8bitFp``; the model runs in ``eval()`` mode (no dropout is configured, so nothing
else changes) to take ``MatMul8bitLt``, the function CUDA runs. The backward of one
``MatMul8bitLt`` is Python (``CB.to(dtype, copy=True)``, the matmul) and is measured op by op.
Skipped cleanly without torch, transformers, peft or bitsandbytes.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from live_bytes import LiveBytes  # noqa: E402
from vramfit.config import RunSpec  # noqa: E402
from vramfit.estimate.graph import DType, Graph  # noqa: E402
from vramfit.estimate.ops import Ops  # noqa: E402
from vramfit.estimate.profiles import hf  # noqa: E402

B, S = 2, 16
TINY = {"arch": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128,
        "ffn": 176}
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int64: "int64", torch.bool: "bool", torch.int8: "int8"}


def _run(targets: Any) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": TINY,
            "workload": {"impl": "hf", "loop": "drops", "batch": B, "seq": S, "precision": "bf16",
                         "attention": "eager", "optimizer": "adamw",
                         "quant": {"kind": "int8"}, "lora": {"r": 4, "targets": targets}},
        }
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vramfit.measure.hf import hf_config

    run = _run("all-linear")
    folder = tmp_path_factory.mktemp("int8-llama")
    torch.manual_seed(0)
    cfg = hf_config(run.model.resolved(), run.workload)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def _int8_model(folder: Path) -> Any:
    """The saved checkpoint loaded as users load it in 8 bits (warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder,
            quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
            dtype=torch.bfloat16,
            device_map="cpu",
            attn_implementation="eager",
        )


def _load(folder: Path, targets: Any) -> Any:
    model = _int8_model(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))


def _real_saved(model: Any) -> Counter:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    block = model.base_model.model.model.layers[0]
    active = {"on": False}
    seen: dict[int, tuple[int, str]] = {}

    def note(t: torch.Tensor | None) -> None:
        if t is None or not active["on"]:
            return
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.untyped_storage().nbytes():
            seen[ptr] = (t.untyped_storage().nbytes() // t.element_size(), NAMES[t.dtype])

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        return t

    def kept(module: Any, args: Any, out: torch.Tensor) -> None:
        if out.grad_fn is None:  # its input needs no gradient: nothing kept
            return
        assert type(out.grad_fn).__name__ == "MatMul8bitLtBackward"
        for t in out.grad_fn.tensors:  # (CAt, subA, A)
            note(t)

    hooks = [block.register_forward_pre_hook(lambda *_: active.update(on=True)),
             block.register_forward_hook(lambda *_: active.update(on=False))]
    hooks += [m.register_forward_hook(kept) for m in block.modules()
              if isinstance(m, bnb.nn.Linear8bitLt)]
    model.eval()  # MatMul8bitLt on the CPU too (see the module docstring)
    ids = torch.randint(0, TINY["vocab"], (B, S))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for h in hooks:
        h.remove()
    return Counter(seen.values())


def _profile_saved(run: RunSpec) -> Counter:
    graph, _, _, _ = hf.build(run.model, run.workload, grad=True, batch=B, seq=S)
    seen: dict[int, tuple[int, str]] = {}
    for node in graph.nodes:
        if node.name.startswith("block 0 "):
            for t in (*node.saved, *node.kept):
                if not t.root.leaf:
                    seen[id(t.root)] = (t.root.numel, t.root.dtype.value)
    return Counter(seen.values())


@pytest.mark.parametrize("targets", ["all-linear", None], ids=["all-linear", "q_v"])
def test_lora_on_int8_block_saves_what_the_libraries_keep(checkpoint: Path, targets: Any) -> None:
    model = _load(checkpoint, targets)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    # what transformers builds: frozen int8 weights, BitsAndBytesConfig's threshold 6.0
    assert isinstance(q_proj, bnb.nn.Linear8bitLt)
    assert not q_proj.state.has_fp16_weights and q_proj.state.threshold == 6.0
    real, predicted = _real_saved(model), _profile_saved(_run(targets))
    assert predicted == real, f"profile only: {predicted - real}; real only: {real - predicted}"


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matmul8bitlt_backward_temporaries(dtype: Any, grad_dtype: Any) -> None:
    """The backward's peak (the dequantized weight, a cast of the incoming gradient, the
    input's gradient) equals the op's backward in the estimator, up to the row scales."""
    from bitsandbytes.autograd._functions import MatMul8bitLt

    from vramfit.estimate.graph import Backward, run_forward
    from vramfit.estimate.timeline import Tape

    n, k, m = 40, 96, 72
    layer = bnb.nn.Linear8bitLt(k, m, bias=False, has_fp16_weights=False, threshold=6.0)
    layer = layer.to("cpu")
    layer.init_8bit_state()
    x = torch.randn(n, k, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = MatMul8bitLt.apply(x, layer.weight, None, None, layer.state)
    grad = torch.randn(n, m, dtype=grad_dtype)
    peak = LiveBytes()
    with peak.mode:
        (gx,) = torch.autograd.grad(out, x, grad)
    assert gx.dtype == dtype and out.dtype == dtype
    real = peak.peak

    g = Graph(grad=True)
    ops = Ops(g, None)
    xt = g.leaf("x", n * k, DType(NAMES[dtype]), requires_grad=True)
    w = g.leaf("weight", m * k, DType.int8, requires_grad=False)
    y = ops.linear_8bit("layer", xt, w, m, k, threshold=6.0)
    tape = Tape()
    sim = run_forward(g, tape)
    node = next(nd for nd in g.nodes if y in nd.outputs)  # the op that made y
    assert node is not None and node.kept == [xt] and not node.saved
    before = len(tape.records)
    incoming = sim.new_grad("grad", n * m, DType(NAMES[grad_dtype]), "activations")
    node.backward(Backward(sim, node, [incoming]))
    made = tape.records[before + 1 :]  # the backward's own allocations
    # alive together, but for the 'SCB / 127' scratch (freed at once)
    predicted = sum(sum(r.sizes) for r in made if not r.name.endswith("SCB / 127"))
    small = 4 * m * 4  # the row scales and their product (a few fp32 vectors of m)
    assert predicted <= real <= predicted + small


@pytest.mark.parametrize("reentrant", [False, True], ids=["trainer", "reentrant"])
def test_checkpointing_keeps_what_matmul8bitlt_keeps(
    checkpoint: Path, reentrant: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ctx.tensors is outside the saved-tensor hooks: under a non-reentrant checkpoint (the
    Trainer's) the forward's graph keeps every int8 layer's input that needs a gradient;
    under a reentrant one (prepare_model_for_kbit_training's own) the region ran without
    grad and keeps none (its recompute keeps them, layer by layer, in backward). The
    profile's graph keeps the same ones alive at the forward's end."""
    from bitsandbytes.autograd import _functions

    from vramfit.estimate.graph import run_forward
    from vramfit.estimate.timeline import Tape

    # training mode (so that transformers checkpoints) with the function CUDA runs
    monkeypatch.setattr(_functions, "MatMul8bitFp", _functions.MatMul8bitLt)
    model = _int8_model(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.prepare_model_for_kbit_training(
            model, gradient_checkpointing_kwargs={"use_reentrant": reentrant}
        )
        model = peft.get_peft_model(model, peft.LoraConfig(r=4))
    block = model.base_model.model.model.layers[0]
    alive: set[str] = set()

    def note(name: str) -> Any:
        def hook(module: Any, args: Any, out: torch.Tensor) -> None:
            # what the forward's graph keeps: MatMul8bitLt's ctx.tensors = (CAt, subA, A)
            if out.grad_fn is not None and out.grad_fn.tensors[2] is not None:
                assert out.grad_fn.tensors[2].untyped_storage().data_ptr() == (
                    args[0].untyped_storage().data_ptr()
                )
                alive.add(name)
        return hook

    for name, m in block.named_modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            m.register_forward_hook(note(name.removesuffix(".base_layer").rsplit(".")[-1]))
    model.train()
    ids = torch.randint(0, TINY["vocab"], (B, S))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(input_ids=ids, labels=ids)
        forward = set(alive)  # the hooks run again in a reentrant recompute
        out.loss.backward()
    alive = forward

    loop = "drops" if reentrant else "trainer"
    run = RunSpec.model_validate(
        {**_run(None).model_dump(mode="json"), "workload": {
            **_run(None).workload.model_dump(mode="json"), "checkpointing": "full", "loop": loop}}
    )
    graph, _, _, _ = hf.build(run.model, run.workload, grad=True, batch=B, seq=S)
    sim = run_forward(graph, Tape())
    kept = {
        n.name.split(".")[-1].split(" ")[0]
        for n in graph.nodes
        if n.name.startswith("block 0 ") and n.kept and sim.st(n.kept[0]).key is not None
    }
    assert kept == alive
    assert bool(alive) is not reentrant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outlier_columns_are_kept_as_matmul8bitlt_keeps_them(dtype: Any) -> None:
    """With input columns at or above the threshold, MatMul8bitLt keeps ``subA`` (those
    columns of x, in x's dtype) in ctx.tensors beside x; the estimator keeps the same, and
    its forward makes subB's chain and the addmm output besides."""
    from bitsandbytes.autograd._functions import MatMul8bitLt

    from vramfit.estimate.graph import run_forward
    from vramfit.estimate.timeline import Tape

    n, k, m, cols = 40, 96, 72, 7
    layer = bnb.nn.Linear8bitLt(k, m, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.init_8bit_state()
    x = torch.randn(n, k, dtype=dtype) * 0.5
    x[3, :cols] = 8.0  # one row reaches the threshold in the first `cols` columns
    x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = MatMul8bitLt.apply(x, layer.weight, None, None, layer.state)
    cat, sub_a, a = out.grad_fn.tensors
    assert cat is None and a.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    real = (sub_a.numel(), NAMES[sub_a.dtype])
    assert real == (n * cols, NAMES[dtype])

    def kept(outlier_cols: int) -> tuple[list[tuple[int, str]], int]:
        g = Graph(grad=True)
        ops = Ops(g, None)
        xt = g.leaf("x", n * k, DType(NAMES[dtype]), requires_grad=True)
        w = g.leaf("weight", m * k, DType.int8, requires_grad=False)
        y = ops.linear_8bit("layer", xt, w, m, k, threshold=6.0, outlier_cols=outlier_cols)
        tape = Tape()
        run_forward(g, tape)
        node = next(nd for nd in g.nodes if y in nd.outputs)
        return [(t.numel, t.dtype.value) for t in node.kept], max(tape.finish().live_bytes())

    with_outliers, peak = kept(cols)
    assert with_outliers == [(n * k, NAMES[dtype]), real]
    without, peak_without = kept(0)
    assert without == [(n * k, NAMES[dtype])] and peak > peak_without
