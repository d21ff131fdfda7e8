"""Hugging Face ``config.json`` -> ``ModelSpec``, read from disk only (never the network).

Each supported ``model_type`` maps its keys onto ModelSpec following the matching
``transformers/models/<type>/modeling_<type>.py``: which tensors exist decides the fields, so
``count_params`` on the result gives the checkpoint's parameter count (checked against published
counts in tests/test_hf.py). Defaults for absent keys are those of ``configuration_<type>.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vramfit.config import (
    MAX_INT_DIGITS,
    Arch,
    Mlp,
    ModelSpec,
    ModelType,
    Norm,
    Positions,
    read_text_bounded,
    validation_error,
)
from vramfit.errors import VramfitError, shown
from vramfit.estimate.params import count_params

_MISSING = object()


class _Config:
    """A parsed config.json whose typed getters fail as one-line VramfitErrors naming the key."""

    def __init__(self, data: dict[str, Any], file: Path) -> None:
        self.data = data
        self.file = file

    def _raw(self, keys: tuple[str, ...], default: Any) -> tuple[str, Any]:
        for key in keys:
            if key in self.data:
                return key, self.data[key]
        if default is _MISSING:
            raise VramfitError("missing key", field=f"{self.file}: {keys[0]}")
        return keys[0], default

    def integer(self, *keys: str, default: Any = _MISSING) -> Any:
        """A positive int (or ``default``, which may be None, when every key is absent or null)."""
        key, value = self._raw(keys, default)
        if value is None and default is not _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise VramfitError(
                f"expected a positive integer, got {shown(value)}", field=f"{self.file}: {key}"
            )
        return value

    def flag(self, *keys: str, default: Any = _MISSING) -> bool:
        key, value = self._raw(keys, default)
        if not isinstance(value, bool):
            raise VramfitError(
                f"expected true or false, got {shown(value)}", field=f"{self.file}: {key}"
            )
        return value


def _llama_like(cfg: _Config, *, tied: bool) -> dict[str, Any]:
    """Fields shared by the Llama-derived families (RMSNorm, gated MLP, RoPE)."""
    heads = cfg.integer("num_attention_heads")
    return {
        "arch": Arch.llama,
        "layers": cfg.integer("num_hidden_layers"),
        "hidden": cfg.integer("hidden_size"),
        "heads": heads,
        "kv_heads": cfg.integer("num_key_value_heads", default=heads),
        "head_dim": cfg.integer("head_dim", default=None),
        "ffn": cfg.integer("intermediate_size"),
        "vocab": cfg.integer("vocab_size"),
        "tied": cfg.flag("tie_word_embeddings", default=tied),
    }


def _llama(cfg: _Config) -> dict[str, Any]:
    fields = _llama_like(cfg, tied=False)
    attention_bias = cfg.flag("attention_bias", default=False)
    mlp_bias = cfg.flag("mlp_bias", default=False)
    if mlp_bias and not attention_bias:
        raise VramfitError(
            "mlp_bias without attention_bias cannot be represented", field=str(cfg.file)
        )
    # attention_bias alone also puts a bias on o_proj, which ModelSpec cannot express
    # (qkv_bias covers q, k, v): that undercounts by hidden x layers.
    fields["bias"] = attention_bias and mlp_bias
    fields["qkv_bias"] = attention_bias
    return fields


def _mistral(cfg: _Config) -> dict[str, Any]:
    return {
        **_llama_like(cfg, tied=False),
        "sliding_window": cfg.integer("sliding_window", default=None),
    }


def _mixtral(cfg: _Config) -> dict[str, Any]:
    fields = _mistral(cfg)
    # modeling_mixtral: every layer's MLP is num_local_experts SwiGLU experts of intermediate_size
    fields["experts"] = cfg.integer("num_local_experts")
    fields["experts_per_token"] = cfg.integer("num_experts_per_tok")
    fields["expert_ffn"] = fields["ffn"]
    return fields


def _qwen2(cfg: _Config) -> dict[str, Any]:
    fields = {**_llama_like(cfg, tied=False), "qkv_bias": True}  # q/k/v_proj bias=True
    if cfg.flag("use_sliding_window", default=False):
        fields["sliding_window"] = cfg.integer("sliding_window", default=None)
    return fields


def _qwen2_moe(cfg: _Config) -> dict[str, Any]:
    fields = _qwen2(cfg)
    if cfg.integer("decoder_sparse_step", default=1) != 1 or cfg.data.get("mlp_only_layers"):
        raise VramfitError(
            "a mix of dense and MoE layers (decoder_sparse_step > 1 or mlp_only_layers) "
            "cannot be represented",
            field=str(cfg.file),
        )
    fields["experts"] = cfg.integer("num_experts")
    fields["experts_per_token"] = cfg.integer("num_experts_per_tok")
    fields["expert_ffn"] = cfg.integer("moe_intermediate_size")
    shared_ffn = cfg.data.get("shared_expert_intermediate_size") or 0
    if shared_ffn:
        # Qwen2MoeSparseMoeBlock: one shared SwiGLU expert behind a sigmoid gate (h -> 1)
        fields["shared_experts"] = 1
        fields["shared_expert_ffn"] = cfg.integer("shared_expert_intermediate_size")
        fields["shared_expert_gate"] = True
    return fields


def _gemma(cfg: _Config) -> dict[str, Any]:
    # GeGLU (gate, up, down) has SwiGLU's three matrices, so mlp=swiglu counts it exactly.
    return _llama_like(cfg, tied=True)


def _gemma2(cfg: _Config) -> dict[str, Any]:
    return {
        **_llama_like(cfg, tied=True),
        # input, post-attention, pre-feedforward and post-feedforward RMSNorms
        "norms_per_layer": 4,
        # sliding window attention on every other layer (Gemma Team 2024, Table 1)
        "sliding_window": cfg.integer("sliding_window", default=None),
        "sliding_window_every": 2,
    }


def _phi3(cfg: _Config) -> dict[str, Any]:
    # fused qkv_proj and gate_up_proj hold exactly the q, k, v, gate and up parameters
    return _mistral(cfg)


def _gpt2(cfg: _Config) -> dict[str, Any]:
    hidden = cfg.integer("n_embd", "hidden_size")
    return {
        "arch": Arch.gpt2,
        "layers": cfg.integer("n_layer", "num_hidden_layers"),
        "hidden": hidden,
        "heads": cfg.integer("n_head", "num_attention_heads"),
        "ffn": cfg.integer("n_inner", default=4 * hidden),
        "vocab": cfg.integer("vocab_size"),
        "max_positions": cfg.integer("n_positions", "max_position_embeddings"),
        "tied": cfg.flag("tie_word_embeddings", default=True),
    }


def _gpt_neox(cfg: _Config) -> dict[str, Any]:
    # GPT-NeoX: GPT-2's tensors (LayerNorm, GELU MLP, biases, two norms per block even with the
    # parallel residual) but rotary positions and an untied embed_out.
    return {
        "arch": Arch.gpt2,
        "layers": cfg.integer("num_hidden_layers"),
        "hidden": cfg.integer("hidden_size"),
        "heads": cfg.integer("num_attention_heads"),
        "ffn": cfg.integer("intermediate_size"),
        "vocab": cfg.integer("vocab_size"),
        "positions": Positions.rope,
        "tied": cfg.flag("tie_word_embeddings", default=False),
        "bias": cfg.flag("attention_bias", default=True),
    }


def _falcon(cfg: _Config) -> dict[str, Any]:
    hidden = cfg.integer("hidden_size")
    heads = cfg.integer("num_attention_heads", "n_head")
    if cfg.flag("new_decoder_architecture", default=False):
        kv_heads = cfg.integer("num_kv_heads", default=heads)
        # ln_attn + ln_mlp, or one shared input_layernorm (num_ln_in_parallel_attn: 1)
        norms = cfg.integer("num_ln_in_parallel_attn", default=2)
    else:
        kv_heads = 1 if cfg.flag("multi_query", default=True) else heads
        # parallel attention + MLP read one input_layernorm; else a post_attention_layernorm too
        norms = 1 if cfg.flag("parallel_attn", default=True) else 2
    return {
        "arch": Arch.llama,
        "layers": cfg.integer("num_hidden_layers", "n_layer"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "ffn": cfg.integer("ffn_hidden_size", default=4 * hidden),
        "vocab": cfg.integer("vocab_size"),
        "tied": cfg.flag("tie_word_embeddings", default=True),
        "norm": Norm.layernorm,  # nn.LayerNorm, with its bias even when bias is false
        "mlp": Mlp.gelu,
        "positions": Positions.rope,  # ALiBi (alibi: true) has no parameters either
        "bias": cfg.flag("bias", default=False),
        "norms_per_layer": norms,
    }


_MAPPERS: dict[str, Callable[[_Config], dict[str, Any]]] = {
    "falcon": _falcon,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "llama": _llama,
    "mistral": _mistral,
    "mixtral": _mixtral,
    "phi3": _phi3,
    "qwen2": _qwen2,
    "qwen2_moe": _qwen2_moe,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_MAPPERS))


def _config_file(path: Path) -> Path:
    try:
        return path / "config.json" if path.is_dir() else path
    except (OSError, ValueError):  # e.g. a name too long for the file system
        return path  # read_bounded reports it


class _TooLong(ValueError):
    """An integer literal longer than MAX_INT_DIGITS."""


def _json_integer(text: str) -> int:
    # json's parse_int hook: refuse before int() does (Python parses at most 4,300 digits)
    digits = text.lstrip("-")
    if len(digits) > MAX_INT_DIGITS:
        raise _TooLong(f"an integer of {len(digits):,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _read_config(path: Path) -> _Config:
    file = _config_file(path)
    text = read_text_bounded(file)
    try:
        data = json.loads(text, parse_int=_json_integer)
    except json.JSONDecodeError as exc:
        raise VramfitError(
            f"invalid JSON: {exc.msg} (line {exc.lineno})", field=str(file)
        ) from None
    except _TooLong as exc:
        raise VramfitError(f"invalid JSON: {exc}", field=str(file)) from None
    except RecursionError:
        raise VramfitError("invalid JSON: nested too deeply", field=str(file)) from None
    if not isinstance(data, dict):
        raise VramfitError(f"expected a JSON object, got {type(data).__name__}", field=str(file))
    return _Config(data, file)


def _dropouts(cfg: _Config, model_type: str) -> dict[str, float]:
    """Dropout probabilities, with transformers' defaults for keys the file omits:
    GPT2Config resid_pdrop = embd_pdrop = attn_pdrop = 0.1; the Llama-derived configs'
    attention_dropout 0.0 (Phi-3 also has resid_pdrop and embd_pdrop, 0.0)."""
    if model_type == "gpt2":
        keys = {"resid_dropout": "resid_pdrop", "embd_dropout": "embd_pdrop",
                "attention_dropout": "attn_pdrop"}
        default = 0.1
    else:
        keys = {"attention_dropout": "attention_dropout"}
        if model_type == "phi3":
            keys |= {"resid_dropout": "resid_pdrop", "embd_dropout": "embd_pdrop"}
        default = 0.0
    out = {}
    for field, key in keys.items():
        value = cfg.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise VramfitError(
                f"expected a probability in [0, 1), got {value!r}", field=f"{cfg.file}: {key}"
            )
        out[field] = float(value)
    return out


def _spec(cfg: _Config, path: Path) -> ModelSpec:
    model_type = cfg.data.get("model_type", _MISSING)
    if model_type is _MISSING:
        raise VramfitError("missing key", field=f"{cfg.file}: model_type")
    mapper = _MAPPERS.get(model_type) if isinstance(model_type, str) else None
    if mapper is None:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise VramfitError(
            f"unsupported model_type {shown(model_type)}; supported: {supported}", field=str(path)
        )
    fields = {key: value for key, value in mapper(cfg).items() if value is not None}
    fields["model_type"] = ModelType(model_type)
    fields.update(_dropouts(cfg, model_type))
    try:
        return ModelSpec.model_validate(fields)
    except ValidationError as err:
        raise validation_error(err, prefix=f"{cfg.file}: ") from None


def spec_from_hf_config(path: Path) -> ModelSpec:
    """The ModelSpec of a Hugging Face ``config.json`` (or a folder holding one).

    Every failure (missing file, invalid JSON, missing key, unsupported ``model_type``) is one
    VramfitError naming the file and, where there is one, the key.
    """
    return _spec(_read_config(path), path)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-.")


def _import_name(cfg: _Config) -> tuple[str, str]:
    """(preset name, title) from ``_name_or_path``, else the folder holding config.json."""
    origin = cfg.data.get("_name_or_path")
    title = origin.rstrip("/").split("/")[-1] if isinstance(origin, str) else ""
    if not _slug(title):
        title = cfg.file.resolve().parent.name
    return (_slug(title) or "imported"), (title or "imported")


def preset_yaml_from_hf(path: Path) -> str:
    """Preset YAML text for a ``config.json`` (or its folder), valid as a ``Preset``.

    ``published_params`` is the derived count with ``params_exact: false``: replace it with the
    model card's figure so ``vramfit check`` can compare the two.
    """
    import yaml  # only here: an estimate from --hf-config reads JSON alone (~8 ms saved)

    cfg = _read_config(path)
    spec = _spec(cfg, path)
    name, title = _import_name(cfg)
    model = spec.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    document = {
        "name": name,
        "title": title,
        "source": str(path),
        "published_params": count_params(spec).total,
        "params_exact": False,
        "model": {"arch": spec.arch.value, **model},
    }
    header = (
        f"# Imported from {cfg.file} by vramfit import-hf.\n"
        "# published_params is the derived count: replace it with the model card's figure.\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
