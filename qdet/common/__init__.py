"""What every layer uses: the one atomic file writer, the terminal (consoles, progress bars,
tables) and dataclass configs read from and written to plain dicts."""
