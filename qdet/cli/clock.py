"""When the command began (``time.perf_counter``, the clock of ``qdet.engine.budget``; None
when the app is called another way, as tests do): the budget of ``qdet train --time``
counts from here, imports included. A leaf module, so the commands read it without
importing the package that assembles them."""
STARTED: float | None = None
