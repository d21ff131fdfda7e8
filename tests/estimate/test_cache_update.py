"""A decode step's cache update, held against transformers' own cache layers on the CPU.

``DynamicLayer.update`` assigns ``self.keys = torch.cat(...)`` before it cats the values, so a
layer's old keys are gone when its new values are made; ``DynamicSlidingWindowLayer.update``
cats both into ``full_key_states`` / ``full_value_states`` and assigns after, so the old keys
live through both cats. The decode steps vramfit replays must do the same."""

from __future__ import annotations

import weakref

import pytest

from vramfit.config import RunSpec
from vramfit.estimate.schedule import hf_inference
from vramfit.presets import get_preset

torch = pytest.importorskip("torch")
cache_utils = pytest.importorskip("transformers.cache_utils")


def _old_keys_alive_at_each_cat(layer: object) -> list[bool]:
    """Whether the keys the layer held before an update still exist at each of its cats."""
    layer.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))  # type: ignore[attr-defined]
    keys = layer.keys  # type: ignore[attr-defined]
    old = weakref.ref(keys if keys._base is None else keys._base)
    del keys
    alive: list[bool] = []
    cat = torch.cat

    def watched(tensors: object, dim: int = 0) -> object:
        alive.append(old() is not None)
        return cat(tensors, dim=dim)

    torch.cat = watched
    try:
        layer.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))  # type: ignore[attr-defined]
    finally:
        torch.cat = cat
    return alive


def test_transformers_frees_a_full_layers_old_keys_before_the_values_cat() -> None:
    assert _old_keys_alive_at_each_cat(cache_utils.DynamicLayer()) == [True, False]
    sliding = cache_utils.DynamicSlidingWindowLayer(sliding_window=16)
    assert _old_keys_alive_at_each_cat(sliding) == [True, True]


def _decode_updates(preset: str) -> list[tuple[int, int, int, int]]:
    """For block 0 in the decode steps vramfit replays: (old keys' end, new values' start,
    old values' end, new keys' start) of each update, in points."""
    spec = get_preset(preset).model
    run = RunSpec.model_validate(
        {"model": spec.model_dump(exclude_none=True),
         "workload": {"mode": "infer", "batch": 1, "seq": 16, "gen_tokens": 5}}
    )
    timeline = hf_inference(run.model.resolved(), run.workload, 0)
    keys = [a for a in timeline.allocations if a.name == "block 0 cached keys"]
    values = [a for a in timeline.allocations if a.name == "block 0 cached values"]
    pairs = list(zip(keys, values, strict=True))
    return [
        (old_k.end, new_v.start, old_v.end, new_k.start)
        for (old_k, old_v), (new_k, new_v) in zip(pairs, pairs[1:], strict=False)
        if timeline.points[new_v.start][0] == "decode"
    ]


@pytest.mark.parametrize(("preset", "sliding"), [("llama-3.2-1b", False), ("phi-3-mini", True)])
def test_the_decode_steps_free_the_old_keys_as_transformers_does(
    preset: str, sliding: bool
) -> None:
    updates = _decode_updates(preset)
    assert updates
    for old_keys_end, new_values_start, _, new_keys_start in updates:
        assert old_keys_end >= new_keys_start  # the keys' cat reads them
        # a point's frees come after its allocations: dead before the values' cat means
        # freed at an earlier point than the one that makes the new values
        assert (old_keys_end >= new_values_start) is sliding


def test_generate_grows_its_mask_positions_and_ids_as_the_replay_does() -> None:
    """After every forward, transformers' generate() cats one token onto its position ids,
    its attention mask and its generated ids, in that order, each (batch, tokens) int64
    (seen on a tiny Llama on the CPU); the replayed run makes the same blocks in the same
    order, the caller's mask and ids held throughout."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    batch, seq, gen = 3, 5, 4
    x = torch.randint(0, 64, (batch, seq))
    grown: list[tuple[int, ...]] = []
    cat = torch.cat

    def watched(tensors: object, dim: int = 0, **kwargs: object) -> object:
        out = cat(tensors, dim=dim, **kwargs)
        if out.dtype == torch.int64:
            grown.append(tuple(out.shape))
        return out

    torch.cat = watched
    try:
        with torch.no_grad():
            model.generate(
                x, attention_mask=torch.ones_like(x),
                generation_config=transformers.GenerationConfig(
                    max_new_tokens=gen, do_sample=False, pad_token_id=0, eos_token_id=None
                ),
            )
    finally:
        torch.cat = cat
    expected = [(batch, seq + k) for k in range(1, gen + 1) for _ in range(3)]
    assert grown == expected

    run = RunSpec.model_validate(
        {"model": {"arch": "llama", "layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2,
                   "ffn": 64, "vocab": 64},
         "workload": {"mode": "infer", "batch": batch, "seq": seq, "gen_tokens": gen}}
    )
    timeline = hf_inference(run.model.resolved(), run.workload, 0)
    names = ("position ids", "attention mask", "generated ids")
    made = [(a.name, a.n_bytes) for a in sorted(timeline.allocations, key=lambda a: a.start)
            if a.name in names and a.start > 0]
    replayed = [(n, b) for n, b in made if b > batch * seq * 8]  # past the prefill's
    assert replayed == [(names[i % 3], batch * (seq + 1 + i // 3) * 8) for i in range(3 * gen)]
    held = {a.name for a in timeline.allocations if a.persistent}
    assert {"input ids", "attention mask"} <= held
