"""RSST group regularisation of every prunable group of a ViT in one Triton launch.

Same semantics and return value as `reference.group_reg`. The per-block tensors of each kind
(qkv_w, qkv_b, proj_w, fc1_w, fc1_b, fc2_w, for the weights and for the gradients) are reached
through tables of data pointers, so one launch covers all layers without stacking or copying
them. Grid: (H + ⌈M / BLOCK_NEURONS⌉, L). A program owns either one head of one layer or a
block of neurons of one layer; it first reads its group(s) to get the squared norm, then, for
target groups only, re-reads them (from L2) and adds the penalty to the gradient. A program
only writes elements it has already read, and groups are disjoint, so `grads` may alias
`params` (decoupled update) and the norms are always those from before the update.
"""
import torch
import triton
import triton.language as tl

from .interpret import interpret_mode
from .reference import PrunableParams

_INTERPRET = interpret_mode()
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Neurons per program: fc2 columns are strided by M, so a block of neighbouring neurons turns
# each row of fc2 into one contiguous (coalesced) read.
BLOCK_NEURONS = 32
# Elements per tile (2-D tiles are shaped to hold about this many); tiny under the interpreter
# so that the small test shapes still take several tiles per region.
_TILE = 64 if _INTERPRET else 2048


@triton.jit
def _ptr(table, kind, layer, L, DTYPE: tl.constexpr):
    """Base pointer of tensor `kind` of block `layer` from the [kinds, L] int64 table."""
    return tl.load(table + kind * L + layer).to(tl.pointer_type(DTYPE))


@triton.jit
def _region_sq(w, n_rows, n_cols, row_stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ w² over a row-major region of n_rows × n_cols elements, fp32."""
    cols = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        for c0 in range(0, n_cols, BLOCK_C):
            ok = (rows[:, None] < n_rows) & (c0 + cols[None, :] < n_cols)
            v = tl.load(w + rows[:, None] * row_stride + c0 + cols[None, :], mask=ok, other=0.0)
            v = v.to(tl.float32)
            acc += v * v
    return tl.sum(acc)


@triton.jit
def _region_add(g, w, coef, n_rows, n_cols, row_stride,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """g += coef · w over a row-major region, in fp32, stored in g's dtype."""
    cols = tl.arange(0, BLOCK_C)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        for c0 in range(0, n_cols, BLOCK_C):
            ok = (rows[:, None] < n_rows) & (c0 + cols[None, :] < n_cols)
            off = rows[:, None] * row_stride + c0 + cols[None, :]
            v = tl.load(w + off, mask=ok, other=0.0).to(tl.float32)
            acc = tl.load(g + off, mask=ok, other=0.0).to(tl.float32) + coef * v
            tl.store(g + off, acc.to(g.dtype.element_ty), mask=ok)


@triton.jit
def _group_reg_kernel(
        ptrs, head_tgt, neuron_tgt, heads_sq, neurons_sq, lam,
        L, H, HD, D, M,
        GROUP_LASSO: tl.constexpr, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HD: tl.constexpr,
        BLOCK_PR: tl.constexpr, BLOCK_NEURONS: tl.constexpr, BLOCK_D: tl.constexpr):
    """`ptrs` is [12, L]: rows 0-5 the weights, rows 6-11 the gradients, each in the order
    qkv_w, qkv_b, proj_w, fc1_w, fc1_b, fc2_w."""
    slot = tl.program_id(0)
    layer = tl.program_id(1)
    if slot < H:
        # Head h: rows (j·H + h)·HD .. +HD of qkv for j = q, k, v (contiguous chunks of
        # HD·D elements), the matching qkv bias entries, and columns h·HD .. +HD of proj.
        h = slot
        qkv_w = _ptr(ptrs, 0, layer, L, W_DTYPE)
        qkv_b = _ptr(ptrs, 1, layer, L, W_DTYPE)
        proj_w = _ptr(ptrs, 2, layer, L, W_DTYPE) + h * HD
        h_sq = _region_sq(proj_w, D, HD, H * HD, BLOCK_PR, BLOCK_HD)
        for j in tl.static_range(3):
            row0 = (j * H + h) * HD
            h_sq += _region_sq(qkv_w + row0 * D, HD, D, D, BLOCK_R, BLOCK_C)
            h_sq += _region_sq(qkv_b + row0, 1, HD, HD, 1, BLOCK_HD)
        tl.store(heads_sq + layer * H + h, h_sq)

        h_coef = lam * tl.load(head_tgt + layer * H + h).to(tl.float32)
        if GROUP_LASSO:
            # rsqrt(0) would be inf: zero groups get no penalty (and no NaN); the proximal
            # step lands a group on zero, never past it (coefficient >= -1).
            h_coef = tl.where(h_sq > 0, h_coef * tl.rsqrt(tl.where(h_sq > 0, h_sq, 1.0)), 0.0)
            h_coef = tl.maximum(h_coef, -1.0)
        if h_coef != 0:
            _region_add(_ptr(ptrs, 8, layer, L, G_DTYPE) + h * HD, proj_w, h_coef,
                        D, HD, H * HD, BLOCK_PR, BLOCK_HD)
            qkv_wg = _ptr(ptrs, 6, layer, L, G_DTYPE)
            qkv_bg = _ptr(ptrs, 7, layer, L, G_DTYPE)
            for j in tl.static_range(3):
                row0 = (j * H + h) * HD
                _region_add(qkv_wg + row0 * D, qkv_w + row0 * D, h_coef, HD, D, D, BLOCK_R, BLOCK_C)
                _region_add(qkv_bg + row0, qkv_b + row0, h_coef, 1, HD, HD, 1, BLOCK_HD)
    else:
        # Neurons n0 .. n0+BLOCK_NEURONS: rows of fc1, entries of fc1's bias, columns of fc2.
        offs_n = (slot - H) * BLOCK_NEURONS + tl.arange(0, BLOCK_NEURONS)
        n_ok = offs_n < M
        fc1_w = _ptr(ptrs, 3, layer, L, W_DTYPE)
        fc1_b = _ptr(ptrs, 4, layer, L, W_DTYPE)
        fc2_w = _ptr(ptrs, 5, layer, L, W_DTYPE)
        b = tl.load(fc1_b + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        n_sq = b * b
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            ok = n_ok[:, None] & (offs_d[None, :] < D)
            w1 = tl.load(fc1_w + offs_n[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
            w2 = tl.load(fc2_w + offs_d[None, :] * M + offs_n[:, None], mask=ok, other=0.0)
            w1 = w1.to(tl.float32)
            w2 = w2.to(tl.float32)
            n_sq += tl.sum(w1 * w1 + w2 * w2, axis=1)
        tl.store(neurons_sq + layer * M + offs_n, n_sq, mask=n_ok)

        n_coef = lam * tl.load(neuron_tgt + layer * M + offs_n, mask=n_ok, other=0).to(tl.float32)
        if GROUP_LASSO:
            n_coef = tl.where(n_sq > 0, n_coef * tl.rsqrt(tl.where(n_sq > 0, n_sq, 1.0)), 0.0)
            n_coef = tl.maximum(n_coef, -1.0)
        # Masked by the coefficient: non-target neurons' gradients are neither read nor written.
        upd = n_ok & (n_coef != 0)
        fc1_g = _ptr(ptrs, 9, layer, L, G_DTYPE)
        fc1_bg = _ptr(ptrs, 10, layer, L, G_DTYPE)
        fc2_g = _ptr(ptrs, 11, layer, L, G_DTYPE)
        gb = tl.load(fc1_bg + offs_n, mask=upd, other=0.0).to(tl.float32)
        tl.store(fc1_bg + offs_n, (gb + n_coef * b).to(G_DTYPE), mask=upd)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            ok = upd[:, None] & (offs_d[None, :] < D)
            off1 = offs_n[:, None] * D + offs_d[None, :]
            off2 = offs_d[None, :] * M + offs_n[:, None]
            w1 = tl.load(fc1_w + off1, mask=ok, other=0.0).to(tl.float32)
            g1 = tl.load(fc1_g + off1, mask=ok, other=0.0).to(tl.float32)
            tl.store(fc1_g + off1, (g1 + n_coef[:, None] * w1).to(G_DTYPE), mask=ok)
            w2 = tl.load(fc2_w + off2, mask=ok, other=0.0).to(tl.float32)
            g2 = tl.load(fc2_g + off2, mask=ok, other=0.0).to(tl.float32)
            tl.store(fc2_g + off2, (g2 + n_coef[:, None] * w2).to(G_DTYPE), mask=ok)


# Pointer tables by the data_ptrs (and layout) of the 12·L tensors: rebuilding one costs a
# host-to-device copy, and in training the same parameters and .grad buffers come back
# every step. Bounded, because a new .grad allocation (set_to_none) gives new pointers.
_TABLES = {}
_MAX_TABLES = 8


def _table(params: PrunableParams, grads: PrunableParams) -> torch.Tensor:
    """The [12, L] int64 device table of data pointers the kernel reads (see the kernel)."""
    tensors = [t for group in (params, grads) for kind in group for t in kind]
    key = (tuple(t.data_ptr() for t in tensors),
           tuple(kind[0].shape for kind in (*params, *grads)),
           params.qkv_w[0].dtype, grads.qkv_w[0].dtype)
    table = _TABLES.get(key)
    if table is None:
        _check_layout(params, grads)
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        table = torch.tensor(key[0], dtype=torch.int64).view(12, -1).to(params.qkv_w[0].device)
        _TABLES[key] = table
    return table


def _check_layout(params: PrunableParams, grads: PrunableParams):
    """Every block's tensors: the shapes the kernel indexes by (from qkv_w [R, D] and fc1_w
    [M, D]), contiguous, one dtype per tuple and one device."""
    (R, D), M = params.qkv_w[0].shape, params.fc1_w[0].shape[0]
    shapes = dict(qkv_w=(R, D), qkv_b=(R,), proj_w=(D, R // 3), fc1_w=(M, D), fc1_b=(M,),
                  fc2_w=(D, M))
    for what, tup in (("params", params), ("grads", grads)):
        if tup.qkv_w[0].dtype not in _TL_DTYPES:
            raise ValueError(f"{what}: dtype {tup.qkv_w[0].dtype} not supported "
                             f"(use one of {list(_TL_DTYPES)})")
        for name, kind_list in zip(PrunableParams._fields, tup):
            if len(kind_list) != len(params.qkv_w):
                raise ValueError(f"{what}.{name} has {len(kind_list)} blocks, "
                                 f"params.qkv_w has {len(params.qkv_w)}")
            for t in kind_list:
                if t.shape != shapes[name]:
                    raise ValueError(f"{what}.{name}: shape {tuple(t.shape)}, expected "
                                     f"{shapes[name]} from qkv_w {(R, D)} and fc1_w {(M, D)}")
                if not t.is_contiguous():
                    raise ValueError(f"{what}.{name}: tensors must be contiguous")
                if t.dtype != tup.qkv_w[0].dtype or t.device != params.qkv_w[0].device:
                    raise ValueError(f"{what}.{name}: all tensors must share one dtype and "
                                     "device (those of params.qkv_w[0])")


def group_reg(params: PrunableParams, grads: PrunableParams, head_targets: torch.Tensor,
              neuron_targets: torch.Tensor, lam: float, kind: str = "l2"):
    """Add the RSST penalty gradient of the target groups to `grads`, in place, in one launch.

    Same contract as `reference.group_reg`: head_targets [L, H], neuron_targets [L, M] (1 for
    a target group, 0 otherwise; bool or float: a float scales lam per group); kind "l2"
    (g += lam·w) or "group_lasso" (g += max(lam/‖w_g‖, -1)·w, nothing for a zero group);
    `grads` may be `params` (decoupled update, lam = -lr·λ; for group_lasso the proximal
    step, which lands a small group on zero). `lam` is a Python number. Returns the squared group norms from before the
    update, ([L, H], [L, M]) fp32. No host synchronisation.
    """
    if kind not in ("l2", "group_lasso"):
        raise ValueError(f"kind must be 'l2' or 'group_lasso', got {kind!r}")
    if not params.qkv_w:
        raise ValueError("params holds no blocks")
    L, H = head_targets.shape
    M, D = params.fc1_w[0].shape
    qkv_rows = params.qkv_w[0].shape[0]
    if L != len(params.qkv_w) or qkv_rows % (3 * H) or neuron_targets.shape != (L, M):
        raise ValueError(f"head_targets {tuple(head_targets.shape)} / neuron_targets "
                         f"{tuple(neuron_targets.shape)} do not match {len(params.qkv_w)} blocks "
                         f"with qkv {qkv_rows} rows and {M} neurons")
    device = params.qkv_w[0].device
    if head_targets.device != device or neuron_targets.device != device:
        raise ValueError(f"head_targets/neuron_targets must be on {device} like the params")
    table = _table(params, grads)
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError("the Triton group_reg needs CUDA tensors (or TRITON_INTERPRET=1 for "
                         "CPU testing); use the 'torch' kernels backend")
    HD = qkv_rows // (3 * H)
    heads_sq = torch.empty((L, H), device=device, dtype=torch.float32)
    neurons_sq = torch.empty((L, M), device=device, dtype=torch.float32)
    # Tile shapes: qkv chunks as [BLOCK_R, BLOCK_C] over D, proj columns as [BLOCK_PR, HD],
    # neuron blocks as [BLOCK_NEURONS, BLOCK_D].
    block_c = min(triton.next_power_of_2(D), _TILE)
    block_hd = triton.next_power_of_2(HD)
    grid = (H + triton.cdiv(M, BLOCK_NEURONS), L)
    _group_reg_kernel[grid](
        table, head_targets.contiguous(), neuron_targets.contiguous(), heads_sq, neurons_sq,
        float(lam), L, H, HD, D, M,
        GROUP_LASSO=kind == "group_lasso",
        W_DTYPE=_TL_DTYPES[params.qkv_w[0].dtype], G_DTYPE=_TL_DTYPES[grads.qkv_w[0].dtype],
        BLOCK_R=max(1, _TILE // block_c), BLOCK_C=block_c, BLOCK_HD=block_hd,
        BLOCK_PR=max(1, _TILE // block_hd), BLOCK_NEURONS=BLOCK_NEURONS,
        BLOCK_D=max(16, _TILE // BLOCK_NEURONS))
    return heads_sq, neurons_sq
