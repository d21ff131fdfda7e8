"""The hf profile against the real transformers modules: what an inference forward keeps alive.

Each case builds a tiny transformers model on the CPU and runs a no-grad forward, an
evaluation (every position's logits) or generate()'s prefill (position ids from the
attention mask, ``logits_to_keep=1``), under a dispatch mode that tracks every storage an
op makes until Python frees it (parameters, buffers and the inputs excluded). Its peak is
compared with the peak of the profile's graph replayed onto a tape: what the model's Python
code holds (``inputs_embeds``, the loop's layer input, GPT-2's ``attn_output``, eager
attention's returned weights, the masks) decides it, as much as what the ops make.
Eager attention in fp32, where the CPU runs the same ops as CUDA.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.test_hf_profile_oracle import MODELS  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from vramfit.config import RunSpec  # noqa: E402
from vramfit.estimate.graph import end_forward, run_forward  # noqa: E402
from vramfit.estimate.profiles import hf  # noqa: E402
from vramfit.estimate.timeline import Tape, Timeline  # noqa: E402

B, S = 2, 24  # S != hidden / heads keeps score-sized and hidden-sized tensors apart
SLACK = 8 * S + 16  # the int64 cache_position and 0-dim constants, which the profile omits


class _Live(TorchDispatchMode):
    """Bytes of the storages ops made (of ``least`` bytes or more) that are still referenced,
    their peak, and the live bytes after each one is made."""

    def __init__(self, skip: set[int], least: int = 0) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0
        self.after: list[int] = []
        self.skip, self.least = skip, least

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                big = storage.nbytes() >= self.least
                if key and big and key not in self.live and key not in self.skip:
                    self.live[key] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, key, None)
                    self.after.append(sum(self.live.values()))
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _run(model_type: str, generate: bool, seq: int = S) -> RunSpec:
    extra = {"gen_tokens": 1} if generate else {"logits": "all"}
    return RunSpec.model_validate(
        {
            "model": MODELS[model_type],
            "workload": {"impl": "hf", "mode": "infer", "batch": B, "seq": seq,
                         "precision": "fp32", "attention": "eager", **extra},
        }
    )


def _real_model(run: RunSpec) -> tuple[Any, Any]:
    """The tiny transformers model of ``run`` (eager attention, eval mode) and its input ids."""
    from vramfit.measure.hf import hf_config

    spec = run.model.resolved()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(spec, run.workload), attn_implementation="eager"
    ).eval()
    return model, torch.randint(0, spec.vocab, (B, run.workload.seq))


def _real_peak(run: RunSpec, generate: bool) -> int:
    model, ids = _real_model(run)
    inputs: dict = {"input_ids": ids}
    if generate:  # what generate() hands the prefill (prepare_inputs_for_generation)
        mask = torch.ones_like(ids)
        inputs.update(attention_mask=mask, position_ids=mask.cumsum(-1) - 1, logits_to_keep=1)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    skip |= {t.untyped_storage().data_ptr() for t in inputs.values() if torch.is_tensor(t)}
    mode = _Live(skip)
    with torch.no_grad(), mode:
        model(**inputs)
    return mode.peak


def _profile_timeline(run: RunSpec, generate: bool) -> Timeline:
    spec = run.model.resolved()
    graph, model, logits, _ = hf.build(
        spec, run.workload, grad=False, batch=B, seq=run.workload.seq, all_logits=not generate,
        use_cache=True, generate=generate,
    )
    tape = Tape(phase="prefill")
    tape.op("start")
    graph.hold(logits, "step")
    for kv in model.cache:
        graph.hold(kv, "step")
    end_forward(run_forward(graph, tape))
    return tape.finish()


def _profile_peak(run: RunSpec, generate: bool) -> int:
    return max(_profile_timeline(run, generate).live_bytes())


@pytest.mark.parametrize("generate", [False, True], ids=["eval", "prefill"])
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_inference_forward_keeps_what_transformers_keeps(model_type: str, generate: bool) -> None:
    run = _run(model_type, generate)
    real = _real_peak(run, generate)
    predicted = _profile_peak(run, generate)
    assert abs(predicted - real) <= SLACK, (model_type, predicted, real)


def _real_cache_bytes(run: RunSpec) -> int:
    """Bytes of the distinct storages the prefill's returned DynamicCache holds."""
    model, ids = _real_model(run)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
    }
    return sum(storages.values())


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_the_prefills_cache_is_the_kv_cache_component(model_type: str) -> None:
    """What the DynamicCache holds after the prefill is what the profile calls the KV cache
    (the breakdown's ``kv_cache``), not activations: every layer's keys and values."""
    run = _run(model_type, True)
    timeline = _profile_timeline(run, True)
    last = timeline.last
    kv = sum(
        a.n_bytes
        for a in timeline.allocations
        if a.component == "kv_cache" and a.start <= last <= a.end
    )
    assert kv == _real_cache_bytes(run) > 0


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_eager_attention_keeps_its_repeated_keys_to_its_return(model_type: str) -> None:
    """At 128 tokens the prefill peaks at the scores, where eager_attention_forward's local
    ``key_states`` (repeat_kv's copy of grouped K) is still alive, after its last use (the
    profile was 64 KiB short without it)."""
    run = _run(model_type, True, 128)
    assert _profile_peak(run, True) == _real_peak(run, True)


def test_measured_generate_is_plain_greedy_decoding() -> None:
    """``measure`` generates exactly the asked tokens with no logits processors, as a plain
    ``generate(max_new_tokens=N)`` that never meets its end token would."""
    from vramfit.measure.hf import greedy_config, hf_config

    run = _run("llama", True)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(run.model.resolved(),
                                                                    run.workload)).eval()
    model.generation_config.eos_token_id = 2
    config = greedy_config(model, 5)
    processors = model._get_logits_processor(
        generation_config=config, input_ids_seq_length=S, encoder_input_ids=None,
        prefix_allowed_tokens_fn=None, logits_processor=None,
    )
    assert list(processors) == []
    ids = torch.randint(0, 128, (B, S))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert out.shape == (B, S + 5)
    assert model.generation_config.eos_token_id == 2  # the model's own config is untouched


BIG = 4096  # bytes: the masks, the rotary tables and the embeddings, not aranges or scalars


def _real_sequence(run: RunSpec, generate: bool) -> list[int]:
    model, ids = _real_model(run)
    inputs: dict = {"input_ids": ids}
    if generate:
        mask = torch.ones_like(ids)
        inputs.update(attention_mask=mask, position_ids=mask.cumsum(-1) - 1, logits_to_keep=1)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    skip |= {t.untyped_storage().data_ptr() for t in inputs.values() if torch.is_tensor(t)}
    mode = _Live(skip, BIG)
    with torch.no_grad(), mode:
        model(**inputs)
    return mode.after


def _profile_sequence(run: RunSpec, generate: bool) -> list[int]:
    timeline = _profile_timeline(run, generate)
    live, after = [], []
    by_point: dict[int, list] = {}
    for a in timeline.allocations:
        if not a.persistent and a.n_bytes >= BIG:
            by_point.setdefault(a.start, []).append(a)
    for i in range(len(timeline.points)):
        for a in by_point.get(i, []):
            live.append(a)
            after.append(sum(x.n_bytes for x in live))
        live = [x for x in live if x.end > i]
    return after


@pytest.mark.parametrize("generate", [False, True], ids=["eval", "prefill"])
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_a_forward_makes_and_frees_what_transformers_does_in_its_order(
    model_type: str, generate: bool
) -> None:
    """Every tensor of 4 KiB or more a whole forward makes, in order, with the live bytes after
    each is made: create_causal_mask (the boolean of sdpa_mask's mask functions, and-ed one at
    a time, generate's padding function making it batch-sized; then eager_mask's additive
    mask), a sliding-window model's own mask, Gemma-2's second one, the rotary tables, then
    each layer: what every local of the modeling code holds (a norm's input to its return,
    apply_rotary_pos_emb's arguments, the cache update's new states, the MLP's input, Phi-3's
    gate view, NewGELU's argument) and when the copies happen (matmul's contiguous q, none
    after Phi-3's pass-through cat), then the final norm with the base model's mask still
    held. At 128 tokens (GPT-2: 48, of its 64 positions); all 12 fail on the profile before
    these orderings were followed."""
    run = _run(model_type, generate, 48 if model_type == "gpt2" else 128)
    assert _profile_sequence(run, generate) == _real_sequence(run, generate)
