"""What more than one method is built from: the model contract (``base``), the ResNet
backbone, sine position encodings, shared transformer layers, the iterative dynamic head and
the inference fast path. Imports only ``qdet.ops``."""
