"""vitprune.kernels: kernels for the hot paths, with a plain-PyTorch reference for each.

The code lives in the repository's top-level folder `kernels/`, which setup.py installs as
the subpackage `vitprune.kernels` (package_dir), so `from vitprune import kernels` reads
kernels/__init__.py, kernels/masked_linear.py, kernels/group_reg.py and kernels/reference.py.

Backends: "triton" (fused Triton kernels; CUDA, or CPU under TRITON_INTERPRET=1) and
"torch" (kernels/reference.py). `import vitprune` never needs triton: the Triton modules
are imported only when that backend is chosen, and self-checked then (self_check.py).
aot.py compiles every kernel variant for a GPU target without a GPU (the CI's check).
"""
import sys

import torch

from .interpret import interpret_mode
from .reference import PrunableParams, as_index  # noqa: F401
from . import reference

BACKENDS = ("auto", "triton", "torch")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def auto_backend(device: torch.device) -> str:
    """What --kernels=auto asks for: Triton on CUDA when it imports, else the reference."""
    return "triton" if device.type == "cuda" and triton_importable() else "torch"


def resolve_backend(name: str, device, dtype=torch.float32) -> str:
    """The backend that will run: 'auto' -> auto_backend(device). The Triton kernels are
    self-checked first (once per process, in fp32 and `dtype`, see self_check.py): if they
    fail, 'auto' warns in one line and falls back to 'torch'. An impossible or failed
    explicit request raises ValueError with the reason, in one line."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"--kernels: unknown {name!r}; choose from {', '.join(BACKENDS)}")
    wanted = auto_backend(device) if name == "auto" else name
    if wanted == "torch":
        return "torch"
    if not triton_importable():
        raise ValueError("--kernels=triton: triton is not installed; use --kernels=torch or auto")
    if device.type != "cuda" and not interpret_mode():
        raise ValueError("--kernels=triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU "
                         "testing); use --kernels=torch or auto")
    from .self_check import self_check
    error = self_check(device, dtype)
    if error is None:
        return "triton"
    if name == "triton":
        raise ValueError(f"--kernels=triton: {error}; use --kernels=torch or auto")
    if (str(device), error) not in _WARNED:
        _WARNED.add((str(device), error))
        print(f"warning: {error}; falling back to --kernels=torch", file=sys.stderr, flush=True)
    return "torch"


_WARNED = set()  # fallback warnings already printed: one line per process and failure


def get_ops(backend: str):
    """(masked_linear, group_reg) of a resolved backend."""
    if backend == "torch":
        return reference.masked_linear, reference.group_reg
    if backend == "triton":
        from .masked_linear import masked_linear
        from .group_reg import group_reg
        return masked_linear, group_reg
    raise ValueError(f"unresolved backend {backend!r}")
