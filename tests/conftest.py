"""Shared test settings: which devices the device-parametrized tests run on."""

import pytest
import torch

# CPU always; CUDA as well where a GPU is present (the torch reference ops then run on it).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])
