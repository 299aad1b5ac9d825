"""The methods, one file per paper, and the registry that names them (``--arch``). A method
file imports only ``qdet.blocks`` and ``qdet.ops``."""
