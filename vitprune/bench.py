"""Kernel benchmarks (`python -m vitprune bench kernels`).

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
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from .kernels import PrunableParams, reference, resolve_backend

# vit_small/16 on 32×32 images with patch 4: 64 patches + the class token.
VIT_SMALL = dict(dim=384, heads=6, head_dim=64, mlp=1536, tokens=65, blocks=12)
# For tests: the same structure, tiny.
SMALL = dict(dim=32, heads=2, head_dim=16, mlp=64, tokens=5, blocks=2)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"CPU {cpu}, {threads} thread{'s' if threads > 1 else ''}"


def time_fn(fn, warmup: int = 3, iters: int = 10, device="cpu") -> float:
    """Median wall time of fn() in seconds: CUDA events on CUDA (GPU time, no sync per call),
    time.perf_counter on CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_side_by_side(fns: dict, warmup: int, iters: int, device) -> dict:
    """Median seconds of each of `fns` ({name: fn}), timed run by run in turn, so that a
    change in machine load during the measurement hits every path alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, warmup=0, iters=1, device=device))
    return {name: statistics.median(t) for name, t in times.items()}


def group_reg_loop(params: PrunableParams, grads: PrunableParams, head_targets, neuron_targets,
                   lam: float, kind: str = "l2"):
    """The per-layer Python loop that `group_reg` replaces (the benchmark's baseline): same
    semantics and return value as `reference.group_reg`."""
    L, H = head_targets.shape
    heads_sq, neurons_sq = [], []
    for l in range(L):
        D = params.qkv_w[l].shape[1]
        qkv_w = params.qkv_w[l].view(3, H, -1, D)
        qkv_b = params.qkv_b[l].view(3, H, -1)
        proj_w = params.proj_w[l].view(D, H, -1)
        h_sq = (qkv_w.float().square().sum((0, 2, 3)) + qkv_b.float().square().sum((0, 2))
                + proj_w.float().square().sum((0, 2)))
        n_sq = (params.fc1_w[l].float().square().sum(1) + params.fc1_b[l].float().square()
                + params.fc2_w[l].float().square().sum(0))
        h_c = head_targets[l].float() * lam
        n_c = neuron_targets[l].float() * lam
        if kind == "group_lasso":
            h_c = torch.where(h_sq > 0, h_c * h_sq.rsqrt(), torch.zeros_like(h_c))
            n_c = torch.where(n_sq > 0, n_c * n_sq.rsqrt(), torch.zeros_like(n_c))
        h_c, n_c = h_c.to(qkv_w.dtype), n_c.to(qkv_w.dtype)
        grads.qkv_w[l].view(3, H, -1, D).add_(qkv_w * h_c[None, :, None, None])
        grads.qkv_b[l].view(3, H, -1).add_(qkv_b * h_c[None, :, None])
        grads.proj_w[l].view(D, H, -1).add_(proj_w * h_c[None, :, None])
        grads.fc1_w[l].add_(params.fc1_w[l] * n_c[:, None])
        grads.fc1_b[l].add_(params.fc1_b[l] * n_c)
        grads.fc2_w[l].add_(params.fc2_w[l] * n_c[None, :])
        heads_sq.append(h_sq)
        neurons_sq.append(n_sq)
    return torch.stack(heads_sq), torch.stack(neurons_sq)


def _kept(n_groups: int, frac: float) -> int:
    """Groups kept at alive fraction `frac`: round(frac·n_groups), at least one."""
    return max(1, round(frac * n_groups))


def _alive_features(n_groups: int, frac: float, group_size: int, gen) -> torch.Tensor:
    """Feature indices of _kept(n_groups, frac) randomly chosen groups."""
    k = _kept(n_groups, frac)
    groups = torch.randperm(n_groups, generator=gen)[:k].sort().values
    return (groups[:, None] * group_size + torch.arange(group_size)).flatten()


def _block_linears(s: dict, frac: float, gen):
    """(name, out, in, live_out, live_in) of a block's four linears with `frac` of the heads
    and neurons alive: whole heads of qkv rows / proj columns, neurons of fc1 rows / fc2
    columns. None (no index) when everything is alive, as for an unpruned layer."""
    H, hd, D, M = s["heads"], s["head_dim"], s["dim"], s["mlp"]
    heads = neurons = qkv_rows = None
    if frac < 1:
        heads = _alive_features(H, frac, hd, gen)
        qkv_rows = torch.cat([heads + j * H * hd for j in range(3)])
        neurons = _alive_features(M, frac, 1, gen)
    return [("qkv", 3 * H * hd, D, qkv_rows, None), ("proj", D, H * hd, None, heads),
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
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                          else "cpu" if device == "auto" else device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    s = SMALL if small else VIT_SMALL
    cuda = device.type == "cuda"
    iters = iters or (50 if cuda else 3)
    # Triton's autotuner runs on the first call of every new shape: keep it out of the timing.
    timer = lambda fns: time_side_by_side(fns, warmup=5 if cuda else 1, iters=iters,
                                          device=device)
    linear_ops = {"reference": reference.masked_linear}
    reg_ops = {"reference": reference.group_reg}
    if resolve_backend("auto", device) == "triton":
        from .kernels.group_reg import group_reg
        from .kernels.masked_linear import masked_linear
        linear_ops["triton"] = masked_linear
        reg_ops["triton"] = group_reg
    lines = [f"# vitprune kernel benchmark — {device_name(device)} — {datetime.date.today()} — "
             f"torch {torch.__version__}, {str(dtype).removeprefix('torch.')}"]
    if "triton" not in linear_ops:
        lines.append("Triton kernels need CUDA: timing the PyTorch paths only.")

    gen = torch.Generator().manual_seed(0)
    rows = []
    lines += ["", "masked_linear forward+backward, ms; × = speedup over dense F.linear "
              "(higher is better); tri/ref = speedup of Triton over the reference; alive heads "
              "are rounded to whole heads.", "",
              "| batch | alive | heads | layer | dense | W⊙M | reference | triton | W⊙M × "
              "| ref × | triton × | tri/ref |", "|" + "---|" * 12]
    for batch in batches:
        tokens = batch * s["tokens"]
        for frac in alive:
            heads = _kept(s["heads"], frac)
            total = {}
            for layer, n_out, n_in, live_out, live_in in _block_linears(s, frac, gen):
                t = {"triton": None, **timer(_linear_steps(n_out, n_in, live_out, live_in,
                                                          tokens, dtype, device, linear_ops))}
                rows.append(dict(kernel="masked_linear", batch=batch, alive=frac, heads=heads,
                                 layer=layer, **t))
                total = {k: None if v is None else total.get(k, 0) + v for k, v in t.items()}
            rows.append(dict(kernel="masked_linear", batch=batch, alive=frac, heads=heads,
                             layer="block", **total))
    for r in (r for r in rows if r["kernel"] == "masked_linear"):
        lines.append(f"| {r['batch']} | {r['alive']:g} | {r['heads']}/{s['heads']} | "
                     f"{r['layer']} | {_fmt(r['dense'])} | "
                     f"{_fmt(r['W⊙M'])} | {_fmt(r['reference'])} | {_fmt(r['triton'])} | "
                     f"{_ratio(r['dense'], r['W⊙M'])} | {_ratio(r['dense'], r['reference'])} | "
                     f"{_ratio(r['dense'], r['triton'])} | {_ratio(r['reference'], r['triton'])} |")

    lines += ["", f"group_reg over {s['blocks']} blocks (l2, 1 − alive of the groups are "
              "targets), ms; × = speedup over the per-layer Python loop.", "",
              "| alive | loop | reference | triton | ref × | triton × |", "|" + "---|" * 6]
    params = _prunable(s, dtype, device, gen)
    grads = PrunableParams(*[[torch.zeros_like(t) for t in kind] for kind in params])
    L, H, M = s["blocks"], s["heads"], s["mlp"]
    for frac in alive:
        head_t = (torch.rand(L, H, generator=gen) >= frac).to(device)
        neuron_t = (torch.rand(L, M, generator=gen) >= frac).to(device)
        t = {"triton": None, **timer({
            path: lambda op=op: op(params, grads, head_t, neuron_t, 1e-4, "l2")
            for path, op in {"loop": group_reg_loop, **reg_ops}.items()})}
        rows.append(dict(kernel="group_reg", alive=frac, **t))
        lines.append(f"| {frac:g} | {_fmt(t['loop'])} | {_fmt(t['reference'])} | "
                     f"{_fmt(t['triton'])} | {_ratio(t['loop'], t['reference'])} | "
                     f"{_ratio(t['loop'], t['triton'])} |")
    print("\n".join(lines), flush=True)
    return rows


def bench_train(model="vit_tiny", batch=64, ratio=0.7, iters=None, device="auto", precision="auto",
                optimizer="sgd", compile=False, workers=0):
    """Training throughput: a dense step (State 0) against a step of a state pruned at `ratio`
    (heads and neurons, magnitude, global), and the tensor-resident data path against
    torchvision's DataLoader with the classic PIL transforms — side by side in one process —
    then the projected wall time of the seed's experiment (vit_small-sized states: 16 × 60
    epochs of 45k images + evaluation of 15k images per epoch) at the measured rates."""
    import contextlib

    from .config import Config
    from .data import synthetic, train_batches
    from .model import build_model, set_kernels
    from .select import importance, select
    from .structure import Structure, apply_structure
    from .train import make_optimizer, train_step
    from . import kernels

    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                          else "cpu" if device == "auto" else device)
    cuda = device.type == "cuda"
    iters = iters or (30 if cuda else 5)
    bf16 = precision == "bf16" or (precision == "auto" and cuda)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    masked_linear, _ = kernels.get_ops(kernels.resolve_backend("auto", device))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    data = synthetic(0).to(device)
    x, y = next(train_batches(data, batch, 0, 0, 0))
    cfg = Config(optimizer=optimizer, lr=1e-3 if optimizer == "adamw" else 0.01, epochs=1)

    def setup(pruned: bool):
        torch.manual_seed(0)
        net = build_model(model, 10).to(device)
        set_kernels(net, masked_linear)
        if pruned:
            heads, neurons = importance(net, Structure.full(net), "magnitude")
            apply_structure(net, Structure(select(heads, heads > -1, 1 - ratio, "global", 1),
                                           select(neurons, neurons > -1, 1 - ratio, "global", 1)))
        opt, sched = make_optimizer(cfg, net, 10 ** 9, device)
        fwd = torch.compile(net) if compile else net
        step = lambda: train_step(fwd, opt, sched, x, y, 1, autocast)

        @torch.inference_mode()
        def infer():
            with autocast():
                fwd(x)
        return step, infer, net

    dense_step, dense_eval, _ = setup(False)
    pruned_step, pruned_eval, _ = setup(True)
    t = time_side_by_side({"dense": dense_step, "pruned": pruned_step,
                           "dense_eval": dense_eval, "pruned_eval": pruned_eval},
                          warmup=3 if not compile else 10, iters=iters, device=device)

    # The data paths, on the CPU copy of the same images (DataLoader + PIL never sees a GPU).
    tensor_imgs_s = _tensor_loader_rate(data, batch)
    pil_imgs_s = _pil_loader_rate(data, batch, workers)

    rate = {k: batch / v for k, v in t.items()}
    lines = [f"# vitprune training benchmark — {device_name(device)} — {datetime.date.today()} — torch {torch.__version__}",
             f"{model}, batch {batch}, {'bf16' if bf16 else 'fp32'}, {optimizer}, ratio {ratio:g}"
             f"{', torch.compile' if compile else ''}", "",
             "| path | ms/step | images/s | vs dense |", "|---|---|---|---|",
             f"| train step, dense (State 0) | {t['dense'] * 1e3:.1f} | {rate['dense']:.0f} | 1.00 |",
             f"| train step, pruned {ratio:g} | {t['pruned'] * 1e3:.1f} | {rate['pruned']:.0f} | "
             f"{t['pruned'] / t['dense']:.2f}× time |",
             f"| eval forward, dense | {t['dense_eval'] * 1e3:.1f} | {rate['dense_eval']:.0f} | 1.00 |",
             f"| eval forward, pruned | {t['pruned_eval'] * 1e3:.1f} | {rate['pruned_eval']:.0f} | "
             f"{t['pruned_eval'] / t['dense_eval']:.2f}× time |", "",
             "| data path (augmented batches) | images/s | ratio |", "|---|---|---|",
             f"| DataLoader + PIL transforms ({workers} workers) | {pil_imgs_s:.0f} | 1.00 |",
             f"| tensor loader on {device.type} | {tensor_imgs_s:.0f} | {tensor_imgs_s / pil_imgs_s:.1f}× |"]
    # The seed's experiment: state 0 dense, states 1-15 pruned; 45k train + 15k eval images per epoch.
    epoch_dense = 45000 / rate["dense"] + 15000 / rate["dense_eval"]
    epoch_pruned = 45000 / rate["pruned"] + 15000 / rate["pruned_eval"]
    total = 60 * epoch_dense + 15 * 60 * epoch_pruned
    lines += ["", f"Projected seed experiment with this model and batch (16 states × 60 epochs): "
              f"{total / 3600:.2f} h (a dense epoch {epoch_dense:.1f} s, a pruned epoch {epoch_pruned:.1f} s)."]
    print("\n".join(lines), flush=True)
    return {"step_s": t, "tensor_loader_img_s": tensor_imgs_s, "pil_loader_img_s": pil_imgs_s,
            "projected_h": total / 3600}


def _tensor_loader_rate(data, batch):
    from .data import train_batches
    sync = torch.cuda.synchronize if data.train_x.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    n = 0
    for xb, _ in train_batches(data, batch, 0, 0, 1):
        n += len(xb)
    sync()
    return n / (time.perf_counter() - t0)


def _pil_loader_rate(data, batch, workers):
    """torchvision's classic CIFAR pipeline: PIL image per sample, RandomCrop(32, 4),
    RandomHorizontalFlip, ToTensor, Normalize, batched by a DataLoader."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    images = data.train_x.cpu().permute(0, 2, 3, 1).numpy()
    labels = data.train_y.cpu().tolist()
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])

    class PilSet(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return tf(Image.fromarray(np.ascontiguousarray(images[i]))), labels[i]

    loader = torch.utils.data.DataLoader(PilSet(), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    for xb, _ in loader:
        n += len(xb)
    return n / (time.perf_counter() - t0)
