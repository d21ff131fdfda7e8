"""The ``vramfit`` process: ``python -m vramfit`` and the script that pip installs.

A run is short (an estimate takes a few hundred milliseconds, most of it start-up), so the
process tunes Python's cycle collector, which ``vramfit.cli.main`` leaves alone for callers
that run it in their own process.
"""

import gc


def run() -> None:
    """Run the command line on ``sys.argv`` and exit with its code."""
    # Importing typer, pydantic and the config models creates ~30,000 objects and no garbage
    # worth collecting: without a pause the collector traced them ~60 times (~15 ms). Frozen
    # once loaded, later collections skip them too.
    gc.disable()
    try:
        from vramfit.cli import main
    finally:
        gc.freeze()
        gc.enable()
    try:
        main()
    finally:
        # Frozen, the objects are not searched for reference cycles at interpreter shutdown
        # either (~40 ms); the memory goes back with the process.
        gc.freeze()


if __name__ == "__main__":
    run()
