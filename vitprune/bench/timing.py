"""Timing and memory helpers for the benchmarks: side-by-side medians, peak memory, the device."""
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
