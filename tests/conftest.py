import os
import signal
import subprocess
import sys
import time

import pytest
import torch

# Without a GPU the Triton kernels are tested in Triton's CPU interpreter. triton.jit reads
# TRITON_INTERPRET when a kernel (including triton.language's own helpers such as tl.sum) is
# defined, and timm/torchvision import triton, so it must be set before any test module is
# collected. With a GPU the kernels are compiled (TRITON_INTERPRET=1 forces the interpreter).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Fixed for the session, like the kernels: a test never changes it (test_backends checks).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# A test that runs the Triton kernels comes in two variants: the CPU twin in the interpreter,
# and the CUDA one (also marked `gpu`) with compiled kernels.
interpreted = pytest.mark.skipif(not INTERPRET, reason="CPU twin: needs TRITON_INTERPRET=1")
compiled_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                                   reason="needs CUDA and TRITON_INTERPRET=0 (compiled kernels)")


def pytest_configure(config):
    # Registered so that `-m gpu` / `-m "not gpu"` select without unknown-marker warnings.
    config.addinivalue_line("markers", "gpu: needs CUDA (compiled Triton kernels)")
    config.addinivalue_line("markers", "slow: runs the state loop (minutes on 2 cores); -m 'not slow' skips them")
    # torchvision 0.29 announces that its image decoders will move to TorchCodec, once per
    # decoded file; vitprune.data.images decodes with them (what the installed torchvision offers).
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding capabilities:DeprecationWarning")
    _check_interpreter()


def _check_interpreter():
    """Triton < 3.7's interpreter cannot run with numpy >= 2.4: every interpreted kernel
    fails with "only 0-dimensional arrays can be converted to Python scalars"
    (triton-lang/triton#9171). Say so once instead of failing every kernel test."""
    if not INTERPRET:
        return
    try:
        import numpy
        import triton
    except ImportError:
        return
    version = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2])
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(f"triton {triton.__version__}'s interpreter cannot run with numpy "
                                f"{numpy.__version__} (triton-lang/triton#9171): pip install "
                                f"'triton>=3.7' (the dev extra asks for it) or 'numpy<2.4'")


def run_cli(monkeypatch, *args) -> int:
    """`python -m vitprune ARGS` in this process: its exit code."""
    from vitprune.__main__ import main
    monkeypatch.setattr(sys, "argv", ["vitprune", *map(str, args)])
    try:
        main()
    except SystemExit as e:
        return e.code
    return 0


def small_data(sizes):
    """A replacement for vitprune.runtime.load_data: the synthetic set split (train, val, test)
    = sizes, fed to the model with the run's preprocessing."""
    from dataclasses import replace

    from vitprune.data.synth import synthetic

    def load(cfg, device="cpu", world=1, preprocessing=None):
        data = synthetic(cfg.seed, sizes=sizes).to(device)
        return replace(data, **(preprocessing or {"img_size": cfg.img_size}))
    return load


def kill_mid_state(cmd, run_dir, state: int, next_epoch: int, timeout: float = 600, env=None):
    """Start `cmd` and SIGKILL it (a crash with no warning) as soon as its rolling checkpoint
    is at (state, next_epoch): the kill lands inside the next epoch, and resuming must
    restore the middle of a state, not replay a transition."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if last.exists():
            ck = torch.load(last, weights_only=True)  # written by rename: never torn
            if (ck["state"], ck["next_epoch"]) == (state, next_epoch):
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun's workers too
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def descendants(pid: int) -> list:
    """Every process below `pid` (read from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def class_folders(root, classes=("cat", "dog", "fox"), per_class=10):
    """An image folder (ROOT/<class>/img_NNN.png, 20×24 RGB, one tint per class) made here."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            rgb = np.clip(np.roll([200.0, 60.0, 60.0], c) + rng.normal(0, 40, (20, 24, 3)), 0, 255)
            Image.fromarray(rgb.astype(np.uint8)).save(root / name / f"img_{i:03d}.png")
    return root
