"""The ``vramfit`` process: ``python -m vramfit`` and the script that pip installs.

A run is short (an estimate takes a few hundred milliseconds, most of it start-up), so the
process sets up what must come before the command line is imported, and tunes Python's cycle
collector, which ``vramfit.cli.main`` leaves alone for callers that run it in their own
process.
"""

import gc
import os


def run() -> None:
    """Run the command line on ``sys.argv`` and exit with its code."""
    # vramfit.cli.main stops pydantic from searching every installed distribution for plugins
    # (it uses none); set here, the search is also skipped for the validators that importing
    # the command line builds (~3.5 ms for 131 distributions). An explicit setting is kept.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
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
