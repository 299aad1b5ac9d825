"""``python -m qdet`` runs the same app as the ``qdet`` script (and torchrun -m qdet)."""
from .cli import main

main()
