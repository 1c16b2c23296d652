"""Timing and memory helpers for the benchmarks: side-by-side medians, peak memory, the device,
and the peaks model FLOPs utilisation is measured against (a matmul timed here, a datasheet)."""
import ctypes
import platform
import statistics
import time

import torch


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


def _proc_status(key: str) -> int:
    """A size field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_memory(fn, device: torch.device):
    """Peak memory fn() adds on top of what is already resident (weights, input), in bytes.

    CUDA: torch's allocator peak. CPU (Linux/glibc): growth of the process's peak resident
    size (VmHWM), after returning freed heap to the OS (malloc_trim) and resetting the peak
    (clear_refs), so memory cached by earlier runs is not mistaken for free. None elsewhere.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        base = _proc_status("VmRSS:")
        fn()
        return _proc_status("VmHWM:") - base
    except (OSError, AttributeError, StopIteration):
        return None


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = None) -> tuple:
    """(FLOP/s, n): the rate of one large n×n @ n×n matmul at `dtype` on `device` with the
    threads torch uses now (median after warm-up): the peak a step's matmuls can reach in
    this process. n: 8192 on CUDA, 2048 on a CPU (a few tenths of a second there)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = time_fn(lambda: a @ b, warmup=3 if cuda else 1, iters=20 if cuda else 5, device=device)
    return 2 * n ** 3 / seconds, n


# NVIDIA's datasheet peaks of dense bf16 tensor-core math (no sparsity), FLOP/s per GPU.
DATASHEET_BF16 = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H200 SXM": 989e12,
                  "H200 NVL": 835e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def datasheet_card(name: str, sms: int, memory_gib: float):
    """Which DATASHEET_BF16 card a CUDA device is, from its name, SM count and memory (GiB);
    None for one not in the table. An H100 is PCIe by its name or its 114 SMs (SXM and NVL
    have 132), NVL by its name or its 94 GB (SXM: 80 GB); an H200 is SXM unless named NVL."""
    upper = name.upper()
    words = upper.replace("-", " ").split()
    if "GH200" in upper:
        return "GH200"
    if "H100" in upper:
        if "PCIE" in upper or sms == 114:
            return "H100 PCIe"
        return "H100 NVL" if "NVL" in upper or memory_gib > 85 else "H100 SXM"
    if "H200" in upper:
        return "H200 NVL" if "NVL" in upper else "H200 SXM"
    if "A100" in upper:
        return "A100"
    return next((card for card in ("L40S", "L4") if card in words), None)


def datasheet_peak(device: torch.device):
    """(card, dense bf16 FLOP/s) of a CUDA device from DATASHEET_BF16, or None."""
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    card = datasheet_card(p.name, p.multi_processor_count, p.total_memory / 2 ** 30)
    return (card, DATASHEET_BF16[card]) if card else None
