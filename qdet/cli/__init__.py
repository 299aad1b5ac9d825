"""The ``qdet`` command line: one module per command group over the Python API, assembled in
``app``; :func:`main` is the entry point."""
import time


def main():
    """Run the ``qdet`` command (the installed script and ``python -m qdet``)."""
    from . import clock

    clock.STARTED = time.perf_counter()
    from .app import main as run

    run()
