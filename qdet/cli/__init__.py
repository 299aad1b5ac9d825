"""The ``qdet`` command line: one module per command group over the Python API, assembled in
``app``; :func:`main` is the entry point."""


def main():
    """Run the ``qdet`` command (the installed script and ``python -m qdet``)."""
    from .app import main as run

    run()
