"""The ``qdet`` command line: one module per command group over the Python API, assembled in
``app``; :func:`main` is the entry point."""
import time

# when the command began (``time.perf_counter``, the clock of ``qdet.engine.budget``; None
# when the app is called another way): the budget of ``qdet train --time`` counts from here,
# imports included
STARTED: float | None = None


def main():
    """Run the ``qdet`` command (the installed script and ``python -m qdet``)."""
    global STARTED
    STARTED = time.perf_counter()
    from .app import main as run

    run()
