"""Benchmarks: `python -m vitprune bench kernels|train|export`.

kernels:
Times, side by side in one process (warm-up, then the median of `iters` runs, the paths
taking turns run by run):
- masked_linear forward+backward on the four linears of a vit_small block, for several
  fractions of alive heads/neurons: dense F.linear (the unpruned cost), F.linear on a
  materialised W⊙M (pruning by masking: no saving), the reference gather + F.linear, and the
  Triton kernel;
- group_reg over the 12 blocks: a per-layer Python loop (the baseline), the vectorised
  reference, and the one-launch Triton kernel.
The Triton kernels are timed only on CUDA; elsewhere the reference paths are.

train: a dense training step against a pruned one, and the tensor loader against a DataLoader.
export: the dense model against the physically compacted export of a checkpoint.
"""
import datetime
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import fmt
from .deploy import compact_model, load_checkpoint, masked_model, n_params
from .kernels import PrunableParams, reference, resolve_backend
from .structure import Structure, count, head_cols, head_rows
from .timing import device_name, peak_memory, time_side_by_side
from .train import resolve_device, use_bf16

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
        from .kernels.group_reg import group_reg
        from .kernels.masked_linear import masked_linear
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


def bench_train(model="vit_tiny", batch=64, ratio=0.7, iters=None, device="auto", precision="auto",
                optimizer="sgd", compile=False, workers=0, img_size=32, patch_size=4):
    """Training throughput, side by side in one process: a dense step (State 0), a step of a
    state pruned at `ratio` (heads and neurons, magnitude, global) as the state loop runs it
    (dense parameter shapes, compute following the structure), and the floor: the same pruned
    network physically compacted (`export`'s timm model, plain nn.Linear) with its own
    optimizer; forward-only evaluation of the three; the tensor-resident data path against
    torchvision's DataLoader with the classic PIL transforms; then the projected wall time of
    the seed's experiment (16 × 60 epochs of 45k images + evaluation of 15k per epoch).
    img_size/patch_size: the models' input (the synthetic 32-px batch is resized to it)."""
    from .data import synthetic, train_batches

    device = resolve_device(device)
    cuda = device.type == "cuda"
    iters = iters or (30 if cuda else 5)
    bf16 = use_bf16(precision, device)
    data = synthetic(0).to(device)
    x, y = next(train_batches(data, batch, 0, 0, 0))
    if img_size != x.shape[-1]:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    nets, backend = _bench_models(model, ratio, device, bf16, img_size, patch_size)
    fns = {}
    for name, net in nets.items():
        step, infer = _step_fns(net, (x, y), device, bf16, optimizer, compile)
        fns.update({name: step, f"{name}_eval": infer})
    t = time_side_by_side(fns, warmup=3 if not compile else 10, iters=iters, device=device)
    # The data paths, on the CPU copy of the same images (DataLoader + PIL never sees a GPU).
    tensor_imgs_s = _tensor_loader_rate(data, batch)
    pil_imgs_s = _pil_loader_rate(data, batch, workers)
    finetune = _finetune_loader_rates(data, batch, workers)
    setting = (f"{model} ({img_size} px, patch {patch_size}), batch {batch}, {'bf16' if bf16 else 'fp32'}, "
               f"{optimizer}, ratio {ratio:g}, kernels={backend}{', torch.compile' if compile else ''}")
    lines, total_h = _train_table(t, batch, ratio, setting, device, (pil_imgs_s, tensor_imgs_s), workers)
    lines += _finetune_rows(finetune, device, workers)
    print("\n".join(lines), flush=True)
    return {"step_s": t, "tensor_loader_img_s": tensor_imgs_s, "pil_loader_img_s": pil_imgs_s,
            "finetune_img_s": finetune,
            "projected_h": total_h, "pruned_vs_twin": t["pruned"] / t["twin"], "kernels": backend}


TRAIN_ROWS = {"dense": "dense (State 0)", "pruned": "pruned {ratio:g}",
              "twin": "compacted twin (export, nn.Linear)"}


def _train_table(t, batch, ratio, setting, device, loader_rates, workers):
    """(Markdown lines, projected hours of the seed's experiment) of bench_train's timings."""
    rate = {k: batch / v for k, v in t.items()}
    lines = [f"# vitprune training benchmark — {device_name(device)} — {datetime.date.today()} — "
             f"torch {torch.__version__}", setting, "", "| path | ms/step | images/s | vs dense |", "|---|---|---|---|"]
    for kind, suffix in (("train step", ""), ("eval forward", "_eval")):
        for name, label in TRAIN_ROWS.items():
            ratio_text = "1.00" if name == "dense" else f"{t[name + suffix] / t['dense' + suffix]:.2f}× time"
            lines.append(f"| {kind}, {label.format(ratio=ratio)} | {t[name + suffix] * 1e3:.1f} | "
                         f"{rate[name + suffix]:.0f} | {ratio_text} |")
    pil_imgs_s, tensor_imgs_s = loader_rates
    lines += ["", f"The pruned step takes {t['pruned'] / t['twin']:.2f}× the time of its compacted twin "
              f"(evaluation: {t['pruned_eval'] / t['twin_eval']:.2f}×): the cost of keeping dense parameter shapes.",
              "", "| data path (augmented batches) | images/s | ratio |", "|---|---|---|",
              f"| DataLoader + PIL transforms ({workers} workers) | {pil_imgs_s:.0f} | 1.00 |",
              f"| tensor loader on {device.type} | {tensor_imgs_s:.0f} | {tensor_imgs_s / pil_imgs_s:.1f}× |"]
    # The seed's experiment: state 0 dense, states 1-15 pruned; 45k train + 15k eval images per epoch.
    epoch_dense = 45000 / rate["dense"] + 15000 / rate["dense_eval"]
    epoch_pruned = 45000 / rate["pruned"] + 15000 / rate["pruned_eval"]
    total = 60 * epoch_dense + 15 * 60 * epoch_pruned
    lines += ["", f"Projected seed experiment with this model and batch (16 states × 60 epochs): "
              f"{total / 3600:.2f} h (a dense epoch {epoch_dense:.1f} s, a pruned epoch {epoch_pruned:.1f} s)."]
    return lines, total / 3600


def _bench_models(model_name, ratio, device, bf16, img_size, patch_size):
    """({dense, pruned, twin}, kernels backend): a fresh `model_name` (State 0), the same
    weights pruned at `ratio` (magnitude, global) running through the run's kernels, and the
    pruned network compacted by export into a plain timm model with its own parameters."""
    import copy

    from . import kernels
    from .model import build_model, set_kernels
    from .importance import importance, keep_set
    from .structure import apply_structure

    backend = kernels.resolve_backend("auto", device, torch.bfloat16 if bf16 else torch.float32)
    masked_linear = kernels.get_ops(backend)[0]
    nets = {}
    for name in ("dense", "pruned"):
        torch.manual_seed(0)
        nets[name] = build_model(model_name, 10, img_size, patch_size).to(device)
        set_kernels(nets[name], masked_linear)
    heads, neurons = importance(nets["pruned"], Structure.full(nets["pruned"]), "magnitude")
    structure = Structure(keep_set(heads, heads > -1, 1 - ratio, "global", 1),
                          keep_set(neurons, neurons > -1, 1 - ratio, "global", 1))
    apply_structure(nets["pruned"], structure)
    # From a CPU copy (the structure's indices live there): parameters of its own, not views
    # of the pruned model's.
    nets["twin"] = compact_model(copy.deepcopy(nets["pruned"]).cpu(), structure).to(device).train()
    return nets, backend


def _step_fns(net, batch_xy, device, bf16, optimizer, compile):
    """(train step, inference forward) of `net` with a fresh optimizer, as the state loop runs them."""
    import contextlib

    from .config import Config
    from .train import make_optimizer, train_step

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    cfg = Config(optimizer=optimizer, lr=1e-3 if optimizer == "adamw" else 0.01, epochs=1)
    opt, sched = make_optimizer(cfg, net, 10 ** 9, device)
    fwd = torch.compile(net) if compile else net
    x, y = batch_xy

    @torch.inference_mode()
    def infer():
        with autocast():
            fwd(x)
    return (lambda: train_step(fwd, opt, sched, x, y, 1, autocast)), infer


def _tensor_loader_rate(data, batch):
    from .data import train_batches
    sync = torch.cuda.synchronize if data.train_x.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    n = 0
    for xb, _ in train_batches(data, batch, 0, 0, 1):
        n += len(xb)
    sync()
    return n / (time.perf_counter() - t0)


FINETUNE_PX, FINETUNE_IMAGES = 224, 1024


def _finetune_loader_rates(data, batch, workers):
    """--aug=finetune at 224 px from the 32-px images (random-resized crop, flip, mixup/cutmix,
    normalisation) against timm's pipeline for it: DataLoader + create_transform(is_training=True)
    per PIL image (colour jitter off: both do the same work), timm's Mixup on each batch.
    Returns {"tensor": images/s, "timm": images/s} over the first 8 batches (at most
    FINETUNE_IMAGES images): 224-px augmentation on a CPU is slow."""
    import dataclasses

    from timm.data import Mixup, create_transform

    from .data.augment import Mixer

    n = min(FINETUNE_IMAGES, 8 * batch)
    sub = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n], img_size=FINETUNE_PX,
                              crop=((0.08, 1.0), (3 / 4, 4 / 3)))
    mixer = Mixer(0.8, 1.0, 0.1, data.num_classes)
    sync = torch.cuda.synchronize if data.train_x.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    for step, (xb, yb) in enumerate(sub.train_batches(batch, 0, 0, 1)):
        mixer(xb, yb, 0, 0, 1, step)
    sync()
    tensor_rate = n / (time.perf_counter() - t0)
    tf = create_transform(FINETUNE_PX, is_training=True, color_jitter=None)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=data.num_classes)
    loader = torch.utils.data.DataLoader(_pil_dataset(sub, tf), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers)
    t0, n = time.perf_counter(), 0
    for xb, yb in loader:
        mix(xb.to(data.train_x.device), yb.to(data.train_x.device))
        n += len(xb)
    sync()
    return {"tensor": tensor_rate, "timm": n / (time.perf_counter() - t0)}


def _finetune_rows(rates, device, workers):
    return ["", f"| --aug=finetune at {FINETUNE_PX} px (resized crop, flip, mixup/cutmix) | images/s | ratio |",
            "|---|---|---|",
            f"| DataLoader + timm create_transform(is_training=True) + Mixup ({workers} workers) | "
            f"{rates['timm']:.0f} | 1.00 |",
            f"| tensor loader on {device.type} | {rates['tensor']:.0f} | {rates['tensor'] / rates['timm']:.1f}× |"]


def _pil_dataset(data, tf):
    """The training images as a Dataset of PIL images through `tf`: the per-sample pipeline the
    tensor loader is compared against."""
    import numpy as np
    from PIL import Image
    images, labels = data.train_x.cpu().permute(0, 2, 3, 1).numpy(), data.train_y.cpu().tolist()

    class PilSet(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return tf(Image.fromarray(np.ascontiguousarray(images[i]))), labels[i]
    return PilSet()


def _pil_loader_rate(data, batch, workers):
    """torchvision's classic CIFAR pipeline: PIL image per sample, RandomCrop(32, 4),
    RandomHorizontalFlip, ToTensor, Normalize, batched by a DataLoader."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    loader = torch.utils.data.DataLoader(_pil_dataset(data, tf), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    for xb, _ in loader:
        n += len(xb)
    return n / (time.perf_counter() - t0)


# --- export: dense vs physically compacted model ------------------------------------------


def bench_export(checkpoint, batches=(1, 256), iters=None, warmup=None, device="auto", dtype="float32",
                 onnxruntime=True):
    """Dense (all groups alive, same architecture) vs exported model of a state checkpoint.

    Prints a Markdown table (parameters, FLOPs per image, latency per batch size = median
    after warm-up under torch.inference_mode, CUDA events on GPU, and peak memory per batch
    size) with exported/dense ratios, the device and the date; returns the numbers as a dict.
    iters: timed runs per model and batch (default 50 on CUDA, 5 on CPU); warmup: untimed
    runs before (default 10 on CUDA, 1 on CPU). onnxruntime: in fp32, also time both models on
    the CPU in eager timm and in ONNX Runtime (from the ONNX file export writes), side by side.
    """
    device = resolve_device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cuda = device.type == "cuda"
    iters = iters or (50 if cuda else 5)
    warmup = (10 if cuda else 1) if warmup is None else warmup
    batches = [batches] if isinstance(batches, int) else list(batches)

    ck = load_checkpoint(checkpoint)
    model, structure = masked_model(ck)
    counts = count(model, structure)  # FLOPs of the alive network: what the compacted one runs
    models = {"dense": compact_model(model, Structure.full(model)), "exported": compact_model(model, structure)}
    result = {"checkpoint": str(checkpoint), "device": device_name(device), "date": str(datetime.date.today()),
              "dtype": str(dtype).replace("torch.", ""), "batches": batches}
    for name, m in models.items():
        m.to(device, dtype)
        result[name] = {"params": n_params(m), "weight_bytes": sum(p.nbytes for p in m.parameters()),
                        "flops_per_image": counts["flops_total" if name == "dense" else "flops_alive"],
                        "latency_s": {}, "peak_memory_bytes": {}}
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, 3, *models["dense"].patch_embed.img_size, device=device, dtype=dtype)
            fns = {name: (lambda m=m: m(x)) for name, m in models.items()}
            for name, t in time_side_by_side(fns, warmup, iters, device).items():
                result[name]["latency_s"][b] = t
            for name, fn in fns.items():
                result[name]["peak_memory_bytes"][b] = peak_memory(fn, device)
    use_ort = onnxruntime and dtype == torch.float32
    result["onnxruntime"] = _bench_onnxruntime(models, batches, warmup, iters) if use_ort else None
    print(_export_table(result, ck, iters, cuda))
    return result


def _bench_onnxruntime(models: dict, batches: list, warmup: int, iters: int):
    """Median latency per batch of eager timm and of ONNX Runtime (CPU provider) on the same
    fp32 models, timed side by side on the CPU; None without onnxruntime/onnx."""
    import tempfile

    from .deploy import save_onnx, torch_export
    try:
        import onnxruntime
    except ImportError:
        return None
    cpu = torch.device("cpu")
    sessions, eager = {}, {name: m.to(cpu, torch.float32) for name, m in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in eager.items():
            size = m.patch_embed.img_size[0]
            try:
                save_onnx(torch_export(m, size), Path(tmp) / f"{name}.onnx", size)
            except ImportError:
                return None
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # as many threads as eager torch
            sessions[name] = onnxruntime.InferenceSession(str(Path(tmp) / f"{name}.onnx"), options,
                                                          providers=["CPUExecutionProvider"])
    result = {"version": onnxruntime.__version__, "torch_threads": torch.get_num_threads(), "latency_s": {}}
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, 3, *eager["dense"].patch_embed.img_size)
            fns = {**{f"{n} eager": (lambda m=m: m(x)) for n, m in eager.items()},
                   **{f"{n} onnxruntime": (lambda s=s: s.run(None, {"images": x.numpy()}))
                      for n, s in sessions.items()}}
            result["latency_s"][b] = time_side_by_side(fns, warmup, iters, cpu)
    return result


def _export_table(r: dict, ck: dict, iters: int, cuda: bool) -> str:
    d, e = r["dense"], r["exported"]
    cfg = ck["config"]
    memory = ("torch.cuda.max_memory_allocated above the resident weights" if cuda else
              "growth of the peak resident set size (VmHWM) above the resident weights")
    rows = [("parameters (M)", d["params"] / 1e6, e["params"] / 1e6, "{:.3f}"),
            ("weights (MiB)", d["weight_bytes"] / 2**20, e["weight_bytes"] / 2**20, "{:.1f}"),
            ("GFLOPs / image", d["flops_per_image"] / 1e9, e["flops_per_image"] / 1e9, "{:.3f}")]
    title = f"# vitprune export benchmark — {r['device']} — {r['date']} — torch {torch.__version__}, {r['dtype']}"
    about = (f"{r['checkpoint']}: state {ck.get('state')} of {cfg.get('method')} on {cfg.get('dataset')}, "
             f"{cfg.get('model')}, ratio {cfg.get('ratio')}. Latency: median of {iters} runs after warm-up "
             f"({'CUDA events' if cuda else 'wall clock'}), models alternating. Peak memory: {memory}.")
    lines = [title, "", about, "", "| | dense | exported | exported / dense |", "|---|---|---|---|"]
    lines += [f"| {label} | {form.format(a)} | {form.format(b)} | {fmt.ratio(b, a)} |" for label, a, b, form in rows]
    for b in r["batches"]:
        t_d, t_e = d["latency_s"][b], e["latency_s"][b]
        lines.append(f"| latency, batch {b} (ms) | {t_d * 1e3:.2f} | {t_e * 1e3:.2f} | {fmt.ratio(t_e, t_d)} |")
    for b in r["batches"]:
        m_d, m_e = d["peak_memory_bytes"][b], e["peak_memory_bytes"][b]
        lines.append(f"| peak memory, batch {b} (MiB) | {fmt.mib(m_d)} | {fmt.mib(m_e)} | {fmt.ratio(m_e, m_d)} |")
    return "\n".join(lines + _onnxruntime_table(r.get("onnxruntime")))


def _onnxruntime_table(o) -> list:
    """Eager timm beside ONNX Runtime (CPU) on the same fp32 models, latency per batch (ms)."""
    if not o:
        return ["", "ONNX Runtime: not measured (it needs fp32, onnxruntime=True and "
                    "`pip install 'vitprune[deploy]'`)."]
    lines = ["", f"On the CPU, fp32, side by side, {o['torch_threads']} thread(s) each: eager timm (torch) and ONNX "
             f"Runtime {o['version']} (CPUExecutionProvider) running the model.onnx that export writes.", "",
             "| latency (ms) | dense, eager timm | dense, ONNX Runtime | exported, eager timm | "
             "exported, ONNX Runtime | exported ONNX Runtime / dense eager |", "|---|---|---|---|---|---|"]
    for b, t in o["latency_s"].items():
        lines.append(f"| batch {b} | {t['dense eager'] * 1e3:.2f} | {t['dense onnxruntime'] * 1e3:.2f} | "
                     f"{t['exported eager'] * 1e3:.2f} | {t['exported onnxruntime'] * 1e3:.2f} | "
                     f"{fmt.ratio(t['exported onnxruntime'], t['dense eager'])} |")
    return lines

