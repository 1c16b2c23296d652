"""`bench export`: the dense model against the physically compacted export of a checkpoint, in
torch on the chosen device and, in fp32, in ONNX Runtime on the CPU."""
import datetime
from pathlib import Path

import torch

from vitprune import fmt
from vitprune.bench.timing import device_name, peak_memory, time_side_by_side
from vitprune.deploy import compact_model, load_checkpoint, masked_model, n_params
from vitprune.structure import Structure, count
from vitprune.devices import resolve_device


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

    from vitprune.deploy import save_onnx, torch_export
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
