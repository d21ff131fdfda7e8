"""Are two versions' predictions the same to the byte? ``vramfit estimate ... --json`` of a few
hundred varied runs, written once and compared after a change.

A speed-up of the estimator must not move any prediction: the accuracy tables print GiB to two
places, this compares the whole JSON output (every byte count, phase and note) and the exit code
of each run. The runs are drawn from a fixed seed over presets and shapes, both
implementations, training, evaluation and ``generate``, the checkpointing modes, LoRA and
QLoRA, the multi-GPU layouts and ``--solve``. Run from the repository root:

    python benchmarks/equivalence.py --write before.jsonl    # the code before the change
    python benchmarks/equivalence.py --check before.jsonl    # after it: lists every difference
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shlex
import sys
import time
from pathlib import Path

PRESETS = [
    "gpt2",
    "llama-3.2-1b",
    "gemma-2-2b",
    "qwen2.5-0.5b",
    "mistral-7b",
    "phi-3-mini",
    "pythia-160m",
    "mixtral-8x7b",
    "llama-3-8b",
]
SEED = 14


def _model(rng: random.Random) -> tuple[list[str], bool]:
    """A model's options, and whether its positions are learned (1024 of them)."""
    if rng.random() < 0.6:
        preset = rng.choice(PRESETS)
        layers = ["--layers", str(rng.choice([1, 2, 3, 4, 6]))]
        return ["--preset", preset, *layers], preset == "gpt2"
    arch = rng.choice(["gpt2", "llama"])
    hidden = rng.choice([64, 128, 256, 768])
    layers = ["--layers", str(rng.choice([1, 2, 5, 8, 16]))]
    return ["--arch", arch, "--hidden", str(hidden), *layers], arch == "gpt2"


def _workload(rng: random.Random, learned: bool) -> list[str]:
    """A workload the model accepts: what only the hf profile models goes with it."""
    seqs = [1, 7, 128, 512, 1000] if learned else [1, 7, 128, 512, 1000, 2048]
    args = ["--seq", str(rng.choice(seqs)), "--batch", str(rng.choice([1, 2, 3, 8]))]
    hf = rng.random() < 0.7
    args += ["--impl", "hf" if hf else "reference"]
    args += ["--attention", rng.choice(["flash", "eager"])]
    if rng.random() < 0.7:
        args += ["--precision", rng.choice(["fp32", "amp-fp16", "amp-bf16", "bf16", "fp16"])]
    if rng.random() < 0.25:
        args += ["--mode", "infer"]
        if rng.random() < 0.6:
            args += ["--gen-tokens", str(rng.choice([1, 2, 3, 16]))]
        return args
    modes = ["none", "full"] if hf else ["none", "full", "selective"]
    args += ["--checkpointing", rng.choice(modes)]
    if rng.random() < 0.4:
        args += ["--loop", rng.choice(["trainer", "drops", "keeps-logits"])]
    if rng.random() < 0.3:
        optimizers = ["adamw", "adamw-foreach", "adamw-fused", "adamw-forloop", "sgd"]
        optimizers += ["adam-8bit", "paged-adamw-8bit"] if hf else []
        args += ["--optimizer", rng.choice([*optimizers, "adafactor", "adafactor-hf"])]
    extra = rng.random()
    if not hf:
        return args
    if extra < 0.15:
        args += ["--lora-rank", "16", "--lora-targets", "all-linear"]
        if rng.random() < 0.6:
            args += ["--quant", rng.choice(["nf4", "int8"])]
    elif extra < 0.30:
        args += ["--gpus", "8", "--fsdp", "full"]
        args += rng.choice([[], ["--reshard-after-forward", "false"],
                            ["--reshard-after-forward", "2"], ["--offload", "params"]])
    elif extra < 0.36:
        args += ["--gpus", "2", "--tp", "2"]
    elif extra < 0.42:
        args += ["--gpus", "4", "--zero", "2"]
    elif extra < 0.48:
        args += ["--gpus", "2", "--pp", "2"]
    return args


def cases() -> list[list[str]]:
    """The runs, the same on every call."""
    rng = random.Random(SEED)
    out = []
    for _ in range(300):
        model, learned = _model(rng)
        out.append(model + _workload(rng, learned) + ["--gpu", rng.choice(["H200", "A100-40GB"])])
    for _ in range(12):  # deeper models, where a block's allocations meet the cache of others
        arch = rng.choice(["gpt2", "llama"])
        model = ["--arch", arch, "--hidden", "64", "--layers", str(rng.choice([40, 96]))]
        out.append(model + _workload(rng, arch == "gpt2") + ["--gpu", "H200"])
    for _ in range(12):  # solves make tens of estimates each: small models only
        model = ["--arch", rng.choice(["gpt2", "llama"]), "--hidden", "64"]
        model += ["--layers", str(rng.choice([2, 4, 8]))]
        gpu = rng.choice(["H200", "MI300X", "T4"])
        out.append(model + ["--solve", rng.choice(["batch", "seq"]), "--gpu", gpu])
    return out


def run(argv: list[str]) -> dict[str, object]:
    """One run's exit code, standard output and standard error (-1 and the exception's
    message when it raised)."""
    from vramfit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["estimate", *argv, "--json"])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception as error:  # a bug: the same bug must stay, and its message with it
            code, err = -1, io.StringIO(f"{type(error).__name__}: {error}")
    return {"args": shlex.join(argv), "code": code, "out": out.getvalue(), "err": err.getvalue()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="write every run's output here (JSON lines)")
    group.add_argument("--check", type=Path, help="compare every run's output with this file")
    args = parser.parse_args()
    started = time.perf_counter()
    results = [run(argv) for argv in cases()]
    elapsed_s = time.perf_counter() - started
    if args.write is not None:
        with args.write.open("w", encoding="utf-8") as out:
            for r in results:
                out.write(json.dumps(r) + "\n")
        print(f"{len(results)} runs written to {args.write} in {elapsed_s:.1f} s")
        return 0
    expected = [json.loads(line) for line in args.check.read_text(encoding="utf-8").splitlines()]
    if [e["args"] for e in expected] != [r["args"] for r in results]:
        print("the runs differ from the file's: written by another version of this script")
        return 2
    differ = [r for r, e in zip(results, expected, strict=True) if r != e]
    for r in differ:
        print(f"differs: vramfit estimate {r['args']} --json")
    print(f"{len(results) - len(differ)} of {len(results)} runs identical ({elapsed_s:.1f} s)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
