"""Measure the real Hugging Face transformers model of a RunSpec: the code users run.

``hf_config`` turns a ``ModelSpec`` into the ``transformers`` config of its ``model_type``;
``build_hf_model`` builds ``AutoModelForCausalLM.from_config`` on the device in the target
dtype, as ``from_pretrained`` would place it. The loops are the ones the hf profile models
(``Workload.loop``): the Trainer itself (``transformers.Trainer`` with ``TrainingArguments``
mapped from the workload), a plain loop that takes ``.loss`` and drops the outputs, and one
that keeps ``outputs`` through backward and the optimizer step. Inference is an evaluation
forward under ``torch.no_grad`` (every position's logits) or ``model.generate``.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from vramfit.config import (
    Checkpointing,
    Loop,
    Mode,
    ModelSpec,
    ModelType,
    Precision,
    Workload,
    trainer_optim_name,
)
from vramfit.errors import VramfitError
from vramfit.measure.train import autocast_context


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise VramfitError(
            "transformers is not installed; pip install 'vramfit[hf]'", field="--impl"
        ) from None
    return transformers


def hf_config(spec: ModelSpec, workload: Workload) -> Any:
    """The transformers config of ``spec``'s model_type with its shapes and dropouts."""
    transformers = import_transformers()
    spec = spec.resolved()
    mt = ModelType(spec.model_type)
    positions = max(2048, workload.seq + workload.gen_tokens)
    if mt is ModelType.gpt2:
        return transformers.GPT2Config(
            n_layer=spec.layers,
            n_embd=spec.hidden,
            n_head=spec.heads,
            n_inner=spec.ffn,
            vocab_size=spec.vocab,
            n_positions=spec.max_positions,
            resid_pdrop=spec.resid_dropout,
            embd_pdrop=spec.embd_dropout,
            attn_pdrop=spec.attention_dropout,
            tie_word_embeddings=bool(spec.tied),
            bos_token_id=0,
            eos_token_id=0,
        )
    common: dict[str, Any] = {
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": spec.vocab,
        "max_position_embeddings": positions,
        "tie_word_embeddings": bool(spec.tied),
        "attention_dropout": spec.attention_dropout,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    if mt is ModelType.llama:
        return transformers.LlamaConfig(
            head_dim=spec.head_dim, attention_bias=bool(spec.qkv_bias), **common
        )
    if mt is ModelType.mistral:
        return transformers.MistralConfig(
            head_dim=spec.head_dim, sliding_window=spec.sliding_window, **common
        )
    if mt is ModelType.qwen2:
        return transformers.Qwen2Config(**common)
    if mt is ModelType.gemma:
        return transformers.GemmaConfig(head_dim=spec.head_dim, **common)
    if mt is ModelType.gemma2:
        return transformers.Gemma2Config(
            head_dim=spec.head_dim,
            sliding_window=spec.sliding_window or 4096,
            query_pre_attn_scalar=spec.head_dim,
            **common,
        )
    if mt is ModelType.phi3:
        return transformers.Phi3Config(
            sliding_window=spec.sliding_window, resid_pdrop=spec.resid_dropout,
            embd_pdrop=spec.embd_dropout, **common
        )
    raise VramfitError(f"measure --impl hf does not build {mt.value}", field="--impl")


def build_hf_model(spec: ModelSpec, workload: Workload, device: str, dtype: Any) -> Any:
    """``AutoModelForCausalLM.from_config`` on ``device``, in ``dtype``, with the workload's
    attention implementation and gradient checkpointing."""
    transformers = import_transformers()
    import torch

    cfg = hf_config(spec, workload)
    attn = "eager" if workload.attention.value == "eager" else "sdpa"
    training = workload.mode is Mode.train
    ckpt = training and workload.checkpointing is Checkpointing.full
    if workload.quant is not None:
        # from_config imports processing_utils lazily, and with it torchaudio's kaldi module,
        # whose module-level EPSILON would be made inside the device context below: a
        # 4-byte tensor holding a 2 MiB small segment for the rest of the process. Its free
        # part shrinks from_pretrained's warm-up (caching_allocator_warmup subtracts reserved
        # memory not in use), which a user's fresh process does not have; 2 MiB less moved
        # where the weights land and a Llama-3-8B QLoRA run's total by 8% (the
        # h200-qlora-load traces)
        try:
            import transformers.processing_utils  # noqa: F401
        except ImportError:
            pass
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, attn_implementation=attn, dtype=dtype
        )
    quant = workload.quant
    if quant is not None:
        # as users load a quantized model: a checkpoint, then from_pretrained with a
        # BitsAndBytesConfig (the random one saved here, freed before loading)
        import gc

        folder = tempfile.mkdtemp()  # removed once loaded: a 7B checkpoint is 15 GB of disk
        model.save_pretrained(folder)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            # the random model was only the checkpoint to load: a user who loads theirs
            # never holds it, so the build's peak starts at from_pretrained
            torch.cuda.reset_peak_memory_stats()
        names = {
            "fp32": torch.float32,
            "fp16": torch.float16,
            "bf16": torch.bfloat16,
            "uint8": torch.uint8,
            "int8": torch.int8,
        }
        if quant.kind.value == "int8":
            config = transformers.BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_threshold=quant.int8_threshold
            )
        else:
            config = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant.kind.value,
                bnb_4bit_use_double_quant=quant.double_quant,
                bnb_4bit_compute_dtype=names[quant.compute_dtype.value],
                bnb_4bit_quant_storage=names[quant.quant_storage.value],
            )
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder,
                quantization_config=config,
                dtype=dtype,
                device_map={"": device},
                attn_implementation=attn,
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if training:
            import peft

            # casts the other 16-bit parameters to fp32; with checkpointing, reentrant
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
    elif ckpt:
        model.gradient_checkpointing_enable()  # non-reentrant: transformers' default
    if workload.lora is not None:
        import peft

        lora = workload.lora
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.targets,
                task_type="CAUSAL_LM",
            ),
        )
    return model


class _OpenPhase:
    """At most one phase of ``phase`` open at a time, for loops whose phases begin in
    callbacks and hooks (the Trainer's, generate's forward calls)."""

    def __init__(self, phase: Callable[[int, str], Any]) -> None:
        self.phase = phase
        self.ctx: Any = None
        self.name: str | None = None

    def start(self, step: int, name: str) -> None:
        self.stop()
        self.ctx = self.phase(step, name)
        self.ctx.__enter__()
        self.name = name

    def stop(self) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
        self.ctx, self.name = None, None


def plain_loop(
    torch: Any,
    model: Any,
    workload: Workload,
    device: str,
    make_optimizer: Callable[[Any], Any] | None,
    phase: Callable[[int, str], Any],
    steps: int,
    state: dict[str, Any],
) -> None:
    """``loss = model(input_ids=x, labels=x).loss`` (or keeping ``outputs``), backward, the
    optimizer step, ``zero_grad(set_to_none=True)``."""
    model.train()
    shape = (workload.batch, workload.seq)
    vocab = model.config.vocab_size
    state["x"] = torch.randint(0, vocab, shape, device=device)
    state["y"] = torch.randint(0, vocab, shape, device=device)
    optimizer = make_optimizer(model.parameters()) if make_optimizer else None
    state["optimizer"] = optimizer
    scaler = torch.amp.GradScaler("cuda") if workload.precision is Precision.amp_fp16 else None
    keep = workload.loop is Loop.keeps_logits
    for step in range(1, steps + 1):
        with phase(step, "forward"):
            with autocast_context(torch, workload, device):
                out = model(input_ids=state["x"], labels=state["y"])
            loss = out.loss
            if not keep:
                del out
        with phase(step, "backward"):
            (scaler.scale(loss) if scaler is not None else loss).backward()
            del loss
        with phase(step, "optimizer"):
            if optimizer is not None:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
            if keep:
                del out


def trainer_loop(
    torch: Any,
    model: Any,
    workload: Workload,
    device: str,
    phase: Callable[[int, str], Any],
    steps: int,
    state: dict[str, Any],
) -> None:
    """``transformers.Trainer(...).train()`` for ``steps`` steps on random tokens; phases from
    its callbacks and a forward hook."""
    transformers = import_transformers()
    optim = trainer_optim_name(workload.optimizer)
    if optim is None:
        raise VramfitError(
            f"the Trainer has no optim for {workload.optimizer.value}", field="--optimizer"
        )
    n = workload.batch * steps
    ids = torch.randint(0, model.config.vocab_size, (n, workload.seq))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"input_ids": ids[i], "labels": ids[i]}

    current = _OpenPhase(phase)
    counter = {"step": 0}

    def start(name: str) -> None:
        current.start(counter["step"], name)

    def stop() -> None:
        current.stop()

    class Phases(transformers.TrainerCallback):
        def on_step_begin(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            counter["step"] += 1
            start("forward")

        def on_pre_optimizer_step(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            start("optimizer")

        def on_step_end(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            stop()

    def forward_done(module: Any, args: Any, output: Any) -> None:
        if module.training and current.name is not None:
            start("backward")

    hook = model.register_forward_hook(forward_done)
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=workload.batch,
        max_steps=steps,
        bf16=workload.precision is Precision.amp_bf16,
        fp16=workload.precision is Precision.amp_fp16,
        optim=optim,
        gradient_checkpointing=workload.checkpointing is Checkpointing.full,
        max_grad_norm=1.0 if workload.clips else 0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=[Phases()]
    )
    state["trainer"] = trainer
    try:
        trainer.train()
    finally:
        stop()
        hook.remove()


def greedy_config(model: Any, tokens: int) -> Any:
    """Greedy decoding of exactly ``tokens`` new tokens with no logits processors: the
    model's generation config without an end-of-sequence token (``min_new_tokens`` would
    add a processor whose copies of the scores a plain ``generate`` does not make)."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.max_new_tokens = tokens
    config.min_new_tokens = None
    config.do_sample = False
    return config


def run_hf(
    torch: Any,
    model: Any,
    workload: Workload,
    device: str,
    make_optimizer: Callable[[Any], Any] | None,
    phase: Callable[[int, str], Any],
    steps: int,
    state: dict[str, Any],
) -> None:
    """Run ``workload`` on the built HF ``model``, recording phases through ``phase``."""
    if workload.mode is Mode.train:
        if workload.loop is Loop.trainer:
            trainer_loop(torch, model, workload, device, phase, steps, state)
        else:
            plain_loop(torch, model, workload, device, make_optimizer, phase, steps, state)
        return
    model.eval()
    x = torch.randint(0, model.config.vocab_size, (workload.batch, workload.seq), device=device)
    state["x"] = x
    with torch.no_grad(), autocast_context(torch, workload, device):
        if workload.gen_tokens:
            calls = {"n": 0}
            current = _OpenPhase(phase)

            def pre(module: Any, args: Any, kwargs: Any) -> None:
                calls["n"] += 1
                name = "prefill" if calls["n"] == 1 else "decode"
                if current.name != name:
                    current.start(1, name)

            hook = model.register_forward_pre_hook(pre, with_kwargs=True)
            try:
                state["out"] = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    generation_config=greedy_config(model, workload.gen_tokens),
                )
            finally:
                hook.remove()
                current.stop()
        else:
            with phase(1, "prefill"):
                state["out"] = model(input_ids=x)


def int8_outlier_fractions(
    torch: Any, model: Any, workload: Workload, device: str
) -> dict[str, float]:
    """For each LLM.int8 block linear (by its path in the block: ``mlp.down_proj``, as GPT-2
    has two ``c_proj``), the mean over layers of
    the fraction of its input columns in which some row reaches ``llm_int8_threshold``:
    what ``int8_vectorwise_quant`` finds (``(A.abs() >= threshold).any(dim=0)`` on A in
    fp16). One forward without grad on fresh random tokens of the run's shape, after the
    measurement, so its own temporaries are not in the figures. The data decide these; the
    estimator takes them as ``quant.int8_outliers`` (``--int8-outliers``)."""
    import bitsandbytes as bnb

    assert workload.quant is not None
    threshold = workload.quant.int8_threshold
    fractions: dict[str, list[float]] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def count(module: Any, args: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float16)
            cols = int((x.abs() >= threshold).any(dim=0).sum())
            fractions.setdefault(name, []).append(cols / x.shape[-1])

        return count

    for path, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            handles.append(module.register_forward_pre_hook(hook(block_path(path))))
    try:
        shape = (workload.batch, workload.seq)
        ids = torch.randint(0, model.config.vocab_size, shape, device=device)
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: round(sum(v) / len(v), 4) for name, v in sorted(fractions.items())}


def block_path(path: str) -> str:
    """``mlp.down_proj`` of ``base_model.model.model.layers.3.mlp.down_proj.base_layer``."""
    parts = path.removesuffix(".base_layer").split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h") and parts[i + 1].isdigit():
            return ".".join(parts[i + 2 :])
    return parts[-1]
