"""The operators the models are built on, each a Numba kernel (CPU and CUDA) beside the
pure-PyTorch formulation it is tested against: multi-scale deformable attention, modulated
deformable convolution, RoIAlign; and the modes that pick a formulation (export, bf16).
Nothing here imports any other part of qdet."""
