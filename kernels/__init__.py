"""vitprune.kernels: kernels for the hot paths, with a plain-PyTorch reference for each.

The code lives in the repository's top-level folder `kernels/`, which setup.py installs as
the subpackage `vitprune.kernels` (package_dir), so `from vitprune import kernels` reads
kernels/__init__.py, kernels/masked_linear.py, kernels/group_reg.py and kernels/reference.py.

Backends: "triton" (fused Triton kernels; CUDA, or CPU under TRITON_INTERPRET=1) and
"torch" (kernels/reference.py). `import vitprune` never needs triton: the Triton modules
are imported only when that backend is chosen.
"""
import os

import torch

from .reference import PrunableParams, as_index  # noqa: F401
from . import reference

BACKENDS = ("auto", "triton", "torch")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(name: str, device) -> str:
    """'auto' -> 'triton' on CUDA when triton imports, else 'torch'. An impossible request
    raises ValueError with the reason."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"--kernels: unknown {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "torch":
        return "torch"
    usable = triton_importable() and (device.type == "cuda" or interpret_mode())
    if name == "auto":
        return "triton" if usable and device.type == "cuda" else "torch"
    if not triton_importable():
        raise ValueError("--kernels=triton: triton is not installed; use --kernels=torch or auto")
    if not usable:
        raise ValueError("--kernels=triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU "
                         "testing); use --kernels=torch or auto")
    return "triton"


def get_ops(backend: str):
    """(masked_linear, group_reg) of a resolved backend."""
    if backend == "torch":
        return reference.masked_linear, reference.group_reg
    if backend == "triton":
        from .masked_linear import masked_linear
        from .group_reg import group_reg
        return masked_linear, group_reg
    raise ValueError(f"unresolved backend {backend!r}")
