"""Test setup: without a GPU, Triton kernels run on CPU tensors through the interpreter.

The variable must be set before any @triton.jit function is defined, i.e. before kmkernels is
imported, so it is done here at collection time.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# Interpreter-safe dtypes: bf16 loads are broken under TRITON_INTERPRET, so bf16 runs only on GPU.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)")


@pytest.fixture
def device():
    return DEVICE
