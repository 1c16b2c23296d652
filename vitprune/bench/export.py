"""`bench export`: the dense model against the physically compacted export of one pruned
network, and the same network with its MLP widths rounded to multiples of 8, 32 and 64, in
eager torch and torch.compile on the chosen device and, in fp32 on a CPU, in ONNX Runtime."""
import datetime
import tempfile
from pathlib import Path

import torch

from vitprune import fmt
from vitprune.bench.timing import device_name, peak_memory, time_side_by_side
from vitprune.deploy import compact_model, load_checkpoint, masked_model, n_params, save_onnx, torch_export
from vitprune.devices import resolve_device
from vitprune.importance import importance, round_widths, select
from vitprune.model import build_model
from vitprune.structure import Structure, apply_structure, count

ENGINES = {"eager": "eager torch", "compile": "torch.compile", "onnxruntime": "ONNX Runtime"}


def bench_export(checkpoint=None, batches=(1, 256), iters=None, warmup=None, device="auto", dtype="float32",
                 onnxruntime=True, compile=True, round_to=(8, 32, 64), model="vit_small", ratio=0.7):
    """Dense (all groups alive, same architecture) vs the exported pruned network vs the same
    network with every block's MLP width rounded to a multiple of each of `round_to`, all
    compacted as export compacts them, from ONE pruned network: a state checkpoint's, or,
    without one, `model` with timm's random init pruned at `ratio` by vitprune.select.

    Prints Markdown tables with the device and the date, and returns the numbers as a dict:
    parameters, FLOPs per image, latency (median after warm-up under torch.inference_mode,
    CUDA events on GPU, all models and engines alternating) and peak memory of dense vs
    exported; then every variant's widths and FLOPs, and its latency and time per FLOP in
    eager torch, torch.compile (compile=True) and, in fp32 on a CPU, ONNX Runtime
    (onnxruntime=True; the model.onnx export writes). iters: timed runs per model and batch
    (default 50 on CUDA, 5 on CPU); warmup: untimed runs before (default 10 on CUDA, 1 on CPU).
    """
    device = resolve_device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cuda = device.type == "cuda"
    iters = iters or (50 if cuda else 5)
    warmup = (10 if cuda else 1) if warmup is None else warmup
    batches = [batches] if isinstance(batches, int) else list(batches)
    round_to = [round_to] if isinstance(round_to, int) else list(round_to)

    ck = load_checkpoint(checkpoint) if checkpoint else pruned_checkpoint(model, ratio)
    net, structure = masked_model(ck)
    kept = variants(net, structure, round_to)
    models = {name: compact_model(net, s).to(device, dtype) for name, s in kept.items()}
    result = {"checkpoint": str(checkpoint) if checkpoint else None, "device": device_name(device),
              "date": str(datetime.date.today()), "dtype": str(dtype).replace("torch.", ""), "batches": batches,
              "variants": {name: {"mlp_widths": s.neurons.sum(1).tolist(), "params": n_params(models[name]),
                                  "flops_per_image": count(net, s)["flops_alive"]} for name, s in kept.items()}}
    engines, notes, result["onnxruntime"] = _engines(models, device, dtype, compile, onnxruntime)
    for name, v in result["variants"].items():
        v["latency_s"] = {engine: {} for engine in engines}
    with torch.inference_mode(), torch._dynamo.config.patch(recompile_limit=8 * len(models) * len(batches)):
        for b in batches:
            x = torch.randn(b, 3, *models["dense"].patch_embed.img_size, device=device, dtype=dtype)
            fns = {(engine, name): (lambda f=f: f(x)) for engine, fs in engines.items() for name, f in fs.items()}
            for fn in (fn for (engine, _), fn in fns.items() if engine == "compile"):
                fn()  # torch.compile builds the model for this batch size: not timed, whatever the warm-up
            for (engine, name), t in time_side_by_side(fns, warmup, iters, device).items():
                result["variants"][name]["latency_s"][engine][b] = t
            for name in ("dense", "pruned"):
                result["variants"][name].setdefault("peak_memory_bytes", {})[b] = peak_memory(fns["eager", name],
                                                                                             device)
    result["dense"], result["exported"] = _legacy(result, models)
    result["engines"], result["notes"] = list(engines), notes
    print(_export_table(result, ck, iters, cuda) + "\n" + "\n".join(_rounding_tables(result, iters)))
    return result


def pruned_checkpoint(model: str, ratio: float, seed: int = 0) -> dict:
    """What export reads from a state checkpoint, without a run: `model` (32 px, patch 4, 10
    classes) with timm's random init (seed), its heads and neurons selected at `ratio` by
    vitprune.select (magnitude, global) and pruned."""
    torch.manual_seed(seed)
    net = build_model(model, 10, 32, 4)
    keep = select(net, ratio)
    apply_structure(net, keep)
    return {"state": None, "model": net.state_dict(), "structure": keep.state_dict(), "record": {},
            "config": {"model": model, "method": f"select (random weights, seed {seed})", "ratio": ratio,
                       "dataset": None, "img_size": 32, "patch_size": 4}}


def variants(net, structure: Structure, round_to: list) -> dict:
    """{name: Structure}: dense, the pruned network, and for each N of round_to the pruned
    network with every block's MLP width rounded by --round_to's rule (importance.round_widths:
    the multiple of N nearest its width; heads stay whole). A block rounded down drops its
    alive neurons of least magnitude; one rounded up takes back pruned neurons, which are zero,
    so it computes the pruned network exactly."""
    _, scores = importance(net, structure, "magnitude")  # pruned neurons -inf: taken back last
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    every = torch.ones_like(structure.neurons)
    found = {"dense": Structure.full(net), "pruned": structure}
    for n in round_to:
        found[f"pruned, round_to {n}"] = Structure(structure.heads,
                                                   round_widths(structure.neurons.sum(1), order, every, n, 1))
    return found


def _engines(models: dict, device, dtype, compile: bool, onnxruntime: bool):
    """({engine: {variant: callable(x)}}, notes on the engines left out, ONNX Runtime's version):
    eager torch, and torch.compile and ONNX Runtime where they can run."""
    engines, notes, version = {"eager": dict(models)}, [], None
    if compile:
        engines["compile"] = {name: torch.compile(m, dynamic=False) for name, m in models.items()}
    else:
        notes.append("torch.compile: not measured (compile=False).")
    if not onnxruntime:
        notes.append("ONNX Runtime: not measured (onnxruntime=False).")
    elif device.type != "cpu" or dtype != torch.float32:
        notes.append("ONNX Runtime: not measured (a CPU benchmark, in fp32: run with --device=cpu).")
    else:
        sessions, version = _onnxruntime_sessions(models)
        if sessions is None:
            notes.append("ONNX Runtime: not measured (`pip install 'vitprune[deploy]'`: onnx, onnxscript, "
                         "onnxruntime).")
        else:
            engines["onnxruntime"] = sessions
    return engines, notes, version


def _onnxruntime_sessions(models: dict):
    """({variant: callable(x)} running each model's ONNX file (as export writes it) in ONNX
    Runtime's CPU provider with as many threads as torch, its version); (None, None) without
    onnx/onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None, None
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, m) in enumerate(models.items()):
            size, path = m.patch_embed.img_size[0], Path(tmp) / f"{i}.onnx"
            try:
                save_onnx(torch_export(m, size), path, size)
            except ImportError:
                return None, None
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            # Its threads would spin after each run, taking the cores from the next model timed.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            runs[name] = lambda x, s=session: s.run(None, {"images": x.numpy()})
    return runs, onnxruntime.__version__


def _legacy(result: dict, models: dict):
    """The dense and exported (pruned) columns of the first table."""
    def column(name):
        v = result["variants"][name]
        return {"params": v["params"], "weight_bytes": sum(p.nbytes for p in models[name].parameters()),
                "flops_per_image": v["flops_per_image"], "latency_s": v["latency_s"]["eager"],
                "peak_memory_bytes": v["peak_memory_bytes"]}
    return column("dense"), column("pruned")


def _export_table(r: dict, ck: dict, iters: int, cuda: bool) -> str:
    d, e = r["dense"], r["exported"]
    cfg = ck["config"]
    memory = ("torch.cuda.max_memory_allocated above the resident weights" if cuda else
              "growth of the peak resident set size (VmHWM) above the resident weights")
    rows = [("parameters (M)", d["params"] / 1e6, e["params"] / 1e6, "{:.3f}"),
            ("weights (MiB)", d["weight_bytes"] / 2**20, e["weight_bytes"] / 2**20, "{:.1f}"),
            ("GFLOPs / image", d["flops_per_image"] / 1e9, e["flops_per_image"] / 1e9, "{:.3f}")]
    title = f"# vitprune export benchmark — {r['device']} — {r['date']} — torch {torch.__version__}, {r['dtype']}"
    source = (f"{r['checkpoint']}: state {ck.get('state')} of {cfg.get('method')} on {cfg.get('dataset')}"
              if r["checkpoint"] else f"no checkpoint: {cfg.get('method')}")
    about = (f"{source}, {cfg.get('model')}, ratio {cfg.get('ratio')}. Latency: median of {iters} runs after "
             f"warm-up ({'CUDA events' if cuda else 'wall clock'}), models and engines alternating. Peak memory: "
             f"{memory}.")
    lines = [title, "", about, "", "| | dense | exported | exported / dense |", "|---|---|---|---|"]
    lines += [f"| {label} | {form.format(a)} | {form.format(b)} | {fmt.ratio(b, a)} |" for label, a, b, form in rows]
    for b in r["batches"]:
        t_d, t_e = d["latency_s"][b], e["latency_s"][b]
        lines.append(f"| latency, batch {b} (ms) | {t_d * 1e3:.2f} | {t_e * 1e3:.2f} | {fmt.ratio(t_e, t_d)} |")
    for b in r["batches"]:
        m_d, m_e = d["peak_memory_bytes"][b], e["peak_memory_bytes"][b]
        lines.append(f"| peak memory, batch {b} (MiB) | {fmt.mib(m_d)} | {fmt.mib(m_e)} | {fmt.ratio(m_e, m_d)} |")
    return "\n".join(lines)


def _widths(widths: list) -> str:
    return f"{widths[0]} × {len(widths)}" if len(set(widths)) == 1 else ", ".join(map(str, widths))


def _rounding_tables(r: dict, iters: int) -> list:
    """The variants' widths and FLOPs, then per batch their latency and time per FLOP per engine."""
    v = r["variants"]
    dense_m = sum(v["dense"]["mlp_widths"])
    lines = ["", "Rounded widths: the exported network with every block's MLP width rounded to a multiple of N "
             "by --round_to's rule (the multiple nearest its width; rounded down, a block drops its neurons of least "
             "magnitude; rounded up, it takes back pruned neurons, zero, computing the same network); heads stay "
             "whole.", "", "| variant | MLP widths per block | MLP neurons removed | parameters (M) | GFLOPs / image |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {_widths(x['mlp_widths'])} | {1 - sum(x['mlp_widths']) / dense_m:.1%} | "
              f"{x['params'] / 1e6:.3f} | {x['flops_per_image'] / 1e9:.3f} |" for name, x in v.items()]
    version = f" {r['onnxruntime']} (CPUExecutionProvider, as many threads as torch)" if r["onnxruntime"] else ""
    named = ", ".join(ENGINES[e] + (version if e == "onnxruntime" else "") for e in r["engines"])
    lines += ["", f"Latency (ms, median of {iters}) and time per FLOP (ps per FLOP: latency / (batch × FLOPs per "
              f"image); in brackets, against the unrounded pruned network's on the same engine), every variant and "
              f"engine alternating; {named}.", *[""] * bool(r["notes"]), *r["notes"]]
    for b in r["batches"]:
        lines += ["", f"| batch {b} | " + " | ".join(f"{ENGINES[e]} (ms) | ps / FLOP" for e in r["engines"]) + " |",
                  "|---|" + "---|---|" * len(r["engines"])]
        for name, x in v.items():
            cells = []
            for e in r["engines"]:
                t = x["latency_s"][e][b]
                per = t / (b * x["flops_per_image"]) * 1e12
                base = v["pruned"]["latency_s"][e][b] / (b * v["pruned"]["flops_per_image"]) * 1e12
                against = f" ({fmt.ratio(per, base)})" if "round_to" in name else ""
                cells.append(f"{t * 1e3:.2f} | {per:.2f}{against}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
