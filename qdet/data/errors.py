"""The errors bad input data raises."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names the file and what to fix, on one line."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises this type with the worker's whole traceback as the
        # message; keep the one line that was raised.
        if message.startswith("Caught DataError"):
            message = message.rstrip().rsplit("\n", 1)[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


class DataProblems(DataError):
    """Several problems found in one pass over a dataset (the YOLO and VOC readers look at
    every file before they stop): ``problems`` holds one line each, naming the file and the
    line or element (at most ``LIMIT`` kept; ``count`` is how many were found). The message
    is the first line and how many more there are, so that training still stops with one
    line; ``qdet data check`` prints them all."""

    LIMIT = 1000

    def __init__(self, problems: list[str], count: int | None = None):
        self.problems, self.count = list(problems), count or len(problems)
        more = self.count - 1
        super().__init__(problems[0] + (f" (and {more} more problem{'s' * (more > 1)}; "
                                        "`qdet data check` lists them)" if more else ""))

    def __reduce__(self):  # picklable across DataLoader workers, like any exception
        return type(self), (self.problems, self.count)
