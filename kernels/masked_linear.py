"""Masked linear layer as Triton kernels: y = x·(W⊙M)[live_out][:, live_in]ᵀ + b[live_out].

Same semantics as `reference.masked_linear` (compact activations: with `live_out` y holds only
the alive output features, with `live_in` x holds only the alive input features). The kernels
read the alive rows/columns of W straight from the full weight through the index tensors, so
neither W⊙M nor the gathered sub-matrix is ever materialised and dead rows/columns cost no
FLOPs and no memory traffic.

Two kernels, both blocked matmuls in the style of the Triton matmul tutorial, fp32 accumulation:
- `_gather_matmul_kernel`: C = A·B with B gathered from W (forward: A = x; dx: A = dy, W read
  transposed),
- `_weight_grad_kernel`: dW[live_out, live_in] = M ⊙ dyᵀ·x, scattered into a zero-initialised
  full-size gradient, with db[live_out] = Σ dy fused in.
"""
import functools
import math

import torch
import triton
import triton.language as tl
import triton.testing
from torch.autograd.function import once_differentiable

from .interpret import interpret_mode
from .reference import as_index

# triton.jit picks the interpreter when the kernel is *defined* (TRITON_INTERPRET at import),
# so the launch configuration must follow the same value, not the current environment.
_INTERPRET = interpret_mode()
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _gather_matmul_kernel(
        a_ptr, w_ptr, mask_ptr, bias_ptr, c_ptr, idx_n_ptr, idx_k_ptr,
        M, N, K,
        stride_am, stride_ak, stride_wn, stride_wk, stride_mn, stride_mk, stride_cm, stride_cn,
        HAS_IDX_N: tl.constexpr, HAS_IDX_K: tl.constexpr, HAS_MASK: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """C[m, n] = Σ_k A[m, k]·B[k, n] (+ bias[w_n]) with B[k, n] = (W⊙Mask)[w_n, w_k],
    w_n = idx_n[n] (or n), w_k = idx_k[k] (or k)."""
    # Grouped ordering of the tiles (as in the tutorial) so that neighbouring programs reuse
    # the same rows of A and columns of B from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Which rows of W this tile of outputs reads: the gather happens in the address computation.
    if HAS_IDX_N:
        w_n = tl.load(idx_n_ptr + offs_n, mask=n_ok, other=0)
    else:
        w_n = offs_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if HAS_IDX_K:
            w_k = tl.load(idx_k_ptr + offs_k, mask=k_ok, other=0)
        else:
            w_k = offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b_ok = k_ok[:, None] & n_ok[None, :]
        b = tl.load(w_ptr + w_k[:, None] * stride_wk + w_n[None, :] * stride_wn,
                    mask=b_ok, other=0.0)
        if HAS_MASK:
            # In W's dtype, like the reference's weight * mask.to(weight.dtype).
            b *= tl.load(mask_ptr + w_k[:, None] * stride_mk + w_n[None, :] * stride_mn,
                         mask=b_ok, other=0).to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + w_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _weight_grad_kernel(
        dy_ptr, x_ptr, mask_ptr, dw_ptr, db_ptr, idx_n_ptr, idx_k_ptr,
        M, N, K,
        stride_dym, stride_dyn, stride_xm, stride_xk, stride_mn, stride_mk,
        stride_dwn, stride_dwk,
        HAS_IDX_N: tl.constexpr, HAS_IDX_K: tl.constexpr, HAS_MASK: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """dW[w_n, w_k] = Mask[w_n, w_k] · Σ_m dy[m, n]·x[m, k] and db[w_n] = Σ_m dy[m, n] for the
    alive (n, k) of one tile; everything else of dW/db is left at its zero initialisation."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        dy_t = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                       mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dy_t, x, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            # The bias gradient rides along on the dy tiles the first column of programs
            # loads anyway.
            if pid_k == 0:
                db += tl.sum(dy_t.to(tl.float32), axis=1)

    if HAS_IDX_N:
        w_n = tl.load(idx_n_ptr + offs_n, mask=n_ok, other=0)
    else:
        w_n = offs_n
    if HAS_IDX_K:
        w_k = tl.load(idx_k_ptr + offs_k, mask=k_ok, other=0)
    else:
        w_k = offs_k
    out_ok = n_ok[:, None] & k_ok[None, :]
    if HAS_MASK:
        acc *= tl.load(mask_ptr + w_n[:, None] * stride_mn + w_k[None, :] * stride_mk,
                       mask=out_ok, other=0).to(tl.float32)
    tl.store(dw_ptr + w_n[:, None] * stride_dwn + w_k[None, :] * stride_dwk,
             acc.to(dw_ptr.dtype.element_ty), mask=out_ok)
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_ptr + w_n, db.to(db_ptr.dtype.element_ty), mask=n_ok)


def _matmul_configs(names, shapes):
    return [triton.Config(dict(zip(names, s)), num_stages=stages, num_warps=warps)
            for *s, stages, warps in shapes]


# A short autotune list (tutorial-style tiles): long lists make the first call of every new
# shape slow. Under the interpreter autotuning would run every config, so one small fixed
# config is used there instead (16 is tl.dot's minimum block size; 32 keeps tests fast and
# still exercises ragged edges and several tiles).
_FWD_CONFIGS = _matmul_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
    (128, 128, 32, 8, 3, 8), (128, 64, 32, 8, 4, 4), (64, 128, 32, 8, 4, 4),
    (64, 64, 32, 8, 4, 4), (128, 128, 64, 8, 3, 8)])
_WGRAD_CONFIGS = _matmul_configs(("BLOCK_N", "BLOCK_K", "BLOCK_M"), [
    (128, 128, 32, 3, 8), (64, 64, 64, 4, 4), (64, 128, 32, 4, 4), (32, 64, 64, 4, 4)])
# The operands each kernel's K-loop loads (and the software pipeline stages in shared memory):
# (argument, the flag that turns its load on, or None, tile dimensions).
PIPELINED_TILES = {
    "_gather_matmul_kernel": (("a_ptr", None, ("BLOCK_M", "BLOCK_K")), ("w_ptr", None, ("BLOCK_K", "BLOCK_N")),
                              ("mask_ptr", "HAS_MASK", ("BLOCK_K", "BLOCK_N"))),
    "_weight_grad_kernel": (("dy_ptr", None, ("BLOCK_N", "BLOCK_M")), ("x_ptr", None, ("BLOCK_M", "BLOCK_K"))),
}


def stage_bytes(config, named_args: dict, flags: dict, tiles) -> int:
    """Shared memory the pipeline needs for `config`: a tile of every operand per stage."""
    per_stage = sum(named_args[arg].element_size() * math.prod(config.kwargs[d] for d in dims)
                    for arg, flag, dims in tiles if flag is None or flags.get(flag))
    return per_stage * config.num_stages


def fitting_configs(configs, named_args: dict, flags: dict, tiles, limit: int) -> list:
    """The configs whose pipelined tiles fit in `limit` bytes (else the smallest one)."""
    need = {id(c): stage_bytes(c, named_args, flags, tiles) for c in configs}
    return [c for c in configs if need[id(c)] <= limit] or [min(configs, key=lambda c: need[id(c)])]


def _prune_to_this_gpu(kernel_name: str):
    """The autotuner's early_config_prune: never try a config that needs more shared memory
    than this GPU has (fp32 128×128×64 × 3 stages on an A100): Triton would compile it only
    to fail at launch. tests/test_aot.py checks the estimate against the compiled kernels."""
    def prune(configs, named_args, **flags):
        device = named_args[PIPELINED_TILES[kernel_name][0][0]].device
        limit = triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]
        return fitting_configs(configs, named_args, flags, PIPELINED_TILES[kernel_name], limit)
    return {"early_config_prune": prune}


# (kernel, fixed meta-parameters) of each launch.
if _INTERPRET:
    _GATHER_MATMUL = (_gather_matmul_kernel, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2))
    _WEIGHT_GRAD = (_weight_grad_kernel, dict(BLOCK_N=32, BLOCK_K=32, BLOCK_M=32))
else:
    # A pruned state has different alive widths in every layer, so dozens of shapes are tuned
    # at its first step: 20 ms of repetitions per config (not Triton's 100) rank these
    # sub-millisecond kernels just as well and keep a state's first step short.
    _bench = functools.partial(triton.testing.do_bench, warmup=5, rep=20)
    _GATHER_MATMUL = (triton.autotune(_FWD_CONFIGS, key=["M", "N", "K"], do_bench=_bench,
                                      prune_configs_by=_prune_to_this_gpu("_gather_matmul_kernel"))(
                          _gather_matmul_kernel), {})
    _WEIGHT_GRAD = (triton.autotune(_WGRAD_CONFIGS, key=["M", "N", "K"], do_bench=_bench,
                                    prune_configs_by=_prune_to_this_gpu("_weight_grad_kernel"))(
                        _weight_grad_kernel), {})


def _dot_precision(dtype):
    """fp32 dots follow PyTorch's cuBLAS TF32 setting, so the kernel rounds like the F.linear
    it replaces (exact fp32 by default); 16-bit inputs have no choice to make."""
    if dtype != torch.float32:
        return "ieee"
    mode = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if mode is None:  # PyTorch < 2.9
        mode = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32" if mode == "tf32" else "ieee"


def _gather_matmul(a, w, rows, cols, mask, bias):
    """a · w[rows][:, cols]ᵀ (+ bias[rows]) for 2-D a; `w` and `mask` may be transposed views
    (that is how dx = dy · W[rows][:, cols] reuses this kernel)."""
    M = a.shape[0]
    N = w.shape[0] if rows is None else rows.numel()
    K = w.shape[1] if cols is None else cols.numel()
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if c.numel() == 0:  # nothing alive (or no tokens): a zero-size grid cannot be launched
        return c
    # Unused pointer arguments get `w` as a placeholder; their constexpr flag is off.
    args = (a, w, w if mask is None else mask, w if bias is None else bias, c,
            w if rows is None else rows, w if cols is None else cols,
            M, N, K, a.stride(0), a.stride(1), w.stride(0), w.stride(1),
            *((0, 0) if mask is None else mask.stride()), c.stride(0), c.stride(1))
    flags = dict(HAS_IDX_N=rows is not None, HAS_IDX_K=cols is not None,
                 HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
                 DOT_PRECISION=_dot_precision(a.dtype))
    kernel, config = _GATHER_MATMUL
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    kernel[grid](*args, **flags, **config)
    return c


def _weight_grad(dy, x, weight, rows, cols, mask, has_bias):
    """(dW, db) full-size: zero except at the alive rows/columns (and unmasked elements)."""
    M, N = dy.shape
    K = x.shape[1]
    # Zero-filled only when dead rows/columns leave parts the kernel does not write.
    new = torch.empty if rows is None and cols is None else torch.zeros
    dw = new(weight.shape, device=weight.device, dtype=weight.dtype)
    db = new(weight.shape[0], device=weight.device, dtype=weight.dtype) if has_bias else None
    if N == 0:  # every output row is dead: all gradients stay zero
        return dw, db
    args = (dy, x, dw if mask is None else mask, dw, dw if db is None else db,
            dw if rows is None else rows, dw if cols is None else cols,
            M, N, K, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            *((0, 0) if mask is None else mask.stride()), dw.stride(0), dw.stride(1))
    flags = dict(HAS_IDX_N=rows is not None, HAS_IDX_K=cols is not None,
                 HAS_MASK=mask is not None, HAS_BIAS=has_bias,
                 DOT_PRECISION=_dot_precision(dy.dtype))
    # At least one column of programs even when K == 0, since that column also computes db.
    kernel, config = _WEIGHT_GRAD
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), max(1, triton.cdiv(K, meta["BLOCK_K"])))
    kernel[grid](*args, **flags, **config)
    return dw, db


class _MaskedLinear(torch.autograd.Function):
    """Autograd wrapper over 2-D x; forward and backward are the Triton kernels above."""

    @staticmethod
    def forward(ctx, x, weight, bias, live_out, live_in, mask):
        ctx.save_for_backward(x, weight, live_out, live_in, mask)
        ctx.has_bias = bias is not None
        return _gather_matmul(x, weight, live_out, live_in, mask, bias)

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiable
    def backward(ctx, dy):
        x, weight, live_out, live_in, mask = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _gather_matmul(dy, weight.t(), live_in, live_out,
                                None if mask is None else mask.t(), None)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw, db = _weight_grad(dy, x, weight, live_out, live_in, mask, ctx.has_bias)
        return (dx, dw if ctx.needs_input_grad[1] else None,
                db if ctx.needs_input_grad[2] else None, None, None, None)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias=None, live_out=None,
                  live_in=None, mask=None) -> torch.Tensor:
    """y = x · (W⊙M)[live_out][:, live_in]ᵀ + b[live_out], Triton forward and backward.

    Same contract as `reference.masked_linear`: x is [..., len(live_in)] (or [..., in]), y is
    [..., len(live_out)] (or [..., out]); live_out/live_in are bool masks or int64 index
    tensors (indices must be unique: gradients are written, not accumulated); mask is an
    element mask shaped like `weight`. x may be non-contiguous: it is reshaped to 2-D and
    read through its strides, copied only when the leading dims cannot be flattened as a view.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    live_out = as_index(live_out, n_out)
    live_in = as_index(live_in, n_in)
    for name, idx in (("live_out", live_out), ("live_in", live_in)):
        if idx is not None and idx.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if live_out is not None:
        n_out = live_out.numel()
    if live_in is not None:
        n_in = live_in.numel()
    if x.dim() == 0 or x.shape[-1] != n_in:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [..., {n_in}] "
                         f"({'len(live_in)' if live_in is not None else 'weight.shape[1]'})")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if mask is not None and mask.shape != weight.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(weight.shape)}")
    tensors = {"x": x, "weight": weight, "bias": bias, "live_out": live_out,
               "live_in": live_in, "mask": mask}
    for name, t in tensors.items():
        if t is not None and t.device != weight.device:
            raise ValueError(f"{name} is on {t.device}, weight on {weight.device}")
    if torch.is_autocast_enabled(x.device.type):
        # What F.linear does under autocast: compute in the autocast dtype; the casts are
        # ordinary autograd ops, so fp32 master weights still get fp32 gradients.
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    if (x.dtype not in _DTYPES or weight.dtype != x.dtype
            or (bias is not None and bias.dtype != x.dtype)):
        raise ValueError(f"x, weight and bias must share one dtype of {_DTYPES}, got x {x.dtype}, "
                         f"weight {weight.dtype}, bias {None if bias is None else bias.dtype}")
    if weight.device.type != "cuda" and not _INTERPRET:
        raise ValueError("the Triton masked_linear needs CUDA tensors (or TRITON_INTERPRET=1 "
                         "for CPU testing); use the 'torch' kernels backend")
    # Explicit row count: reshape(-1, 0) is ambiguous when every input is dead.
    x2d = x.reshape(x.shape[:-1].numel(), n_in)
    y = _MaskedLinear.apply(x2d, weight, bias, live_out, live_in, mask)
    return y.view(*x.shape[:-1], n_out)
