import os

import torch

# Without a GPU the Triton kernels are tested in Triton's CPU interpreter. triton.jit reads
# TRITON_INTERPRET when a kernel (including triton.language's own helpers such as tl.sum) is
# defined, and timm/torchvision import triton, so it must be set before any test module is
# collected. With a GPU the kernels are compiled (TRITON_INTERPRET=1 forces the interpreter).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Registered so that `-m gpu` / `-m "not gpu"` select without unknown-marker warnings.
    config.addinivalue_line("markers", "gpu: needs CUDA (compiled Triton kernels)")
