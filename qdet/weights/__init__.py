"""Weights in and out: qdet checkpoints, official releases, Hugging Face folders, the zoo of
pretrained detectors, fine-tuning transfer, and ONNX export and running."""
