"""The Triton kernels' self-check, run once per process before a run uses them.

A Triton kernel that fails to compile for this GPU, or computes wrong there, would break
every run on it. So the first time a process chooses the Triton backend, both kernels run
on small ragged shapes, forward and backward, in fp32 and in the run's precision, as the
training step calls them (masked_linear under autocast for bf16; group_reg with both penalty
kinds, the decoupled form included), and are compared with
kernels/reference.py. A compile error or a mismatch comes back as one line naming the kernel
and the error; `resolve_backend` then falls back to the PyTorch kernels (--kernels=auto) or
stops (--kernels=triton).
"""
import contextlib
from typing import Optional

import torch

from . import reference
from .reference import PrunableParams

# Error relative to the largest reference value: TF32 dots (fp32 on CUDA) round to ~1e-3,
# bf16 outputs to ~4e-3; a wrong index, mask or bias is off by O(1).
TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 5e-2, torch.float16: 5e-2}
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_RESULTS = {}  # (device, dtype) -> None (passed) or the failure line, once per process


def self_check(device, dtype=torch.float32) -> Optional[str]:
    """None if the Triton kernels match the reference on `device` in fp32 and `dtype`, else
    one line: which kernel failed, in which precision, and how. Cached per process."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _RESULTS:
        _RESULTS[key] = _check(device, dtype)
    return _RESULTS[key]


def _check(device, dtype) -> Optional[str]:
    for name, check in (("masked_linear", _check_masked_linear), ("group_reg", _check_group_reg)):
        for dt in dict.fromkeys((torch.float32, dtype)):
            try:
                error = check(_triton_kernel(name), device, dt)
            except Exception as e:  # a compile error, an out-of-resources launch, ...
                error = one_line(e)
            if error:
                return f"the Triton kernel {name} failed its self-check on {device} ({_NAMES[dt]}): {error}"
    return None


def _triton_kernel(name: str):
    """The Triton kernel as the module holds it now (imported here: an import error is a failed check)."""
    if name == "masked_linear":
        from .masked_linear import masked_linear
        return masked_linear
    from .group_reg import group_reg
    return group_reg


def one_line(e: Exception, limit: int = 300) -> str:
    """An exception as one line (Triton's compile errors span many: source, caret, message)."""
    text = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 1] + "…"


@torch.no_grad()
def _mismatch(what: str, got, want, dtype) -> Optional[str]:
    if got is None or want is None or got.shape != want.shape:
        return f"{what}: shape {None if got is None else tuple(got.shape)}, expected " \
               f"{None if want is None else tuple(want.shape)}"
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))
    if not err <= TOLERANCE[dtype]:  # also catches NaN
        return f"{what} differs from the reference by {err:.3g} of its largest value (tolerance {TOLERANCE[dtype]:g})"
    return None


def _inputs(*shapes, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).to(device) for s in shapes]


def _check_masked_linear(masked_linear, device, dtype) -> Optional[str]:
    """Two layers that turn every launch flag on and off: live_out + bias (qkv, fc1) and
    live_in + element mask (proj, fc2 of an imp run); W 70 × 50, x 2 × 37 tokens."""
    gen = torch.Generator().manual_seed(0)
    live_out = (torch.rand(70, generator=gen) < 0.6).nonzero().flatten().to(device)
    live_in = (torch.rand(50, generator=gen) < 0.6).to(device)
    mask = (torch.rand(70, 50, generator=gen) < 0.7).to(device)
    cases = {"live_out+bias": (dict(live_out=live_out), 50, True),
             "live_in+mask": (dict(live_in=live_in, mask=mask), int(live_in.sum()), False)}
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    for case, (kw, n_in, has_bias) in cases.items():
        x, w, b = _inputs((2, 37, n_in), (70, 50), (70,), device=device, seed=len(case))
        results = []
        for fn in (masked_linear, reference.masked_linear):
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            with autocast:
                y = fn(leaves[0], leaves[1], leaves[2] if has_bias else None, **kw)
            y.backward(torch.ones_like(y))
            results.append([y] + [t.grad for t in leaves[:2 + has_bias]])
        for what, got, want in zip(("y", "dx", "dW", "db"), *results):
            error = _mismatch(f"{case} {what}", got, want, dtype)
            if error:
                return error
    return None


def _check_group_reg(group_reg, device, dtype) -> Optional[str]:
    """l2 into separate gradients and the group-lasso proximal step on the weights
    themselves (decoupled), over 2 blocks of 3 heads × 6 dims, D = 20, 40 neurons."""
    L, H, hd, D, M = 2, 3, 6, 20, 40
    shapes = [(3 * H * hd, D), (3 * H * hd,), (D, H * hd), (M, D), (M,), (D, M)]
    gen = torch.Generator().manual_seed(1)
    head_t = (torch.rand(L, H, generator=gen) < 0.5).to(device)
    neuron_t = (torch.rand(L, M, generator=gen) < 0.5).to(device)
    for kind, lam, decoupled in (("l2", 0.3, False), ("group_lasso", -0.5, True)):
        tensors = _inputs(*[s for s in shapes for _ in range(L)], device=device, seed=2)
        params = PrunableParams(*[[t.to(dtype) for t in tensors[i * L:(i + 1) * L]] for i in range(6)])
        runs = []
        for fn in (group_reg, reference.group_reg):
            p = PrunableParams(*[[t.clone() for t in kind_list] for kind_list in params])
            g = p if decoupled else PrunableParams(*[[torch.ones_like(t) for t in k] for k in p])
            runs.append((fn(p, g, head_t, neuron_t, lam, kind), g))
        (got_sq, got_g), (want_sq, want_g) = runs
        checks = [("head norms", got_sq[0], want_sq[0]), ("neuron norms", got_sq[1], want_sq[1])]
        checks += [(f"{name} {'update' if decoupled else 'gradient'}", torch.stack(a), torch.stack(b))
                   for name, a, b in zip(PrunableParams._fields, got_g, want_g)]
        for what, got, want in checks:
            error = _mismatch(f"{kind} {what}", got, want, dtype)
            if error:
                return error
    return None
