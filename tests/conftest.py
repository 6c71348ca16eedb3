"""Shared test settings: the Triton interpreter on machines without a GPU, and poisoned kernel outputs."""

import os

import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors; it must be switched on before
# triton (and so dit8.kernels' Triton code) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN, so an element a kernel fails to write fails the comparison.
os.environ.setdefault("DIT8_POISON_OUTPUTS", "1")
