"""Print peft's own ``print_trainable_parameters`` line for published model configurations.

The model is built from its published ``config.json`` (tests/fixtures/hf) on the meta device,
so no weights are downloaded or allocated; ``get_peft_model`` then adds the adapters. The
output is committed as benchmarks/data/peft/print_trainable_parameters.txt and read by
tests/estimate/test_finetune.py (which needs neither torch nor peft to compare against it):

    python benchmarks/peft_golden.py > benchmarks/data/peft/print_trainable_parameters.txt
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

HF = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"

# (config folder, rank, target_modules: None = peft's default for the model_type)
CASES: list[tuple[str, int, list[str] | str | None]] = [
    ("Meta-Llama-3-8B", 8, None),
    ("Meta-Llama-3-8B", 16, "all-linear"),
    ("Llama-2-7b-hf", 8, None),
    ("Mistral-7B-v0.1", 64, "all-linear"),
    ("Qwen2.5-7B", 8, None),
    ("gemma-2-9b", 8, None),
    ("gemma-2b", 32, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("Phi-3-mini-4k-instruct", 8, ["qkv_proj", "o_proj"]),
    ("gpt2", 8, None),
    ("gpt2", 4, ["c_proj"]),
]


def main() -> None:
    print(
        f"# peft {peft.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}: python benchmarks/peft_golden.py"
    )
    for folder, r, targets in CASES:
        config = AutoConfig.from_pretrained(HF / folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gpt2's Conv1D: fan_in_fan_out set to True
            peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=targets))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            peft_model.print_trainable_parameters()
        name = (
            "default"
            if targets is None
            else ",".join([targets] if isinstance(targets, str) else targets)
        )
        print(f"{folder} r={r} targets={name} | {printed.getvalue().strip()}")


if __name__ == "__main__":
    main()
