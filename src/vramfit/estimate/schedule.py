"""Generic schedules over a profile's graph: a training step and an inference pass.

A training step is the model built on the device (its parameters in ``parameters()`` order),
the forward of the profile's graph (``vramfit.estimate.graph``), what the loop drops after it,
the backward, gradient clipping and the optimizer step. The first step creates the optimizer
state and the matmul workspaces; a steady step has them from its start, and
``zero_grad(set_to_none=True)`` has freed the gradients before it (the Trainer calls it after
each step). Inference is a forward without grad mode, then, with ``gen_tokens``, the last
decode step against the grown cache.
"""

from __future__ import annotations

from vramfit.config import (
    Checkpointing,
    Loop,
    ModelSpec,
    Offload,
    Optimizer,
    Parallel,
    Precision,
    QuantKind,
    Workload,
)
from vramfit.estimate import finetune
from vramfit.estimate.graph import (
    Component,
    DType,
    Graph,
    Hooks,
    Tensor,
    _Sim,
    end_forward,
    forward_and_backward,
    release_held,
    run_backward,
    run_forward,
)
from vramfit.estimate.inference import Workspaces
from vramfit.estimate.kernels import H200, Multiprocessors
from vramfit.estimate.params import count_params
from vramfit.estimate.profiles import hf
from vramfit.estimate.timeline import Allocation, Span, Tape, Timeline
from vramfit.estimate.training import optimizer_state_tensors, optimizer_step_temporaries

INT64 = 8


def _weights(t: Tape, model: hf.Model, spec: ModelSpec, first: bool) -> list[Tensor]:
    """Persist the parameters (and quantization state) in ``model.parameters()`` order;
    returns the trainable ones. A declared ``--params`` scales a full model's weights."""
    b = model.b
    scale = 1.0
    if model.lora is None and model.quant is None:
        counts = count_params(spec)
        scale = (spec.params or counts.total) / counts.total
    if model.quant is not None:
        # a quantized model comes from from_pretrained, whose caching_allocator_warmup
        # (transformers/modeling_utils.py) allocates and frees one tensor of the model's
        # loaded bytes first, so the weights land in that one cached segment (the point is
        # on every step's tape, so that steps' points line up)
        t.op("from_pretrained allocator warm-up")
        if first:
            t.temp("allocator warm-up", Component.weights, hf.warmup_bytes(model))
        _load_quantized(t, model, first)
        return [p for p in model.param_list if p.trainable]
    t.op("build")
    t.persist("weights", Component.weights, [round(p.nbytes * scale) for p in model.param_list])
    # from_config on the device makes an untied lm_head at init, freed when tied;
    # from_pretrained builds on the meta device and ties before it loads: no copy
    if first and b.tied and model.quant is None:
        t.temp(
            "lm_head copy before tying", Component.weights, b.vocab * b.hidden * model.weight.size
        )
    return [p for p in model.param_list if p.trainable]


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """``dot_natural_key`` (transformers/core_model_loading.py): the order in which
    from_pretrained loads a state dict, layer indices compared as numbers."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))


def _load_quantized(t: Tape, model: hf.Model, first: bool) -> None:
    """``from_pretrained`` of a bitsandbytes 4-bit or LLM.int8 model after its allocator
    warm-up, then (training) ``prepare_model_for_kbit_training`` and peft's adapters, request
    by request: where the quantized weights land decides the holes that the step's tensors
    fill (the h200-qlora-load and h200-int8-load traces).

    - transformers 5.17 loads synchronously when it quantizes on the fly, one parameter at a
      time in ``dot_natural_key`` order (``convert_and_load_state_dict_in_model``): a
      parameter is materialized on the device in the load dtype; a block linear's weight is
      then quantized (``Bnb4bitQuantize`` -> ``Params4bit._quantize`` -> ``quantize_4bit``)
      and its 16-bit copy freed once the conversion returns.
    - LLM.int8 (``Bnb8bitQuantize``: ``Int8Params(value.to("cpu")).to(device)`` ->
      ``Int8Params._quantize``): an fp16 copy on the device, ``int8_vectorwise_quant``'s
      fp32 row statistics (SCB) then the int8 rows (CB), the fp16 copy freed as
      ``_quantize`` returns, the loaded one as the conversion does.
    - ``quantize_4bit`` (bitsandbytes 0.50.2, functional.py and backends/cuda/ops.py): the fp32
      absmax, then the packed codes; ``get_4bit_type`` makes the 16-entry code and frees its
      ``abs()`` and ``max()``; with double quant, the absmax's ``mean()`` (the offset),
      ``_absmax - offset``, ``quantize_blockwise`` of it (the process-wide 256-entry dynamic
      map on first use, the nested fp32 absmax, the uint8 absmax, a copy of the map), then
      the fp32 absmax and the difference are freed. Not modelled: the mean's reduction
      staging (two requests of at most 448 B, freed at once).
    - ``prepare_model_for_kbit_training`` (peft/utils/other.py) casts every 16-bit
      parameter that is not a ``Params4bit`` to fp32 in ``parameters()`` order, the 16-bit
      copy freed at each, then empties the cache.
    - ``get_peft_model`` moves each adapter's A and B to the device in the base layer's
      ``compute_dtype`` (tuners_utils.py ``_move_adapter_to_device_of_base_layer``), module
      by module, then ``_cast_adapter_dtype`` casts each 16-bit one to fp32.

    Every step's tape has the same points; only the first step allocates what the load
    frees again (the persistent tensors are made once, ``replay``)."""
    assert model.quant is not None
    load, quant = model.weight, model.quant
    size = {p.name: p.nbytes for p in model.param_list}

    def keep(name: str, nbytes: int | None = None) -> None:  # a tensor the model keeps
        t.persist(name, Component.weights, [size[name] if nbytes is None else nbytes])

    def made(name: str, nbytes: int) -> int | None:  # one the load frees again
        return t.new(name, Component.weights, nbytes) if first else None

    quantized = {f"{path}.weight" for path in model.quantized}
    staged: dict[str, int | None] = {}  # a parameter peft casts to fp32: its loaded copy
    mapped = False  # bitsandbytes made its dynamic map (name2qmap, once per process)
    for name, numel in sorted(hf.param_shapes(model.b), key=lambda x: _natural_key(x[0])):
        if name not in quantized:
            t.op(f"load {name}")
            if model.params[name].dtype is load:
                keep(name)
            else:  # cast to fp32 by prepare_model_for_kbit_training, below
                staged[name] = made(f"{name} ({load.value})", numel * load.size)
            continue
        t.op(f"load and quantize {name}")
        copy = made(f"{name} ({load.value})", numel * load.size)
        if quant.kind is QuantKind.int8:
            fp16 = made(f"{name} (fp16, to quantize)", numel * DType.fp16.size)
            keep(f"{name} SCB")
            keep(f"{name} weight")
            t.free(fp16, copy)
            continue
        fp32_absmax = 4 * -(-numel // quant.blocksize)
        if quant.double_quant:
            unquantized_absmax = made(f"{name} fp32 absmax", fp32_absmax)
        else:
            keep(f"{name} absmax")
        keep(f"{name} weight")
        keep(f"{name} code")
        if first:
            t.temp("get_4bit_type abs", Component.weights, size[f"{name} code"])
            t.temp("get_4bit_type max", Component.weights, 4)
        if quant.double_quant:
            t.op(f"double-quantize the absmax of {name}")
            keep(f"{name} offset")
            difference = made(f"{name} absmax - offset", fp32_absmax)
            if not mapped:
                keep("bitsandbytes dynamic map", 4 * 256)
                mapped = True
            keep(f"{name} nested_absmax")
            keep(f"{name} absmax")
            keep(f"{name} nested_code")
            t.free(difference, unquantized_absmax)
        t.free(copy)
    for p in model.param_list:
        if p.name in staged:
            t.op(f"prepare_model_for_kbit_training: {p.name} to fp32")
            keep(p.name)
            t.free(staged[p.name])
    if staged:
        t.op("prepare_model_for_kbit_training: empty_cache")
        if first:
            t.empty_cache()
    adapters = [p for p in model.param_list if ".lora_" in p.name]
    # Linear8bitLt has no compute dtype and an int8 weight: its adapters move as made (fp32)
    compute = DType.fp32 if quant.kind is QuantKind.int8 else DType(quant.compute_dtype.value)
    moved: dict[str, int | None] = {}
    for p in adapters:
        t.op(f"get_peft_model: {p.name} to the device")
        if p.dtype == compute:
            keep(p.name)
        else:
            moved[p.name] = made(f"{p.name} ({compute.value})", p.numel * compute.size)
    for p in adapters:
        if p.name in moved:
            t.op(f"get_peft_model: {p.name} to fp32")
            keep(p.name)
            t.free(moved[p.name])


def _shapes(model: hf.Model, params: list[Tensor]) -> list[tuple[int, ...]]:
    """The trainable parameters' shapes: the modeling code's (``hf.param_dims``), or a LoRA
    factor's: lora_A ``(r, in)``, lora_B ``(out, r)``."""
    dims = dict(hf.param_dims(model.b))
    r = model.lora.r if model.lora is not None else 1
    out = []
    for p in params:
        if p.name.endswith(".lora_A"):
            out.append((r, p.numel // r))
        elif p.name.endswith(".lora_B"):
            out.append((p.numel // r, r))
        else:
            out.append(dims.get(p.name, (p.numel,)))
    return out


# nn.Embedding weights of the hf models (a tied lm_head is the same parameter)
EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.wpe.weight")


def _bnb_or_hf_state(
    optimizer: Optimizer, model: hf.Model, params: list[Tensor]
) -> finetune.OptimizerState:
    """``finetune.optimizer_state`` of the trainable ``params`` (bitsandbytes' AdamW, plain or
    paged; transformers' Adafactor, whose factored moments need each parameter's shape).
    With a bitsandbytes 8-bit optimizer the Trainer registers ``{"optim_bits": 32}`` for every
    ``nn.Embedding`` weight (trainer.py create_optimizer, ``GlobalOptimManager``
    ``register_module_override``): those keep fp32 states."""
    fp32: frozenset[int] = frozenset()
    if model.w.trainer and optimizer in (Optimizer.adam_8bit, Optimizer.paged_adamw_8bit):
        fp32 = frozenset(i for i, p in enumerate(params) if p.name in EMBEDDINGS)
    return finetune.optimizer_state(
        _shapes(model, params),
        finetune.STATE_OPTIMIZER[optimizer],
        param_bytes=params[0].dtype.size if params else 4,
        fp32_states=fp32,
    )


def _optimizer_state(optimizer: Optimizer, model: hf.Model, params: list[Tensor]) -> list[int]:
    """Persistent state tensors in PyTorch's allocator, each parameter's in its own dtype:
    torch.optim.AdamW's two moments (and, fused, a device ``step`` tensor per parameter:
    torch/optim/adamw.py ``_init_group``); bitsandbytes' AdamW as 0.50.2 stores it (block-wise
    uint8 states, fp32 under 4096 elements; paged: what ``get_state_buffer`` leaves unpaged)
    and transformers' Adafactor (fp32 row and column moments): ``finetune.optimizer_state``."""
    if optimizer in finetune.STATE_OPTIMIZER:
        state = _bnb_or_hf_state(optimizer, model, params)
        return [nbytes for _, _, nbytes, paged in state.tensors if not paged]
    base = (
        Optimizer.adamw
        if optimizer in (Optimizer.adamw_foreach, Optimizer.adamw_forloop)
        else (optimizer)
    )
    out: list[int] = []
    for p in params:
        out += optimizer_state_tensors(base, [(p.numel,)], p.dtype.size)
    if optimizer is Optimizer.adamw_fused:
        out += [4] * len(params)
    return out


def managed_state_bytes(spec: ModelSpec, w: Workload) -> int:
    """Optimizer state a paged bitsandbytes optimizer puts in CUDA managed memory
    (``cudaMallocManaged`` through ``cget_managed_ptr``: functional.py ``get_paged``), which
    PyTorch's allocator never sees: ``state1``/``state2`` of every parameter of at least 1e5
    elements (optimizer.py ``get_state_buffer``). 0 for any other optimizer."""
    if w.optimizer not in (Optimizer.paged_adamw_8bit, Optimizer.paged_adamw_32bit):
        return 0
    b = hf.resolve(spec)
    model = hf.Model(
        b, w, Graph(grad=True), batch=1, seq=1, use_cache=False, all_logits=True, spec=spec
    )
    params = [p for p in model.param_list if p.trainable]
    return _bnb_or_hf_state(w.optimizer, model, params).paged


def _step(t: Tape, w: Workload, model: hf.Model, params: list[Tensor], first: bool) -> None:
    """Gradient clipping and the optimizer step."""
    optimizer = w.optimizer
    t.phase = "optimizer"
    if w.clips:
        # clip_grad_norm_: _foreach_norm makes one 0-dim norm per gradient, stacked, then one
        # total (torch/nn/utils/clip_grad.py); the gradients are scaled in place
        t.op("clip_grad_norm_")
        norms = [t.new("gradient norm", Component.optimizer_temp, 4) for _ in params]
        t.op("clip_grad_norm_ total")
        stacked = t.new("stacked norms", Component.optimizer_temp, 4 * len(params))
        t.temp("total norm", Component.optimizer_temp, 4)
        t.free(*norms, stacked)
    t.op("optimizer step")
    if first:
        t.persist(
            "optimizer state", Component.optimizer_state, _optimizer_state(optimizer, model, params)
        )
    if optimizer is Optimizer.adamw_forloop:
        # _single_tensor_adamw: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps),
        # one parameter at a time: sqrt's result and the quotient live together
        for j, p in enumerate(params):
            if j:
                t.op("optimizer step")
            a = t.new("sqrt(exp_avg_sq)", Component.optimizer_temp, p.nbytes)
            d = t.new("denominator", Component.optimizer_temp, p.nbytes)
            t.free(a, d)
        return
    if optimizer is Optimizer.adafactor_hf:
        _adafactor_hf_step(t, model, params)
        return
    base = Optimizer.adamw if optimizer is Optimizer.adamw_foreach else optimizer
    temporaries = [
        nbytes
        for p in params
        for nbytes in optimizer_step_temporaries(base, [p.numel], p.dtype.size)
    ]
    if base is Optimizer.adafactor:
        for j, nbytes in enumerate(temporaries):
            if j:
                t.op("optimizer step")
            t.temp("optimizer step temporary", Component.optimizer_temp, nbytes)
    else:
        for nbytes in temporaries:
            t.temp("optimizer step temporary", Component.optimizer_temp, nbytes)


def _adafactor_hf_step(t: Tape, model: hf.Model, params: list[Tensor]) -> None:
    """transformers.optimization.Adafactor.step, one parameter at a time: a 16-bit parameter
    gets fp32 copies of its gradient and itself (``grad.float()``, ``p.float()``);
    ``update = grad**2 + eps`` (pow's result dies once the sum exists); then
    ``_approx_sq_grad``'s row-by-column product (factored, two or more dims) or
    ``exp_avg_sq.rsqrt()`` (vectors) is made while ``update`` still holds the sum; the rest is
    in place (``update.mul_(grad)``, ``p.add_(-update)``, ``p.copy_``)."""
    temp = Component.optimizer_temp
    for j, (p, shape) in enumerate(zip(params, _shapes(model, params), strict=True)):
        if j:
            t.op("optimizer step")
        full = 4 * p.numel
        copies = []
        if p.dtype.size == 2:
            copies = [t.new("fp32 gradient", temp, full), t.new("fp32 parameter", temp, full)]
        squared = t.new("grad**2", temp, full)
        t.op("optimizer step: grad**2 + eps")
        update = t.new("grad**2 + eps", temp, full)
        t.free(squared)
        factored = len(shape) >= 2
        t.op("optimizer step: second-moment estimate")
        estimate = t.new("row x column estimate" if factored else "exp_avg_sq.rsqrt()", temp, full)
        t.free(update, estimate, *copies)


def _warm_workspaces(t: Tape, w: Workload, b: hf.Block, workspace_bytes: int) -> None:
    """A steady step starts with the cuBLAS workspaces the first step made: the forward's
    and the backward thread's (a bias epilogue, cuBLASLt, makes its own)."""
    made = Workspaces(t, workspace_bytes)
    made.matmul("forward", _uses_bias(b))
    made.matmul("backward", _uses_bias(b) and w.checkpointing is Checkpointing.full)


def _uses_bias(b: hf.Block) -> bool:
    return b.qkv_bias or b.bias


# Steady steps simulate nothing: their forward and backward are the first step's. A simulation
# (``run_forward``, ``run_backward``, a parallel engine's hooks) makes tape calls that depend
# only on the graph, the hooks and the calls that drive it, never on what the tape holds, and a
# steady step's tape has the first's points up to its forward (its own persistent tensors are
# records, not points). So the steady step plays the first's span back (``Tape.play``: the same
# records, whose ends are the same points in both), less the workspaces the first step made at
# its first matmul (a steady step starts with them): a second simulation records just that.


def _hold_outputs(graph: Graph, model: hf.Model, logits: Tensor, loop: Loop) -> None:
    """What a training loop keeps of the model's outputs. With use_cache the output's
    DynamicCache holds every layer's keys and values until the loop drops the output: after
    the step when it keeps it (with the logits), else after the forward (`del out`; the hf
    calibration Phi-3 trace)."""
    keeps = loop is Loop.keeps_logits
    for kv in model.cache:
        graph.hold(kv, "step" if keeps else "forward")
    if keeps:
        graph.hold(logits, "step")


def hf_training_steps(
    spec: ModelSpec, w: Workload, workspace_bytes: int, mp: Multiprocessors = H200
) -> tuple[Timeline, Timeline, dict[str, int]]:
    """The first and a steady training step of the hf profile, and what block 0 keeps from
    its forward to its backward, by part."""
    b = hf.resolve(spec)
    steps = []
    block_bytes: dict[str, int] = {}
    # one graph serves both steps: a replay reads it and keeps its own state
    graph, model, logits, loss = hf.build(spec, w, grad=True, batch=w.batch, seq=w.seq)
    assert loss is not None
    _hold_outputs(graph, model, logits, w.loop)
    if w.loop is Loop.trainer and w.precision in (Precision.amp_bf16, Precision.amp_fp16):
        # accelerate's convert_outputs_to_fp32: an fp32 copy of the returned logits, which
        # dies with the outputs when compute_loss returns; it converts them once the
        # forward's autocast context has exited (accelerate/utils/operations.py
        # ConvertOutputsToFp32: ``convert_to_fp32(self.model_forward(...))``)
        graph.autocast_exit()
        up = model.ops.cast(logits, DType.fp32, "accelerate fp32 logits")
        up.component = Component.logits
        graph.hold(up, "forward")
    span: Span | None = None  # the first step's forward and backward (see above)
    forward_end = 0
    for first in (True, False):
        t = Tape()
        params = _weights(t, model, spec, first)
        if first and w.loop is Loop.trainer:
            # Trainer._inner_training_loop starts with accelerator.free_memory(), whose
            # release_memory -> clear_device_cache calls torch.cuda.empty_cache(): a tied
            # model's freed lm_head copy is returned before the first forward
            t.empty_cache()
        t.op("start")
        t.persist("input ids and labels", Component.activations, [w.batch * w.seq * INT64] * 2)
        if not first:
            t.persist(
                "optimizer state",
                Component.optimizer_state,
                _optimizer_state(w.optimizer, model, params),
            )
            _warm_workspaces(t, w, b, workspace_bytes)
        span, sim, end = forward_and_backward(
            graph, loss, t, span, first=first, workspace_bytes=workspace_bytes, mp=mp
        )
        forward_end = forward_end if end is None else end
        _step(t, w, model, params, first)
        if sim is not None:
            release_held(sim, "step")
        steps.append(t.finish())
        if not first:
            block_bytes = t.block_bytes(forward_end)
    return steps[0], steps[1], block_bytes


def hf_inference(spec: ModelSpec, w: Workload, workspace_bytes: int) -> Timeline:
    """An evaluation forward (every position's logits) or greedy ``generate()``: a prefill
    that keeps the last position's logits, then every decode step (``_sample`` in
    transformers/generation/utils.py), each growing every layer's cache by one token."""
    b = hf.resolve(spec)
    t = Tape(phase="prefill")
    gen = w.gen_tokens or 0
    all_logits = (w.logits.value == "all") if w.logits is not None else not gen
    graph, model, logits, _ = hf.build(
        spec,
        w,
        grad=False,
        batch=w.batch,
        seq=w.seq,
        all_logits=all_logits,
        use_cache=True,
        generate=bool(gen),
    )
    _weights(t, model, spec, True)
    t.op("start")
    t.persist("input ids", Component.activations, [w.batch * w.seq * INT64])
    ids = _GenerateInputs(t, w.batch, w.seq) if gen else None
    graph.hold(logits, "step")
    for kv in model.cache:
        graph.hold(kv, "generate" if gen else "step")
    ws = Workspaces(t, workspace_bytes)
    sim = run_forward(graph, t, workspaces=ws)
    # autocast's cached casts of the weights (an fp32 model under amp) live until its context
    # exits: after generate() returns, so every decode step finds them cached
    weight_casts = _keep_cast_cache(sim) if gen else {}
    end_forward(sim)
    if not gen:
        t.op("end")
        release_held(sim, "step")
        return t.finish()
    # _sample: _update_model_kwargs_for_generation, then next_token_logits =
    # outputs.logits[:, -1, :].to(copy=True, dtype=float32) (with no logits processors
    # next_token_scores is that same tensor, and it lives until the next step's replaces it),
    # the generated ids' cat, and `del outputs`
    assert ids is not None
    ids.update_model_kwargs()
    t.op("next token logits")
    fp32_logits = w.batch * b.vocab * 4
    scores = t.new("fp32 next-token logits", Component.logits, fp32_logits)
    ids.generated()
    release_held(sim, "step")
    caches = [sim.st(kv).key for kv in model.cache]
    t.phase = "decode"
    dt = hf.cache_dtype(b, w)
    token = w.batch * b.kv_width * dt.size  # one token of one layer's K (or V)
    step_logits = w.batch * b.vocab * logits.dtype.size
    # DynamicSlidingWindowLayer keeps a view of the last window - 1 tokens of its full cat
    windows = hf.cache_windows(spec)
    seen = [w.seq if win is None else min(w.seq, win - 1) for win in windows]
    # decode steps before the last: the cache's cats (new K and V, the old ones freed), the
    # step's logits and generate()'s own cats (``_GenerateInputs``), the rest of a one-token
    # step being small-pool tensors
    # Tape.op, Tape.new and Tape.free inlined for the cache's cats: every layer's keys and
    # values of every decode step are a record (4,096 tokens of Llama-3 8B: 262,000)
    points, records = t.timeline.points, t.records
    updates = [("decode", f"block {i} cache update") for i in range(len(windows))]
    cached = [f"block {j // 2} cached {'values' if j % 2 else 'keys'}" for j in range(len(caches))]
    kv = Component.kv_cache
    for _ in range(gen - 2):
        for i, win in enumerate(windows):
            # DynamicLayer.update: `self.keys = torch.cat([self.keys, key_states], dim=-2)`,
            # then the values: the old keys die with that assignment, before the values'
            # cat. DynamicSlidingWindowLayer.update cats both into full_key_states and
            # full_value_states first and assigns after: the old keys and values live
            # through both cats (transformers/cache_utils.py)
            size = token * (seen[i] + 1)
            for j in (2 * i, 2 * i + 1):
                if win is None or j == 2 * i:
                    points.append(updates[i])
                now = len(points) - 1
                old = caches[j]
                records.append(Allocation(cached[j], kv, (size,), now))
                caches[j] = len(records) - 1
                if old is not None and records[old].end is None:
                    records[old].end = now
            seen[i] = seen[i] + 1 if win is None else min(seen[i] + 1, win - 1)
        t.op("logits")
        logits_key = t.new("logits", Component.logits, step_logits)
        ids.update_model_kwargs()
        t.op("next token logits")
        new_scores = t.new("fp32 next-token logits", Component.logits, fp32_logits)
        t.free(scores)
        scores = new_scores
        ids.generated()
        t.free(logits_key)  # del outputs
    if gen >= 2:
        # the last decode step, op by op, against the cache the earlier steps left
        step, m2, logits2, _ = hf.build(
            spec,
            w,
            grad=False,
            batch=w.batch,
            seq=1,
            cached=w.seq + gen - 2,
            all_logits=False,
            use_cache=True,
            generate=True,
            layer_cached=seen,
        )
        past = [x for pair in m2.past for x in pair]
        step.hold(logits2, "step")
        for kv in m2.cache:
            step.hold(kv, "step")
        adopt = {id(x): key for x, key in zip(past, caches, strict=True)}
        for n in step.nodes:
            if n.cast_cache:  # a cache hit: the prefill's cast
                adopt[id(n.outputs[0])] = weight_casts[n.inputs[0].name]
        sim2 = run_forward(step, t, workspaces=ws, adopt=adopt)
        sim2.cast_cache = []  # the prefill's, freed as generate() returns
        end_forward(sim2)
        ids.update_model_kwargs()
        t.op("next token logits")
        last_scores = t.new("fp32 next-token logits", Component.logits, fp32_logits)
        t.free(scores)
        ids.generated()
        t.free(last_scores)
        release_held(sim2, "step")
    else:
        t.free(*caches, scores)
    t.op("end")
    t.free(*weight_casts.values())
    return t.finish()


class _GenerateInputs:
    """What generate() keeps beside the model, each (batch, tokens so far) of int64
    (transformers/generation/utils.py): the caller's attention mask (a tokenizer's; here
    ``torch.ones_like(ids)``) and input ids, held to generate()'s return; the position ids
    it builds from the mask; and, from the first step on, its own grown mask, position ids
    and generated ids, each replaced by a cat one token longer after every forward. At a
    batch of 64 past 2,048 tokens they are large-pool blocks, 512 bytes longer each step."""

    def __init__(self, t: Tape, batch: int, seq: int) -> None:
        self.t, self.row, self.tokens = t, batch * INT64, seq
        t.persist("attention mask", Component.activations, [self.row * seq])
        # _prepare_position_ids_for_generation: attention_mask.long().cumsum(-1) - 1, then
        # position_ids.masked_fill(attention_mask == 0, 0)
        t.op("position ids")
        cumsum = t.new("position ids cumsum", Component.activations, self.row * seq)
        minus = t.new("position ids", Component.activations, self.row * seq)
        t.free(cumsum)
        t.op("position ids")
        unmasked = t.new("attention mask == 0", Component.activations, batch * seq)
        self.positions = t.new("position ids", Component.activations, self.row * seq)
        t.free(unmasked, minus)
        self.mask: int | None = None  # generate()'s own, once it has grown one
        self.ids: int | None = None

    def _grown(self, name: str) -> int | None:
        return self.t.new(name, Component.activations, self.row * (self.tokens + 1))

    def update_model_kwargs(self) -> None:
        """_update_model_kwargs_for_generation: the position ids' cat, then the mask's."""
        t = self.t
        t.op("update model kwargs")
        positions, self.positions = self.positions, self._grown("position ids")
        t.free(positions)
        t.op("update model kwargs")
        mask, self.mask = self.mask, self._grown("attention mask")
        t.free(mask)  # None at the first: the caller's stays

    def generated(self) -> None:
        """``input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)``."""
        self.t.op("generated ids")
        ids, self.ids = self.ids, self._grown("generated ids")
        self.t.free(ids)
        self.tokens += 1


def _keep_cast_cache(sim: _Sim) -> dict[str, int | None]:
    """Take autocast's cached weight casts from ``sim``, so that ``end_forward`` leaves them:
    the tape key of each, by the name of the weight cast."""
    sim.cast_cache = []
    return {n.inputs[0].name: sim.st(n.outputs[0]).key for n in sim.g.nodes if n.cast_cache}


def fsdp_training_steps(
    spec: ModelSpec,
    w: Workload,
    par: Parallel,
    workspace_bytes: int,
    mp: Multiprocessors = H200,
) -> tuple[Timeline, Timeline, dict[str, int], int]:
    """The first and a steady training step of rank 0 under FSDP2 (``vramfit.estimate.fsdp``):
    the hf profile's graph in ``param_dtype``, whose parameters the FSDP hooks all-gather and
    free around each layer, and an optimizer over the fp32 shards. The last item is what
    ``--offload params`` (``CPUOffloadPolicy``) keeps on the CPU: the shards, their gradients
    (both in the orig dtype) and the optimizer state, which then steps there."""
    from vramfit.estimate import fsdp, parallel

    spec = parallel.tp_block(spec, par)  # with tp > 1, the 2-D layout: FSDP over TP shards
    b = hf.resolve(spec)
    cw = fsdp.compute_workload(w)
    graph, model, logits, loss = hf.build(
        spec, cw, grad=True, batch=w.batch, seq=w.seq, sp=par.tp if par.sp else 1, tp=par.tp
    )
    assert loss is not None
    _hold_outputs(graph, model, logits, w.loop)
    offload = par.offload is Offload.params
    steps = []
    block_bytes: dict[str, int] = {}
    cpu = 0
    span: Span | None = None  # the first step's forward and backward (see hf_training_steps)
    forward_end = 0
    for first in (True, False):
        hooks = fsdp.attach(model, par, w.precision)
        shards = fsdp.sharded_params(hooks)
        if offload:  # pinned CPU shards, their CPU gradients and the CPU optimizer's state
            shard_bytes = sum(p.nbytes for p in shards)
            cpu = 2 * shard_bytes + sum(_optimizer_state(w.optimizer, model, shards))
        t = Tape()
        t.op("build")
        # to_empty + FSDPParam.reset_sharded_param: each padded shard, in the orig dtype
        t.persist("sharded weights", Component.sharded_weights,
                  [] if offload else [p.nbytes for p in shards])
        t.op("start")
        t.persist("input ids and labels", Component.activations, [w.batch * w.seq * INT64] * 2)
        if not first:
            if not offload:
                t.persist(
                    "optimizer state",
                    Component.optimizer_state,
                    _optimizer_state(w.optimizer, model, shards),
                )
            _warm_workspaces(t, w, b, workspace_bytes)
        span, sim, end = forward_and_backward(
            graph, loss, t, span, first=first, workspace_bytes=workspace_bytes, mp=mp,
            hooks=hooks,
        )
        forward_end = forward_end if end is None else end
        if offload:  # clipping and the step run on the CPU tensors
            t.phase = "optimizer"
            t.op("optimizer step (on the CPU)")
        else:
            _step(t, w, model, shards, first)
        if sim is not None:
            release_held(sim, "step")
        steps.append(t.finish())
        if not first:
            block_bytes = t.block_bytes(forward_end)
    return steps[0], steps[1], block_bytes, cpu


_HEAD_PARAMS = ("lm_head.", "model.norm.", "transformer.ln_f.")


class _GradientReducer(Hooks):
    """Gradients that leave ``.grad`` once a layer's backward is done: DDP with
    ``gradient_as_bucket_view`` (AccumulateGrad's fresh gradient is copied into its bucket
    view and dies), ZeRO-2 (each layer's gradients are reduced through the IPG bucket into
    this rank's 16-bit partition, ``partition_grads`` in stage_1_and_2.py)."""

    def __init__(self, model: hf.Model, partition_ranks: int) -> None:
        from vramfit.estimate.fsdp import ROOT, unit_of

        self.units: dict[int, list[Tensor]] = {}
        for leaf in model.param_list:
            self.units.setdefault(unit_of(leaf.name), []).append(leaf)
        self.root = ROOT
        self.ranks = partition_ranks  # 0: no partition kept (a bucket view)

    def _reduce(self, sim: _Sim, unit: int) -> None:
        t = sim.tape
        leaves = self.units.get(unit, [])
        grads = [sim.leaf_grads.pop(id(p), None) for p in leaves]
        if not any(grads):
            return
        t.op(f"reduce gradients of {'root' if unit == self.root else f'block {unit}'}")
        if self.ranks:
            numel = sum(p.numel for p in leaves)
            t.new("gradient partition", Component.sharded_gradients,
                  -(-numel // self.ranks) * leaves[0].dtype.size)
        for g in grads:
            if g is not None:
                sim.unref_grad(g)

    def unit_backward_done(self, sim: _Sim, unit: int) -> None:
        self._reduce(sim, unit)

    def backward_end(self, sim: _Sim) -> None:
        self._reduce(sim, self.root)


def replicated_training_steps(
    spec: ModelSpec,
    w: Workload,
    par: Parallel,
    workspace_bytes: int,
    mp: Multiprocessors = H200,
    in_flight: int | None = None,
) -> tuple[Timeline, Timeline, dict[str, int], int]:
    """Rank 0's steps under DDP, ZeRO 1-3 (DeepSpeed), tensor and pipeline parallelism
    (``vramfit.estimate.parallel``); the last item is the bytes offloaded to the CPU. Modelled
    from the engines' documented allocations, not measured. ``in_flight`` overrides the
    micro-batches the first stage holds (``vramfit plan`` replays 1 and 2 and extrapolates)."""
    from vramfit.estimate import fsdp, parallel

    rank_spec = parallel.tp_block(spec, par)
    b = hf.resolve(rank_spec)
    zero = par.zero
    # DeepSpeed runs the module in 16 bits (its bf16 / fp16 modes); DDP runs the user's recipe
    cw = fsdp.compute_workload(w) if zero else w
    held = 1
    batch = w.batch
    if par.pp > 1:
        micro = par.micro_batches or par.pp
        batch = w.batch // micro
        held = min(par.pp, micro)  # 1F1B: the first stage's warm-up forwards
    in_flight = held if in_flight is None else in_flight
    head = par.pp == 1
    graph, model, logits, loss = hf.build(
        rank_spec, cw, grad=True, batch=batch, seq=w.seq, head=head,
        sp=par.tp if par.sp else 1, tp=par.tp,
    )
    assert loss is not None
    if head:  # the loop holds the model's outputs (the 8B TP 4 + SP trace: the cache's K/V)
        _hold_outputs(graph, model, logits, w.loop)
    else:
        model.param_list = [
            p for p in model.param_list if not p.name.startswith(_HEAD_PARAMS)
        ]
    ranks = par.dp
    cpu = 0
    steps = []
    block_bytes: dict[str, int] = {}
    span: Span | None = None  # the first step's forward and backward (see hf_training_steps)
    forward_end = 0
    for first in (True, False):
        t = Tape()
        hooks: Hooks | None = None
        if zero == 3:
            zpar = Parallel.model_validate({"gpus": ranks, "fsdp": "full"})
            z3 = fsdp.attach(model, zpar, cw.precision)
            hooks = z3
            params = fsdp.sharded_params(z3)
            t.op("build")
            t.persist("weight partitions", Component.sharded_weights, [p.nbytes for p in params])
        else:
            params = _weights(t, model, rank_spec, first)
        if zero == 2:
            hooks = _GradientReducer(model, ranks)
        elif par.ddp and par.gradient_as_bucket_view:
            hooks = _GradientReducer(model, 0)
        if par.ddp:  # the Reducer's buckets: one more copy of the gradients
            buckets = parallel.ddp_buckets(
                [p.nbytes for p in params if p.trainable], par.bucket_mib * 2**20
            )
            t.persist("DDP gradient buckets", Component.collective_buffers, buckets)
        t.op("start")
        t.persist("input ids and labels", Component.activations, [batch * w.seq * INT64] * 2)
        numel = sum(p.numel for p in model.param_list)
        partition = -(-numel // ranks) if zero else 0
        if zero:  # fp32 master weights, momentum and variance of this rank's partition
            states = [partition * 4] * 3
            if par.offload is not Offload.none:
                cpu = sum(states) + partition * 4  # and the fp32 gradient partition
                states = []
            if zero in (1, 2):
                # stage_1_and_2.py reduces through the IPG bucket (contiguous_gradients, on by
                # default): reduce_bucket_size elements (5e8) in the 16-bit dtype, kept
                t.persist("IPG bucket", Component.collective_buffers,
                          [500_000_000 * params[0].dtype.size])
        if not first:
            if zero:
                t.persist("optimizer state", Component.optimizer_state, states)
            else:
                t.persist("optimizer state", Component.optimizer_state,
                          _optimizer_state(w.optimizer, model, params))
            _warm_workspaces(t, w, b, workspace_bytes)
        sims: list[_Sim] = []  # a step that plays the first's back simulates nothing
        if span is None:
            start = t.mark()
            ws = Workspaces(t, workspace_bytes, active=first)
            for k in range(in_flight):
                if k:
                    t.op(f"micro-batch {k + 1} forward")
                if zero == 3 and k:
                    hooks = fsdp.attach(model, zpar, cw.precision)
                sim = run_forward(graph, t, mp=mp, workspaces=ws, hooks=hooks)
                forward_end = len(t.timeline.points) - 1
                end_forward(sim)
                sims.append(sim)
            t.phase = "backward"
            kept: dict[int, object] = {}
            for k, sim in enumerate(sims):
                run_backward(sim, loss)
                if k == 0:
                    kept = dict(sim.leaf_grads)
                else:  # AccumulateGrad adds into the existing .grad: the new one dies
                    t.op("gradient accumulation")
                    for key, g in list(sim.leaf_grads.items()):
                        if key in kept:
                            sim.unref_grad(g)
            span = t.span(start, leave_out=ws.keys)
        else:
            t.play(span)
        if zero:
            t.phase = "optimizer"
            t.op("optimizer step")
            if first:
                t.persist("optimizer state", Component.optimizer_state, states)
            # the fp32 copy of this rank's gradient partition the step reads
            t.temp("fp32 gradient partition", Component.optimizer_temp,
                   0 if par.offload is not Offload.none else partition * 4)
        else:
            _step(t, w, model, params, first)
        for sim in sims:
            release_held(sim, "step")
        steps.append(t.finish())
        if not first:
            block_bytes = t.block_bytes(forward_end)
    return steps[0], steps[1], block_bytes, cpu
