"""`bench train`: a dense training step against a pruned one and its compacted twin, and the
tensor loader against a DataLoader with PIL (or timm) transforms."""
import datetime
import time

import torch
import torch.nn.functional as F

from vitprune.bench.timing import datasheet_peak, device_name, matmul_peak, time_side_by_side
from vitprune.deploy import compact_model
from vitprune.structure import Structure, count, step_flops
from vitprune.devices import resolve_device, use_bf16


def bench_train(model="vit_tiny", batch=64, ratio=0.7, iters=None, device="auto", precision="auto",
                optimizer="sgd", compile=False, workers=0, img_size=32, patch_size=4):
    """Training throughput, side by side in one process: a dense step (State 0), a step of a
    state pruned at `ratio` (heads and neurons, magnitude, global) as the state loop runs it
    (dense parameter shapes, compute following the structure), and the floor: the same pruned
    network physically compacted (`export`'s timm model, plain nn.Linear) with its own
    optimizer; forward-only evaluation of the three; their model FLOPs per second and MFU
    (`_mfu_rows`); the tensor-resident data path against torchvision's DataLoader with the
    classic PIL transforms; then the projected wall time of the seed's experiment (16 × 60
    epochs of 45k images + evaluation of 15k per epoch).
    img_size/patch_size: the models' input (the synthetic 32-px batch is resized to it)."""
    from vitprune.data.core import train_batches
    from vitprune.data.synth import synthetic

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
    flops = model_flops(nets, batch)
    peak, n = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
    sheet = datasheet_peak(device) if bf16 else None  # the table holds bf16 peaks only
    # The data paths, on the CPU copy of the same images (DataLoader + PIL never sees a GPU).
    tensor_imgs_s = _tensor_loader_rate(data, batch)
    pil_imgs_s = _pil_loader_rate(data, batch, workers)
    finetune = _finetune_loader_rates(data, batch, workers)
    setting = (f"{model} ({img_size} px, patch {patch_size}), batch {batch}, {'bf16' if bf16 else 'fp32'}, "
               f"{optimizer}, ratio {ratio:g}, kernels={backend}{', torch.compile' if compile else ''}")
    lines, total_h = _train_table(t, batch, ratio, setting, device, (pil_imgs_s, tensor_imgs_s), workers)
    lines += _mfu_rows(t, flops, ratio, (peak, n, "bf16" if bf16 else "fp32"), sheet)
    lines += _finetune_rows(finetune, device, workers)
    print("\n".join(lines), flush=True)
    return {"step_s": t, "tensor_loader_img_s": tensor_imgs_s, "pil_loader_img_s": pil_imgs_s,
            "finetune_img_s": finetune,
            "projected_h": total_h, "pruned_vs_twin": t["pruned"] / t["twin"], "kernels": backend,
            "flops": flops, "flops_per_s": {k: flops[k] / t[k] for k in t}, "peak_flops_s": peak,
            "mfu": {k: flops[k] / t[k] / peak for k in t}, "datasheet": sheet,
            "mfu_datasheet": {k: flops[k] / t[k] / sheet[1] for k in t} if sheet else None}


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


def model_flops(nets: dict, batch: int) -> dict:
    """FLOPs of one batch on each path, counted from the structure: a training step
    (structure.step_flops: forward + backward, 3× the alive network's forward) and an
    evaluation forward. The twin computes the pruned network, so it counts the same."""
    dense, pruned = nets["dense"], nets["pruned"]
    kept = {"dense": Structure.full(dense), "pruned": Structure.live(pruned)}
    kept["twin"] = kept["pruned"]
    flops = {name: step_flops(pruned, s) * batch for name, s in kept.items()}
    flops.update({f"{name}_eval": count(pruned, s)["flops_alive"] * batch for name, s in kept.items()})
    return flops


def _rate(flop_s: float) -> str:
    return f"{flop_s / 1e12:.1f} TFLOP/s" if flop_s >= 1e12 else f"{flop_s / 1e9:.1f} GFLOP/s"


def _mfu_rows(t: dict, flops: dict, ratio: float, measured: tuple, sheet) -> list:
    """Model FLOPs utilisation of every timed path: its counted FLOPs per second, as a fraction
    of the matmul peak measured in this process and, on a GPU in bf16, of the datasheet's."""
    peak, n, dtype = measured
    about = (f"Model FLOPs utilisation (MFU): the FLOPs a path computes, counted from the structure (a training "
             f"step: forward + backward, 3× the alive network's forward; eval: the forward; matmuls and attention, "
             f"not norms, softmax or GELU), per second, as a fraction of the peak of a {n}×{n} {dtype} matmul "
             f"measured in this process with the same threads: {_rate(peak)}")
    about += f"; and of the datasheet's dense bf16 peak of the {sheet[0]}, {_rate(sheet[1])}." if sheet else "."
    lines = ["", about, "", "| path | GFLOP / batch | model FLOP/s | MFU (measured peak) | MFU (datasheet) |",
             "|---|---|---|---|---|"]
    for kind, suffix in (("train step", ""), ("eval forward", "_eval")):
        for name, label in TRAIN_ROWS.items():
            key = name + suffix
            rate = flops[key] / t[key]
            of_sheet = f"{rate / sheet[1]:.1%}" if sheet else "n/a"
            lines.append(f"| {kind}, {label.format(ratio=ratio)} | {flops[key] / 1e9:.2f} | {_rate(rate)} | "
                         f"{rate / peak:.1%} | {of_sheet} |")
    return lines


def _bench_models(model_name, ratio, device, bf16, img_size, patch_size):
    """({dense, pruned, twin}, kernels backend): a fresh `model_name` (State 0), the same
    weights pruned at `ratio` (magnitude, global) running through the run's kernels, and the
    pruned network compacted by export into a plain timm model with its own parameters."""
    from vitprune import kernels
    from vitprune.model import build_model, set_kernels
    from vitprune.importance import importance, keep_set
    from vitprune.structure import apply_structure

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
    nets["twin"] = compact_model(nets["pruned"], structure).train()  # parameters of its own
    return nets, backend


def _step_fns(net, batch_xy, device, bf16, optimizer, compile):
    """(train step, inference forward) of `net` with a fresh optimizer, as the state loop runs them."""
    import contextlib

    from vitprune.config import Config
    from vitprune.step import make_optimizer, train_step

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
    from vitprune.data.core import train_batches
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

    from vitprune.data.augment import Mixer

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
