"""The one error bad input data raises."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names the file and what to fix, on one line."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises this type with the worker's whole traceback as the
        # message; keep the one line that was raised.
        if message.startswith("Caught DataError"):
            message = message.rstrip().rsplit("\n", 1)[-1].split("DataError: ", 1)[-1]
        super().__init__(message)
