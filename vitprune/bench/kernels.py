"""`bench kernels`: the Triton kernels against the PyTorch paths they replace.

Times, side by side in one process (warm-up, then the median of `iters` runs, the paths
taking turns run by run):
- masked_linear forward+backward on the four linears of a vit_small block, for several
  fractions of alive heads/neurons: dense F.linear (the unpruned cost), F.linear on a
  materialised W⊙M (pruning by masking: no saving), the reference gather + F.linear, and the
  Triton kernel;
- group_reg over the 12 blocks: a per-layer Python loop (the baseline), the vectorised
  reference, and the one-launch Triton kernel.
The Triton kernels are timed only on CUDA; elsewhere the reference paths are.
"""
import datetime

import torch
import torch.nn.functional as F

from vitprune.bench.timing import device_name, time_side_by_side
from vitprune.kernels import PrunableParams, reference, resolve_backend
from vitprune.structure import head_cols, head_rows
from vitprune.devices import resolve_device

# vit_small/16 on 32×32 images with patch 4: 64 patches + the class token.
VIT_SMALL = dict(dim=384, heads=6, head_dim=64, mlp=1536, tokens=65, blocks=12)
# For tests: the same structure, tiny.
SMALL = dict(dim=32, heads=2, head_dim=16, mlp=64, tokens=5, blocks=2)


def group_reg_loop(params: PrunableParams, grads: PrunableParams, head_targets, neuron_targets,
                   lam: float, kind: str = "l2"):
    """The per-layer Python loop that `group_reg` replaces (the benchmark's baseline): the
    reference applied to one block at a time; same semantics and return value."""
    one = lambda tup, l: PrunableParams(*([kind_list[l]] for kind_list in tup))
    norms = [reference.group_reg(one(params, l), one(grads, l), head_targets[l:l + 1], neuron_targets[l:l + 1],
                                 lam, kind) for l in range(len(params.qkv_w))]
    return torch.cat([h for h, _ in norms]), torch.cat([n for _, n in norms])


def _kept(n_groups: int, frac: float) -> int:
    """Groups kept at alive fraction `frac`: round(frac·n_groups), at least one."""
    return max(1, round(frac * n_groups))


def _alive_groups(n_groups: int, frac: float, gen) -> torch.Tensor:
    """Indices of _kept(n_groups, frac) randomly chosen groups, sorted."""
    return torch.randperm(n_groups, generator=gen)[:_kept(n_groups, frac)].sort().values


def _block_linears(s: dict, frac: float, gen):
    """(name, out, in, live_out, live_in) of a block's four linears with `frac` of the heads
    and neurons alive: whole heads of qkv rows / proj columns, neurons of fc1 rows / fc2
    columns. None (no index) when everything is alive, as for an unpruned layer."""
    H, hd, D, M = s["heads"], s["head_dim"], s["dim"], s["mlp"]
    qkv_rows = proj_cols = neurons = None
    if frac < 1:
        heads = _alive_groups(H, frac, gen)
        qkv_rows, proj_cols = head_rows(heads, H, hd), head_cols(heads, hd)
        neurons = _alive_groups(M, frac, gen)
    return [("qkv", 3 * H * hd, D, qkv_rows, None), ("proj", D, H * hd, None, proj_cols),
            ("fc1", M, D, neurons, None), ("fc2", D, M, None, neurons)]


def _fwd_bwd(fn, inputs, grad_out):
    """A step running fn() forward and backward to every input (grads returned, not
    accumulated into .grad, so repeated steps do identical work)."""
    return lambda: torch.autograd.grad(fn(), inputs, grad_out)


def _linear_steps(n_out, n_in, live_out, live_in, tokens, dtype, device, ops):
    """Forward+backward steps of one linear: 'dense' (F.linear, everything alive), 'W⊙M'
    (F.linear on the weight times the structure as an element mask) and each of `ops`
    ({path: masked_linear implementation}, on compact activations)."""
    leaf = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    w, b, x_full = leaf(n_out, n_in), leaf(n_out), leaf(tokens, n_in)
    g_full = torch.randn(tokens, n_out, device=device, dtype=dtype)
    live_out = None if live_out is None else live_out.to(device)
    live_in = None if live_in is None else live_in.to(device)
    x = x_full if live_in is None else leaf(tokens, live_in.numel())
    g = g_full if live_out is None else torch.randn(tokens, live_out.numel(), device=device,
                                                    dtype=dtype)
    m = torch.ones(n_out, n_in, device=device, dtype=dtype)
    if live_out is not None:
        m = torch.zeros_like(m).index_fill_(0, live_out, 1)
    if live_in is not None:
        m = m * torch.zeros(n_in, device=device, dtype=dtype).index_fill_(0, live_in, 1)
    steps = {"dense": _fwd_bwd(lambda: F.linear(x_full, w, b), (x_full, w, b), g_full),
             "W⊙M": _fwd_bwd(lambda: F.linear(x_full, w * m, b), (x_full, w, b), g_full)}
    for path, op in ops.items():
        steps[path] = _fwd_bwd(lambda op=op: op(x, w, b, live_out=live_out, live_in=live_in),
                               (x, w, b), g)
    return steps


def _prunable(s: dict, dtype, device, gen):
    H, hd, D, M, L = s["heads"], s["head_dim"], s["dim"], s["mlp"], s["blocks"]
    shapes = [(3 * H * hd, D), (3 * H * hd,), (D, H * hd), (M, D), (M,), (D, M)]
    return PrunableParams(*[[torch.randn(*shape, generator=gen).to(device, dtype) * 0.02
                             for _ in range(L)] for shape in shapes])


def _fmt(seconds):
    return "—" if seconds is None else f"{seconds * 1e3:.4g}"


def _ratio(base, t):
    return "—" if t is None or base is None else f"{base / t:.2f}"


def bench_kernels(batches=(128, 512), alive=(1.0, 0.5, 0.3), device="auto", iters=None,
                  dtype="float32", small=False):
    """Benchmark masked_linear and group_reg (see the module doc); print Markdown tables.

    batches: images per batch (tokens = batch × 65); alive: fractions of heads and neurons
    kept; iters: timed runs per measurement (default 50 on CUDA, 3 on CPU); dtype:
    "float32" or "bfloat16"; small: tiny shapes, for tests. Returns the table rows as dicts
    (times in seconds, None where a path was not run).
    """
    device = resolve_device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    s = SMALL if small else VIT_SMALL
    cuda = device.type == "cuda"
    iters = iters or (50 if cuda else 3)
    # Triton's autotuner runs on the first call of every new shape: keep it out of the timing.
    timer = lambda fns: {"triton": None, **time_side_by_side(fns, warmup=5 if cuda else 1, iters=iters,
                                                             device=device)}
    linear_ops = {"reference": reference.masked_linear}
    reg_ops = {"loop": group_reg_loop, "reference": reference.group_reg}
    if resolve_backend("auto", device, dtype) == "triton":
        from vitprune.kernels.group_reg import group_reg
        from vitprune.kernels.masked_linear import masked_linear
        linear_ops["triton"] = masked_linear
        reg_ops["triton"] = group_reg
    lines = [f"# vitprune kernel benchmark — {device_name(device)} — {datetime.date.today()} — "
             f"torch {torch.__version__}, {str(dtype).removeprefix('torch.')}"]
    if "triton" not in linear_ops:
        lines.append("Triton kernels need CUDA (and a passed self-check): timing the PyTorch paths only.")
    gen = torch.Generator().manual_seed(0)
    linear_rows = _masked_linear_rows(s, batches, alive, timer, linear_ops, dtype, device, gen)
    lines += ["", "masked_linear forward+backward, ms; × = speedup over dense F.linear "
              "(higher is better); tri/ref = speedup of Triton over the reference; alive heads "
              "are rounded to whole heads.", "",
              "| batch | alive | heads | layer | dense | W⊙M | reference | triton | W⊙M × "
              "| ref × | triton × | tri/ref |", "|" + "---|" * 12]
    lines += [f"| {r['batch']} | {r['alive']:g} | {r['heads']}/{s['heads']} | {r['layer']} | {_fmt(r['dense'])} | "
              f"{_fmt(r['W⊙M'])} | {_fmt(r['reference'])} | {_fmt(r['triton'])} | "
              f"{_ratio(r['dense'], r['W⊙M'])} | {_ratio(r['dense'], r['reference'])} | "
              f"{_ratio(r['dense'], r['triton'])} | {_ratio(r['reference'], r['triton'])} |" for r in linear_rows]
    reg_rows = _group_reg_rows(s, alive, timer, reg_ops, dtype, device, gen)
    lines += ["", f"group_reg over {s['blocks']} blocks (l2, 1 − alive of the groups are "
              "targets), ms; × = speedup over the per-layer Python loop.", "",
              "| alive | loop | reference | triton | ref × | triton × |", "|" + "---|" * 6]
    lines += [f"| {r['alive']:g} | {_fmt(r['loop'])} | {_fmt(r['reference'])} | {_fmt(r['triton'])} | "
              f"{_ratio(r['loop'], r['reference'])} | {_ratio(r['loop'], r['triton'])} |" for r in reg_rows]
    print("\n".join(lines), flush=True)
    return linear_rows + reg_rows


def _masked_linear_rows(s, batches, alive, timer, ops, dtype, device, gen) -> list:
    """One row per (batch, alive fraction, linear of a block) and the block's total."""
    rows = []
    for batch in batches:
        tokens = batch * s["tokens"]
        for frac in alive:
            heads = _kept(s["heads"], frac)
            total = {}
            for layer, n_out, n_in, live_out, live_in in _block_linears(s, frac, gen):
                t = timer(_linear_steps(n_out, n_in, live_out, live_in, tokens, dtype, device, ops))
                rows.append(dict(kernel="masked_linear", batch=batch, alive=frac, heads=heads, layer=layer, **t))
                total = {k: None if v is None else total.get(k, 0) + v for k, v in t.items()}
            rows.append(dict(kernel="masked_linear", batch=batch, alive=frac, heads=heads, layer="block", **total))
    return rows


def _group_reg_rows(s, alive, timer, ops, dtype, device, gen) -> list:
    """One row per alive fraction: group_reg over every block, 1 − alive of the groups targets."""
    params = _prunable(s, dtype, device, gen)
    grads = PrunableParams(*[[torch.zeros_like(t) for t in kind] for kind in params])
    L, H, M = s["blocks"], s["heads"], s["mlp"]
    rows = []
    for frac in alive:
        head_t = (torch.rand(L, H, generator=gen) >= frac).to(device)
        neuron_t = (torch.rand(L, M, generator=gen) >= frac).to(device)
        t = timer({path: lambda op=op: op(params, grads, head_t, neuron_t, 1e-4, "l2") for path, op in ops.items()})
        rows.append(dict(kernel="group_reg", alive=frac, **t))
    return rows
