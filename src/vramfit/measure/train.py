"""Measure the real GPU memory of training steps (or an inference pass) of a reference model.

``measure_train`` builds the model of a ``RunSpec`` on the device, runs ``steps`` training
steps on random token ids and records, for each phase of each step, the caching allocator's
peak (``max_memory_allocated``, reset at the start of the phase) and what stays allocated at
its end. Around that it reads what the allocator cannot see: the CUDA context (device used
before any tensor exists) and the device used at the end (context + reserved pool + library
workspaces). An out-of-memory error at any point is a result (``oom=True``), not a crash.

Precision mapping (``Workload.precision``):
- ``fp32``: fp32 weights, no autocast.
- ``amp-fp16`` / ``amp-bf16``: fp32 weights, grads and optimizer state;
  ``torch.autocast(device, dtype)`` around the forward (loss included), backward outside it.
  ``amp-fp16`` scales the loss with ``torch.amp.GradScaler``.
- ``bf16`` / ``fp16``: weights, grads and optimizer state in that dtype, no autocast.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vramfit.config import Impl, Mode, Optimizer, Precision, RunSpec, Workload
from vramfit.errors import VramfitError
from vramfit.estimate.params import count_params
from vramfit.measure.backend import Backend, CudaBackend, import_torch
from vramfit.measure.models import build_model, check_measurable

ProgressFn = Callable[[str, int, int], None]

LR = 1e-4  # irrelevant to memory; fixed so runs are reproducible

_WEIGHT_DTYPE = {
    Precision.fp32: "float32",
    Precision.amp_fp16: "float32",
    Precision.amp_bf16: "float32",
    Precision.bf16: "bfloat16",
    Precision.fp16: "float16",
}
_AUTOCAST_DTYPE = {Precision.amp_fp16: "float16", Precision.amp_bf16: "bfloat16"}
_KV_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class TrainMeasurement:
    """What one ``measure_train`` run saw. Bytes are ints; JSON-ready via ``asdict``.

    ``phases``: phase -> the largest peak allocated in that phase over all steps
    (train: forward, backward, optimizer; infer: kv_cache, prefill, decode).
    ``phase_end``: phase -> the largest amount still allocated at the end of that phase.
    ``steps``: one record per step and phase, in order; a phase that an OOM interrupted is
    recorded with ``"oom": True`` and counts in ``peak_allocated_bytes`` but not in ``phases``.
    ``total_bytes``: device used (total - free) after the last step: it includes the CUDA
    context, the allocator's reserved pool and library workspaces. ``context_bytes``: device
    used right after CUDA initialisation, before any tensor. ``weights_bytes``: allocated
    right after the model was built. ``peak_allocated_bytes`` is the run's largest, the
    build's own included (a tied model built with from_config makes and frees an lm_head).
    """

    params: int
    phases: dict[str, int]
    phase_end: dict[str, int]
    peak_allocated_bytes: int
    total_bytes: int
    reserved_peak_bytes: int
    context_bytes: int
    weights_bytes: int
    steps: list[dict[str, Any]]
    oom: bool
    reached: str | None
    device_name: str
    device_total_bytes: int
    torch_version: str
    alloc_conf: str | None
    notes: list[str] = field(default_factory=list)
    # the allocator's limit the run had (None: the whole GPU), and how often it freed its
    # cache to retry a cudaMalloc that failed (torch.cuda.memory_stats num_alloc_retries)
    memory_limit_bytes: int | None = None
    alloc_retries: int = 0


class _Recorder:
    """Reads the allocator around each phase and keeps the per-step records."""

    def __init__(self, backend: Backend, on_progress: ProgressFn | None) -> None:
        self.backend = backend
        self.on_progress = on_progress
        self.steps: list[dict[str, Any]] = []
        self.reached: str | None = None
        self.reserved_peak = 0
        self.weights_bytes = 0
        self.build_peak = 0
        self.notes: list[str] = []
        self._open: tuple[int, str] | None = None

    def note_reserved(self) -> None:
        # reset_peak clears the reserved peak too, so fold it in before every reset.
        self.reserved_peak = max(self.reserved_peak, self.backend.max_memory_reserved())

    def begin(self, step: int, phase: str, label: str, total: int | None) -> None:
        """Start a phase: reset the peak. ``total`` None: the caller reports progress."""
        self.reached = label
        if self.on_progress is not None and total is not None:
            self.on_progress(phase, step, total)
        self.note_reserved()
        self._open = (step, phase)
        self.backend.reset_peak()

    def end(self) -> None:
        assert self._open is not None
        self.backend.synchronize()
        self._close()

    def failed(self) -> None:
        """Record the phase an OOM interrupted (its peak is the allocator's at the failure)."""
        if self._open is not None:
            self._close(oom=True)

    def _close(self, **extra: bool) -> None:
        assert self._open is not None
        step, phase = self._open
        self.steps.append(
            {
                "step": step,
                "phase": phase,
                "peak_allocated_bytes": self.backend.max_memory_allocated(),
                "end_allocated_bytes": self.backend.memory_allocated(),
                **extra,
            }
        )
        self.note_reserved()
        self._open = None


def _optimizer_factory(torch: Any, optimizer: Optimizer) -> Callable[[Any], Any] | None:
    """A function params -> optimizer, or None for ``none``. Checked before CUDA starts."""
    if optimizer is Optimizer.none:
        return None
    if optimizer in (Optimizer.adamw, Optimizer.adamw_foreach):
        return lambda params: torch.optim.AdamW(params, lr=LR, foreach=True, fused=False)
    if optimizer is Optimizer.adamw_forloop:
        return lambda params: torch.optim.AdamW(params, lr=LR, fused=False)
    if optimizer is Optimizer.adamw_fused:
        return lambda params: torch.optim.AdamW(params, lr=LR, fused=True)
    if optimizer is Optimizer.sgd:
        return lambda params: torch.optim.SGD(params, lr=LR, momentum=0.0, foreach=True)
    if optimizer is Optimizer.sgd_momentum:
        return lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, foreach=True)
    if optimizer is Optimizer.adafactor:
        if not hasattr(torch.optim, "Adafactor"):
            raise VramfitError(
                f"adafactor needs torch>=2.5 (torch.optim.Adafactor); found {torch.__version__}",
                field="--optimizer",
            )
        return lambda params: torch.optim.Adafactor(params, lr=LR)
    if optimizer is Optimizer.adafactor_hf:
        # as the Trainer's optim="adafactor" builds it (trainer_optimizer.py _get_adafactor)
        from transformers.optimization import Adafactor

        return lambda params: Adafactor(
            params, lr=LR, scale_parameter=False, relative_step=False
        )
    bnb_bits = {
        Optimizer.adam_8bit: (8, False),
        Optimizer.paged_adamw_8bit: (8, True),
        Optimizer.paged_adamw_32bit: (32, True),
    }
    if optimizer in bnb_bits:
        try:
            import bitsandbytes
        except ImportError:
            raise VramfitError(
                f"{optimizer.value} needs bitsandbytes (pip install bitsandbytes)",
                field="--optimizer",
            ) from None
        if optimizer is Optimizer.adam_8bit:
            return lambda params: bitsandbytes.optim.AdamW8bit(params, lr=LR)
        bits, paged = bnb_bits[optimizer]
        # the Trainer's _get_bitsandbytes_optimizer: bnb.optim.AdamW(optim_bits, is_paged)
        return lambda params: bitsandbytes.optim.AdamW(
            params, lr=LR, optim_bits=bits, is_paged=paged
        )
    raise AssertionError(optimizer)


def paged_bytes() -> int:
    """Bytes of the CUDA managed memory bitsandbytes' paged optimizers hold
    (functional.py GlobalPageManager: every ``get_paged`` state buffer); 0 without them."""
    import sys

    functional = sys.modules.get("bitsandbytes.functional")
    if functional is None:
        return 0
    tensors = functional.GlobalPageManager.get_instance().paged_tensors
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_workload(spec: Any, workload: Workload) -> None:
    # (a context longer than a learned position table is refused by RunSpec itself)
    del spec
    if workload.mode is Mode.infer and workload.kv_dtype is not None:
        if workload.kv_dtype.value not in _KV_DTYPE:
            raise VramfitError("measure supports fp32, fp16 and bf16 KV caches", field="--kv-dtype")


def _oom_errors(torch: Any) -> tuple[type[BaseException], ...]:
    errors = {getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError}
    return tuple(e for e in errors if e is not None)


def measure_train(
    run: RunSpec,
    *,
    steps: int = 3,
    backend: Backend | None = None,
    on_progress: ProgressFn | None = None,
    memory_limit_bytes: int | None = None,
) -> TrainMeasurement:
    """Run ``run`` for real and measure its memory; see the module docstring.

    ``backend`` defaults to the first CUDA device (VramfitError without one); tests pass a
    ``CpuBackend`` or a fake. ``on_progress(phase, step, total)`` is called as each phase
    starts. Training runs ``steps`` steps; inference runs one prefill (+ decode) pass.
    ``memory_limit_bytes``: the most the caching allocator may hold, as on a GPU that much
    smaller (``torch.cuda.set_per_process_memory_fraction``).
    """
    torch = import_torch()
    spec = run.model.resolved()
    workload = run.workload
    if workload.impl is Impl.reference:
        check_measurable(spec)
    else:
        from vramfit.estimate.profiles.hf import hf_unsupported

        reason = hf_unsupported(spec)
        if reason:
            raise VramfitError(f"measure --impl hf: {reason}", field="--preset")
    _check_workload(spec, workload)
    par = run.parallel
    if not par.single:
        from vramfit.measure.fsdp import check_fsdp_measurable

        check_fsdp_measurable(run)
    if steps < 1:
        raise VramfitError("must be at least 1", field="--steps")
    make_optimizer = (
        _optimizer_factory(torch, workload.optimizer) if workload.mode is Mode.train else None
    )
    if backend is None:
        backend = CudaBackend()

    # The context: device used once CUDA is initialised, before any tensor is allocated.
    backend.synchronize()
    free, device_total = backend.mem_get_info()
    context_bytes = device_total - free
    if memory_limit_bytes is not None:
        backend.limit_memory(memory_limit_bytes)
    retries_before = backend.alloc_retries()

    rec = _Recorder(backend, on_progress)
    state: dict[str, Any] = {}  # every tensor-owning object, so an OOM can drop them all
    oom = False
    total_bytes = 0
    @contextlib.contextmanager
    def phase(step: int, name: str) -> Any:
        rec.begin(step, name, f"step {step} {name}", steps)
        yield
        rec.end()

    try:
        torch.manual_seed(0)
        rec.reached = "building the model"
        if not par.single:
            from vramfit.measure import fsdp

            state["model"] = fsdp.build_fsdp_model(torch, spec, workload, par, backend.device)
            if fsdp.fake_group():
                rec.notes.append(fsdp.COMMUNICATION_NOTE.format(n=par.gpus))
        elif workload.impl is Impl.hf:
            from vramfit.measure.hf import build_hf_model, run_hf

            state["model"] = build_hf_model(spec, workload, backend.device, _dtype(torch, workload))
        else:
            state["model"] = build_model(spec, workload, backend.device, _dtype(torch, workload))
        backend.synchronize()
        rec.weights_bytes = backend.memory_allocated()
        # the build's own peak (from_config's untied lm_head, made and freed when tied):
        # the phases reset the counter, so it is read before the first of them
        rec.build_peak = backend.max_memory_allocated()
        if not par.single:
            from vramfit.measure.fsdp import compute_workload
            from vramfit.measure.hf import plain_loop

            plain_loop(
                torch, state["model"], compute_workload(workload, par), backend.device,
                make_optimizer, phase, steps, state,
            )
        elif workload.impl is Impl.hf:
            run_hf(
                torch, state["model"], workload, backend.device, make_optimizer, phase, steps,
                state,
            )
        elif workload.mode is Mode.train:
            _train(torch, state, workload, backend, rec, steps, make_optimizer)
        else:
            _infer(torch, state, spec, workload, backend, rec)
        backend.synchronize()
        free, _ = backend.mem_get_info()  # no empty_cache: the reserved pool counts
        total_bytes = device_total - free
        rec.note_reserved()
        quant = workload.quant
        if workload.impl is Impl.hf and quant is not None and quant.kind.value == "int8":
            from vramfit.measure.hf import int8_outlier_fractions

            found = int8_outlier_fractions(torch, state["model"], workload, backend.device)
            listed = ",".join(f"{k}={v:g}" for k, v in found.items() if v)
            rec.notes.append(
                "LLM.int8 outlier columns (fraction of each layer's input, mean over layers), "
                f"measured after the run: --int8-outliers {listed or 'none'}"
            )
        managed = paged_bytes()
        if managed:
            rec.notes.append(
                f"paged optimizer state: {managed} bytes of CUDA managed memory (in the device "
                "total while resident; not in peak allocated)"
            )
        rec.reached = None
    except _oom_errors(torch):
        oom = True
        rec.failed()
        free, _ = backend.mem_get_info()
        total_bytes = device_total - free
    state.clear()
    if oom:  # the failed frames are gone with the exception; collect their cycles too
        gc.collect()
        backend.empty_cache()

    phases: dict[str, int] = {}
    phase_end: dict[str, int] = {}
    for record in rec.steps:
        if record.get("oom"):
            continue
        name = record["phase"]
        phases[name] = max(phases.get(name, 0), record["peak_allocated_bytes"])
        phase_end[name] = max(phase_end.get(name, 0), record["end_allocated_bytes"])
    peak = max([r["peak_allocated_bytes"] for r in rec.steps] + [rec.weights_bytes, rec.build_peak])
    return TrainMeasurement(
        params=count_params(spec).total,
        phases=phases,
        phase_end=phase_end,
        peak_allocated_bytes=peak,
        total_bytes=total_bytes,
        reserved_peak_bytes=rec.reserved_peak,
        context_bytes=context_bytes,
        weights_bytes=rec.weights_bytes,
        steps=rec.steps,
        oom=oom,
        reached=rec.reached if oom else None,
        device_name=backend.name(),
        device_total_bytes=device_total,
        torch_version=str(torch.__version__),
        alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_ALLOC_CONF")),
        notes=_notes(workload if par.single else _fsdp_compute(workload, par)) + rec.notes,
        memory_limit_bytes=memory_limit_bytes,
        alloc_retries=backend.alloc_retries() - retries_before,
    )


def _fsdp_compute(workload: Workload, par: Any) -> Workload:
    from vramfit.measure.fsdp import compute_workload

    return compute_workload(workload, par)


def _dtype(torch: Any, workload: Workload) -> Any:
    return getattr(torch, _WEIGHT_DTYPE[workload.precision])


def autocast_context(torch: Any, workload: Workload, device: str) -> Any:
    """``torch.autocast`` for the amp-* precisions, else a no-op context."""
    name = _AUTOCAST_DTYPE.get(workload.precision)
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, name))


def _train(
    torch: Any,
    state: dict[str, Any],
    workload: Workload,
    backend: Backend,
    rec: _Recorder,
    steps: int,
    make_optimizer: Callable[[Any], Any] | None,
) -> None:
    model = state["model"]
    model.train()
    device = backend.device
    vocab = model.vocab
    shape = (workload.batch, workload.seq)
    state["x"] = torch.randint(0, vocab, shape, device=device)
    state["y"] = torch.randint(0, vocab, shape, device=device)
    if make_optimizer is not None:
        state["optimizer"] = make_optimizer(model.parameters())
    optimizer = state.get("optimizer")
    scaler = None
    if workload.precision is Precision.amp_fp16:
        device_type = torch.device(device).type
        try:
            scaler = torch.amp.GradScaler(device_type)
        except (AttributeError, TypeError):  # torch < 2.3
            scaler = torch.cuda.amp.GradScaler()
        state["scaler"] = scaler
    for step in range(1, steps + 1):
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

        rec.begin(step, "forward", f"step {step} forward", steps)
        with autocast_context(torch, workload, device):
            state["loss"] = model(state["x"], state["y"])
        rec.end()

        rec.begin(step, "backward", f"step {step} backward", steps)
        loss = state["loss"]
        (scaler.scale(loss) if scaler is not None else loss).backward()
        del loss
        rec.end()

        if optimizer is not None:
            rec.begin(step, "optimizer", f"step {step} optimizer", steps)
            if scaler is not None:
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                if scaler.get_scale() < scale:
                    rec.notes.append(f"step {step}: GradScaler skipped the optimizer step")
            else:
                optimizer.step()
            rec.end()
        state.pop("loss")


def _infer(
    torch: Any,
    state: dict[str, Any],
    spec: Any,
    workload: Workload,
    backend: Backend,
    rec: _Recorder,
) -> None:
    model = state["model"]
    model.eval()
    device = backend.device
    b, s, gen = workload.batch, workload.seq, workload.gen_tokens
    with torch.inference_mode(), autocast_context(torch, workload, device):
        state["x"] = torch.randint(0, model.vocab, (b, s), device=device)
        cache = None
        if gen > 0:
            if workload.kv_dtype is not None:
                kv_dtype = getattr(torch, _KV_DTYPE[workload.kv_dtype.value])
            else:  # the compute dtype
                kv_dtype = getattr(
                    torch,
                    _AUTOCAST_DTYPE.get(workload.precision, _WEIGHT_DTYPE[workload.precision]),
                )
            shape = (b, spec.kv_heads, s + gen, spec.head_dim)
            rec.begin(1, "kv_cache", "allocating the KV cache", 1)
            state["cache"] = cache = [
                (
                    torch.zeros(shape, dtype=kv_dtype, device=device),
                    torch.zeros(shape, dtype=kv_dtype, device=device),
                )
                for _ in range(spec.layers)
            ]
            rec.end()

        rec.begin(1, "prefill", "prefill", 1)
        state["logits"] = model(state["x"], cache=cache, pos=0)
        rec.end()

        if gen > 0:
            # One record for the whole decode: the peak is reset once, so it is the max over
            # every generated token.
            rec.begin(1, "decode", "decode token 1", None)
            for t in range(gen):
                rec.reached = f"decode token {t + 1}"
                if rec.on_progress is not None:
                    rec.on_progress("decode", t + 1, gen)
                token = state.pop("logits")[:, -1].argmax(-1, keepdim=True)
                state["logits"] = model(token, cache=cache, pos=s + t)
                del token
            rec.end()


def _notes(workload: Workload) -> list[str]:
    notes = []
    if workload.mode is Mode.infer:
        notes.append("inference: one prefill (+ decode) pass; steps is ignored")
    else:
        if workload.optimizer is Optimizer.adamw:
            notes.append("adamw: torch.optim.AdamW(foreach=True, fused=False)")
        if workload.precision is Precision.amp_fp16:
            notes.append("amp-fp16: loss scaled by torch.amp.GradScaler")
    if workload.precision in _AUTOCAST_DTYPE:
        notes.append("autocast covers the forward and the loss; backward runs outside it")
    return notes
