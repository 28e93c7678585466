"""Triton (CUDA) kernels of the mmrec operators."""
