"""One ``vramfit estimate --json`` start-up, stage by stage, as JSON on stdout.

Run by ``benchmarks/startup.py --stages`` (one fresh process per sample). It does what
``python -m vramfit estimate ... --json`` does, in the same order and with the same collector
policy as ``vramfit.__main__.run``, with a clock read between the steps:

    deps         import typer, pydantic (the bare-import baseline also imports rich and yaml,
                 which an estimate from options with --json never does)
    models       pydantic's model machinery (``import pydantic`` alone loads almost none of it)
    config       vramfit.config: the config models' classes
    cli          vramfit.cli
    command      typer builds the click command of `estimate`
    parse        click parses the options (typer builds a pydantic TypeAdapter per option)
    validate     the options become a validated RunSpec
    estimate-imp the estimator's modules
    estimate     the estimate itself
    output       the JSON document, dumped
    shutdown     from the last atexit handler to the process's end (the parent adds it)

Also: the cycle collector's time and collections over the run (gc.callbacks).
"""

import gc
import time

CLOCK = [("start", time.perf_counter())]
GC = {"s": 0.0, "n": 0, "began": 0.0}


def _lap(name: str) -> None:
    CLOCK.append((name, time.perf_counter()))


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        GC["began"] = time.perf_counter()
    else:
        GC["s"] += time.perf_counter() - GC["began"]
        GC["n"] += 1


def main() -> None:
    gc.callbacks.append(_on_gc)
    gc.disable()  # as vramfit.__main__.run while it imports the command line
    import os
    import sys

    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")  # as vramfit.cli.main
    import pydantic  # noqa: F401
    import typer  # noqa: F401

    _lap("deps")
    from pydantic import BaseModel  # noqa: F401

    _lap("models")
    import vramfit.config  # noqa: F401

    _lap("config")
    from vramfit import cli

    _lap("cli")
    gc.freeze()
    gc.enable()
    args = sys.argv[1:]
    group = cli._command_for(args)
    command = group.get_command(None, args[0])
    _lap("command")
    parent = group.make_context("vramfit", list(args))
    context = command.make_context(args[0], args[1:], parent=parent)
    _lap("parse")
    run = cli._run_from_options(**context.params)
    _lap("validate")
    from vramfit.estimate.core import estimate

    _lap("estimate-imp")
    result = estimate(run, None)
    _lap("estimate")
    import json

    text = json.dumps(cli.estimate_json(result), indent=2)
    _lap("output")
    assert text.startswith("{")
    laps = {name: (t - CLOCK[i][1]) * 1000 for i, (name, t) in enumerate(CLOCK[1:])}
    sys.stdout.write(json.dumps({"stages_ms": laps, "gc_ms": GC["s"] * 1000, "gc_runs": GC["n"]}))
    sys.stdout.flush()
    gc.freeze()  # as vramfit.__main__.run before the shutdown
    import atexit

    atexit.register(lambda: sys.stderr.write(f"{time.time()}\n"))


if __name__ == "__main__":
    main()
